"""The speed and memory paths are correct (issue 7); nothing here is timed.

- bf16 on the CPU: weights and UNet inputs bf16 and channels_last, while everything outside the
  three models (DDIM arithmetic, mask statistics, blend) stays fp32: given model outputs that are
  identical bit for bit, the bf16 pipeline must reproduce the fp32 one exactly. End to end, the
  bf16 edit stays within a stated tolerance of the fp32 edit.
- VAE slicing (one image at a time) equals the batched VAE up to float rounding; tiling
  (overlapping tiles, cross-faded) reproduces a pointwise map exactly and the VAE approximately.
- The benchmark and profiling scripts run end to end in their --quick mode; `cpu_name`, which
  names the CPU in their output, tells apart the kinds that a model name hides.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffedit import devices
from diffedit.models import vae as vae_lib
from diffedit.models.packed_conv import PackedConv2d, can_pack
from diffedit.errors import ParameterError
from diffedit.pipeline import DiffEditPipeline
from reference_models import build_reference

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
STEPS, MASK_SAMPLES = 10, 4
# bf16 vs fp32 end to end on the tiny random model, same mask, 8 decoding steps at guidance 7.5
# (pixels in [-1, 1]). Measured: mean 0.031, max 0.23. Guidance multiplies the bf16 error of
# eps_cond - eps_uncond by 7.5, and a random tiny UNet barely separates the two texts.
BF16_PIXEL_MEAN_TOL, BF16_PIXEL_MAX_TOL = 0.06, 0.5
BF16_LATENT_REL_TOL = 0.05  # inversion latents, max abs error / max abs value (measured 0.02)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_reference("tiny", tmp_path_factory.mktemp("tiny"), seed=0)[0]


@pytest.fixture(scope="module")
def fp32(folder) -> DiffEditPipeline:
    return DiffEditPipeline.from_pretrained(folder)


def load_bf16(folder) -> DiffEditPipeline:
    with warnings.catch_warnings():  # on a CPU without native bf16: slow, but just as correct
        warnings.simplefilter("ignore", devices.PrecisionWarning)
        return DiffEditPipeline.from_pretrained(folder, dtype="bf16")


@pytest.fixture(scope="module")
def bf16(folder) -> DiffEditPipeline:
    return load_bf16(folder)


def image(seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.4 * math.cos(seed)) ** 2 + (yy - 0.4 * math.sin(seed)) ** 2) / 0.2)
    return (torch.stack([0.5 + 0.3 * xx, blob, 0.5 - 0.3 * yy]) + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)


def edit(pipe: DiffEditPipeline, img, **kwargs):
    return pipe(img, SOURCE, TARGET, num_inference_steps=STEPS, num_mask_samples=MASK_SAMPLES,
                generator=torch.Generator().manual_seed(0), **kwargs)


# ---------------------------------------------------------------------- bf16

def test_bf16_weights_and_unet_inputs_are_bf16_channels_last(bf16):
    for model in (bf16.unet, bf16.vae, bf16.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    modules = list(bf16.unet.modules()) + list(bf16.vae.modules())
    plain = [m for m in modules if type(m) is torch.nn.Conv2d]
    packed = [m for m in modules if isinstance(m, PackedConv2d)]
    assert plain or packed
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in plain if c.kernel_size != (1, 1))
    if can_pack(torch.device("cpu"), torch.bfloat16):  # native bf16: every convolution packed, 1x1 too
        assert packed and not plain
    seen = []
    forward = bf16.unet.forward
    bf16.unet.forward = lambda x, t, c: seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last),
                                                     c.dtype)) or forward(x, t, c)
    try:
        out = edit(bf16, image(0))
    finally:
        del bf16.unet.forward
    assert seen and set(seen) == {(torch.bfloat16, True, torch.bfloat16)}
    # everything handed back is fp32
    assert {out.mask.soft.dtype, out.mask.difference.dtype, out.inversion.latents.dtype, out.edit.latents.dtype,
            out.edit.pixels.dtype} == {torch.float32}


def _bf16_rounded(module: torch.nn.Module, method: str, source) -> None:
    """module.method(x, *rest) := source(x rounded to bf16, as fp32 contiguous, *rest) rounded to
    bf16, returned in the dtype the pipeline gave x in."""
    def rounded(x, *rest):
        rest = [r.bfloat16().float() if isinstance(r, torch.Tensor) and r.is_floating_point() else r for r in rest]
        out = source(x.bfloat16().float().contiguous(), *rest)
        return out.bfloat16().to(x.dtype if x.is_floating_point() else torch.bfloat16)
    setattr(module, method, rounded)


def test_bf16_pipeline_does_all_arithmetic_outside_the_models_in_fp32(folder):
    """Both pipelines get the same model outputs (the fp32 models, inputs and outputs rounded to
    bf16); if the bf16 pipeline did any step of DDIM, the mask statistics or the blend in bf16,
    its results would differ from the fp32 pipeline's."""
    ours32, ours16 = DiffEditPipeline.from_pretrained(folder), load_bf16(folder)
    reference = DiffEditPipeline.from_pretrained(folder)  # untouched models for the stubs to call
    for pipe in (ours32, ours16):
        pipe.text_encoder.forward = lambda ids, dtype=pipe.dtype: reference.text_encoder(ids).bfloat16().to(dtype)
        _bf16_rounded(pipe.unet, "forward", reference.unet)
        _bf16_rounded(pipe.vae, "decode", reference.vae.decode)
    encoded = ours32.encode_image(image(1))  # the same x0 for both
    a, b = edit(ours32, encoded), edit(ours16, encoded)
    assert torch.equal(a.mask.soft, b.mask.soft) and torch.equal(a.mask.mask, b.mask.mask)
    assert torch.equal(a.inversion.latents, b.inversion.latents)
    assert torch.equal(a.edit.latents, b.edit.latents) and torch.equal(a.edit.pixels, b.edit.pixels)


def test_bf16_edit_is_close_to_fp32(fp32, bf16):
    img = image(0)
    a = edit(fp32, img)
    b = edit(bf16, img, mask=a.mask)  # the same mask: a flipped cell near the threshold is not an error
    latents = (a.inversion.latents - b.inversion.latents).abs().max() / a.inversion.latents.abs().max()
    diff = (a.edit.pixels - b.edit.pixels).abs()
    assert latents < BF16_LATENT_REL_TOL, f"inversion latents differ by {latents:.3f} of their range"
    assert diff.mean() < BF16_PIXEL_MEAN_TOL and diff.max() < BF16_PIXEL_MAX_TOL, \
        f"bf16 edit differs from fp32 by mean {diff.mean():.3f}, max {diff.max():.3f}"
    # and the pipeline in bf16 is not secretly fp32: the numbers do differ
    assert diff.max() > 0


def test_fast_bf16_check_agrees_with_the_convolution_torch_picks():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        conv(x)
    onednn = any(e.key == "aten::mkldnn_convolution" for e in prof.key_averages())
    assert onednn == devices.cpu_has_fast_bf16()


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(devices.PrecisionWarning, match="no native bf16"):
        assert devices.parse_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devices.parse_dtype("bf16", cpu) == torch.bfloat16
        assert devices.parse_dtype("fp32", cpu) == torch.float32


# ---------------------------------------------------------------------- VAE slicing and tiling

def test_tile_starts_cover_with_overlap():
    assert vae_lib.tile_starts(10, 16, 4) == [0]
    for size, tile, overlap in ((64, 16, 4), (65, 16, 8), (100, 32, 7)):
        starts = vae_lib.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ParameterError, match="overlap"):
        vae_lib.tiled(lambda x: x, torch.zeros(1, 1, 8, 8), tile=4, overlap=4, scale=1)


@pytest.mark.parametrize("scale", [4, 0.25])
def test_tiling_reproduces_a_pointwise_map_exactly(scale):
    """Cross-fading with weights that sum to one changes nothing where every tile agrees."""
    x = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))

    def fn(t):
        return 2 * F.interpolate(t, scale_factor=scale, mode="nearest" if scale > 1 else "area") + 1
    tile, overlap = (12, 4) if scale > 1 else (16, 8)
    torch.testing.assert_close(vae_lib.tiled(fn, x, tile, overlap, scale), fn(x), rtol=0, atol=1e-6)


def test_vae_slicing_equals_the_batch_up_to_rounding(fp32):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    with torch.inference_mode():
        batch = fp32.vae.encode(pixels)
        sliced = vae_lib.encode_sliced(fp32.vae, pixels, tile_above=None)
        torch.testing.assert_close(sliced.mean, batch.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(sliced.logvar, batch.logvar, rtol=0, atol=1e-5)
        z = batch.mean
        torch.testing.assert_close(vae_lib.decode_sliced(fp32.vae, z, tile_above=None), fp32.vae.decode(z),
                                   rtol=0, atol=1e-5)


# Tiled vs whole on stationary random input (what tiles see then has the statistics of the
# whole), tiny VAE, 32 x 32 latents in tiles of 16 with overlap 8. Measured (decode / encode):
# mean 0.044 / 0.019, max 0.31 / 0.12, for outputs of std 0.31 / 0.19. The tiny random VAE is a
# hard case: its GroupNorms and middle attention see a quarter of the image per tile.
TILE_MEAN_TOL, TILE_MAX_TOL = 0.2, 1.5  # in units of the output's standard deviation


def test_vae_tiling_is_close_to_the_whole_image(fp32):
    vae = fp32.vae
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 32, 32, generator=g)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.inference_mode():
        for whole, tiled in ((vae.decode(z), vae_lib.decode_sliced(vae, z, tile_above=32, tile=16, overlap=8)),
                             (vae.encode(pixels).mean,
                              vae_lib.encode_sliced(vae, pixels, tile_above=32, tile=16, overlap=8).mean)):
            assert tiled.shape == whole.shape
            err, std = (tiled - whole).abs(), whole.std()
            assert err.mean() < TILE_MEAN_TOL * std and err.max() < TILE_MAX_TOL * std, \
                f"tiled differs by mean {err.mean():.3f}, max {err.max():.3f} (std {std:.3f})"
            assert err.max() > 0  # it did tile


def test_pipeline_decodes_one_image_at_a_time(fp32):
    rows = []
    decode = fp32.vae.decode
    fp32.vae.decode = lambda z: rows.append(z.shape[0]) or decode(z)
    try:
        fp32.decode_latents(torch.randn(3, 4, 8, 8))
    finally:
        del fp32.vae.decode
    assert rows == [1, 1, 1]


# ---------------------------------------------------------------------- the benchmark script

@pytest.mark.slow
def test_benchmark_quick_mode_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pipeline.py"), "--quick",
                          "--cache", str(tmp_path / "model"), "--json", str(tmp_path / "bench.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| diffedit-fp32 |", "| diffusers-fp32 |", "| diffedit-bf16 |", "speed fp32",
                "diffedit-fp32: bare UNet call s, batch 1 (3 in the edit)", "bare UNet call s, batch 2 (5 in the edit)",
                "diffedit-bf16: edit total / its UNet calls made bare"):
        assert row in out.stdout
    import json
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    # quick workload: n = 2, 4 steps, r = 0.8 -> 2n + 3 + 2 * 3 = 13 samples; diffusers 4n + 2 * 3 + 2 * 3
    assert runs["diffedit-fp32"][0]["unet_samples"] == 13 and runs["diffedit-bf16"][0]["unet_samples"] == 13
    assert runs["diffusers-fp32"][0]["unet_samples"] == 20
    # the calls behind them: the inversion's 3 at batch 1, the mask's 2n and the decoding's 2 * 3 rows at batch 2
    assert runs["diffedit-fp32"][0]["unet_calls"] == {"1": 3, "2": 5}
    assert set(runs["diffedit-bf16"][0]["bare_calls"]) == {"1", "2"} and runs["diffusers-fp32"][0]["bare_calls"] == {}
    assert runs["diffedit-fp32"][0]["vae_encodes"] == 1 and all(r[0]["peak_rss_gb"] > 0 for r in runs.values())


@pytest.mark.slow
def test_profile_script_quick_mode_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_unet.py"), "--quick", "--calls", "1",
                          "--cache", str(tmp_path / "model")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fp32 matmul peak" in out.stdout and "UNet, batch 2" in out.stdout and "VAE decode" in out.stdout
    rows = [line.split("(")[0].split() for line in out.stdout.splitlines()
            if line.startswith(("conv 3x3", "linear", "attention", "all"))]
    assert len(rows) == 8  # conv 3x3, linear, attention (cross/self, and the VAE's) and all, for the UNet and the VAE
    for row in rows:  # the kinds with FLOPs report a positive rate
        assert float(row[-2]) > 0 and row[-1].endswith("%")


@pytest.mark.parametrize("script, args, message", [
    ("bench_pipeline.py", ["--repeats", "0"], "must be at least 1"),
    ("bench_pipeline.py", ["--size", "100"], "--size must be a positive multiple of 64"),
    ("profile_unet.py", ["--calls", "0"], "must be at least 1"),
    ("profile_unet.py", ["--batch", "-1"], "must be at least 1")])
def test_benchmark_scripts_refuse_bad_counts_in_one_line(script, args, message, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--cache",
                          str(tmp_path / "model"), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()  # refused before building anything


ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16

processor\t: 1
"""
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16
"""


def test_cpu_name_tells_the_cpu_kind_that_a_model_name_hides():
    from diffedit.devices import cpu_name
    assert "family 25 model 17, Zen 4" in cpu_name(ZEN4_CPUINFO) and "avx2, avx512f, avx512_bf16)" in cpu_name(ZEN4_CPUINFO)
    assert cpu_name(XEON_CPUINFO).startswith("Intel(R) Xeon(R) Processor (family 6 model 167;")
    assert cpu_name(XEON_CPUINFO).endswith("avx2, avx512f, avx512_bf16, amx_bf16)")
    assert cpu_name("model name\t: some CPU\n").endswith("no AVX2)")


def test_profile_splits_packed_convolutions_by_kernel_size():
    """Packed 1x1 and 3x3 convolutions are one profiler op (mkldnn::_convolution_pointwise); the
    profile gave all of it to "conv 3x3" (in bf16 the UNet's 1x1s: 6 % of a call, and the 3x3s shown
    at 85 % of the peak instead of 92 %)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import profile_unet

    one = PackedConv2d(torch.nn.Conv2d(64, 64, 1))
    three = PackedConv2d(torch.nn.Conv2d(64, 64, 3, padding=1))
    x = torch.randn(1, 64, 32, 32)
    with torch.no_grad():
        one(x), three(x)  # packed before profiling
        alone_one, backends = profile_unet.profile_calls(lambda: one(x), 2)
        alone_three, _ = profile_unet.profile_calls(lambda: three(x), 2)
        both, _ = profile_unet.profile_calls(lambda: (one(x), three(x)), 2)
    assert alone_one["conv 1x1"] > 0 and alone_one.get("conv 3x3", 0.0) == 0.0
    assert backends["conv 1x1"] == {"oneDNN, prepacked"}
    assert alone_three["conv 3x3"] > 0 and alone_three.get("conv 1x1", 0.0) == 0.0
    assert 0 < both["conv 1x1"] < both["conv 3x3"]  # 9x the multiply-adds
