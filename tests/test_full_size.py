"""Full-size SD 1.5 and SD 2.1 architectures, random weights: our models against diffusers /
transformers in fp32, and the peak memory of loading (slow: minutes on a 2-core CPU).

Each architecture is built ONCE (module-scoped fixture) with the reference libraries and saved in
diffusers layout; the reference outputs are computed and the reference models freed before our
loader reads the folder, so only one full model is in memory at a time. Inputs are small (batch 1,
32x32 and 64x64 latents, 128 px images).

The bar is the one of test_models_parity.py (`compare` of reference_models.py):
max|ours - ref| / max|ref| < 1e-4."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from functools import cached_property
from pathlib import Path

import pytest
import torch

from diffedit import devices
from diffedit.checkpoints.loading import StableDiffusion, load_model
from diffedit.models.tokenizer import Tokenizer
from reference_models import build_reference, compare

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LATENT_SIZES = (32, 64)
TIMESTEPS = (1, 981)
IMAGE_SIZE = 128
PROMPTS = ["a photo of a cat sitting on a red sofa", ""]
RSS_SLACK_BYTES = 600 * 2**20  # torch and Python themselves, whatever the model


class FullSize:
    """One architecture built by the reference libraries and saved. The reference outputs and our
    model are made on first use, in that order, the reference models being freed in between: only
    one full model is in memory at a time, and a test that needs only the folder costs no forward."""

    def __init__(self, arch: str, folder: Path, reference_models: tuple, inputs: dict):
        self.arch, self.folder, self.inputs = arch, folder, inputs
        self._reference_models = reference_models

    @cached_property
    def expected(self) -> dict:
        start = time.perf_counter()
        out = reference_outputs(*self._reference_models, self.inputs)
        self._reference_models = None
        gc.collect()
        print(f"\n[full-size {self.arch}] reference forwards {time.perf_counter() - start:.0f} s")
        return out

    @cached_property
    def model(self) -> StableDiffusion:
        assert self.expected  # the reference models are gone before ours is loaded
        start = time.perf_counter()
        model = load_model(self.folder)
        print(f"\n[full-size {self.arch}] diffedit load {time.perf_counter() - start:.1f} s")
        return model


def make_inputs(unet_in: int, context_dim: int, latent_channels: int) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {f"latents{s}": torch.randn(1, unet_in, s, s, generator=g) for s in LATENT_SIZES}
    inputs["context"] = torch.randn(1, 77, context_dim, generator=g)
    inputs["images"] = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    inputs["z"] = torch.randn(1, latent_channels, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g)
    return inputs


@torch.no_grad()
def reference_outputs(unet, vae, text, inputs: dict) -> dict:
    out = {}
    for s in LATENT_SIZES:
        for t in TIMESTEPS:
            out[f"unet{s}/{t}"] = unet(inputs[f"latents{s}"], t, encoder_hidden_states=inputs["context"]).sample
    out["vae_mean"] = vae.encode(inputs["images"]).latent_dist.mean
    out["vae_decode"] = vae.decode(inputs["z"]).sample
    out["text"] = text(inputs["ids"]).last_hidden_state
    return out


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def full(request, tmp_path_factory):
    arch, start = request.param, time.perf_counter()
    folder, (unet, vae, text) = build_reference(arch, tmp_path_factory.mktemp(arch), seed=0, with_models=True)
    print(f"\n[full-size {arch}] build+save {time.perf_counter() - start:.0f} s")
    inputs = make_inputs(unet.config.in_channels, unet.config.cross_attention_dim, vae.config.latent_channels)
    inputs["ids"] = Tokenizer.from_folder(folder / "tokenizer")(PROMPTS)
    built = FullSize(arch, folder, (unet, vae, text), inputs)
    del unet, vae, text
    yield built
    vars(built).clear()  # drop our model and the outputs before the next architecture
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)  # ~5 GB per architecture


@pytest.mark.parametrize("size", LATENT_SIZES)
@pytest.mark.parametrize("timestep", TIMESTEPS)
@torch.no_grad()
def test_unet(full, size, timestep):
    start = time.perf_counter()
    out = full.model.unet(full.inputs[f"latents{size}"], timestep, full.inputs["context"])
    print(f"[full-size {full.arch}] diffedit UNet {size}x{size}: {time.perf_counter() - start:.1f} s")
    compare(f"{full.arch} UNet {size}x{size} t={timestep}", out, full.expected[f"unet{size}/{timestep}"])


def linear_backends() -> list[str]:
    """oneDNN, and diffedit's fp32 kernel where it builds with its fast path (its portable C path
    would take minutes per UNet call at this size; tests/test_kernel_cpu_linear.py checks it)."""
    from diffedit.kernels import cpu_linear
    return ["onednn"] + (["kernel"] if cpu_linear.fast() else [])


@torch.inference_mode()
@pytest.mark.parametrize("backend", linear_backends())
def test_models_with_packed_convolutions_and_linear_layers(full, backend):
    """The pipeline's CPU path (3x3 convolutions packed for oneDNN, diffedit/models/packed_conv.py;
    every linear layer packed for oneDNN or for diffedit's kernel, packed_linear.py) meets the same
    bar; the models are unpacked again afterwards."""
    from diffedit.models.packed_conv import pack_convolutions, unpack_convolutions
    from diffedit.models.packed_linear import backend_of, pack_linears, pack_pointwise_convolutions, unpack_linears
    if not torch.backends.mkldnn.is_available():
        pytest.fail("torch was built without oneDNN: the pipeline's CPU path cannot be checked")
    model = full.model
    count = pack_convolutions(model.unet) + pack_convolutions(model.vae)
    linears = {name: pack_linears(getattr(model, name), backend) for name in ("unet", "vae", "text_encoder")}
    try:
        if backend == "kernel":  # as the pipeline does: the 1x1 convolutions too (ResNet shortcuts; SD 1's proj_in/out)
            assert pack_pointwise_convolutions(model.unet) >= 14 and pack_pointwise_convolutions(model.vae) == 4
        assert count > 80 and linears["unet"] > 100 and linears["vae"] >= 4 and linears["text_encoder"] > 40
        assert all(backend_of(getattr(model, name)) == backend for name in linears)
        for size in LATENT_SIZES:
            out = model.unet(full.inputs[f"latents{size}"], TIMESTEPS[-1], full.inputs["context"])
            compare(f"{full.arch} UNet packed {size}x{size} t={TIMESTEPS[-1]}", out,
                    full.expected[f"unet{size}/{TIMESTEPS[-1]}"])
        compare(f"{full.arch} VAE decode packed {IMAGE_SIZE}px", model.vae.decode(full.inputs["z"]),
                full.expected["vae_decode"])
        compare(f"{full.arch} text encoder packed", model.text_encoder(full.inputs["ids"]), full.expected["text"])
    finally:
        unpack_convolutions(model.unet)
        unpack_convolutions(model.vae)
        for name in linears:
            unpack_linears(getattr(model, name))


@torch.no_grad()
def test_unet_in_bf16_with_the_cpu_attention_kernel(full, monkeypatch):
    """bf16 on the CPU with diffedit's fused attention (kernels/cpu_attention.c, what "auto" runs on a
    CPU with AVX512-BF16 and no AMX; forced here, so that other CPUs run its portable path) stays as close to the
    fp32 reference as bf16 with torch's SDPA, and within test_models_parity's bf16 bar."""
    import copy
    from diffedit.errors import ParameterError
    unet = copy.deepcopy(full.model.unet).to(torch.bfloat16)
    latents, context = full.inputs["latents32"].bfloat16(), full.inputs["context"].bfloat16()
    expected = full.expected[f"unet32/{TIMESTEPS[-1]}"]
    if full.model.config.unet.upcast_attention:  # SD 2's fp32 attention is torch's: forcing the kernel says so
        monkeypatch.setenv("DIFFEDIT_ATTENTION", "cpu")
        with pytest.raises(ParameterError, match="upcast"):
            unet(latents, TIMESTEPS[-1], context)
        return
    errors = {}
    for backend in ("torch", "cpu"):
        monkeypatch.setenv("DIFFEDIT_ATTENTION", backend)
        out = unet(latents, TIMESTEPS[-1], context).float()
        errors[backend] = ((out - expected).abs().max() / expected.abs().max()).item()
    if devices.cpu_has_fast_bf16():  # and what the bf16 pipeline runs there: oneDNN linear layers, their gating kernel
        from diffedit.kernels import cpu_geglu
        from diffedit.models import packed_linear
        packed_linear.pack_linears(unet, "onednn")
        gated = []
        geglu = cpu_geglu.geglu
        monkeypatch.setattr(cpu_geglu, "geglu", lambda y, built=None: gated.append(1) or geglu(y))
        out = unet(latents, TIMESTEPS[-1], context).float()
        errors["cpu, oneDNN linear"] = ((out - expected).abs().max() / expected.abs().max()).item()
        assert bool(gated) == (cpu_geglu.path(torch.bfloat16) == "avx512_bf16")
        assert errors["cpu, oneDNN linear"] <= 1.25 * errors["torch"] + 1e-3, errors
    del unet
    print(f"[full-size {full.arch}] bf16 UNet 32x32, max error / max |ref|: {errors}")
    assert errors["cpu"] <= 1.25 * errors["torch"] + 1e-3, errors
    assert errors["cpu"] < 5e-2, errors


@torch.no_grad()
def test_vae(full):
    compare(f"{full.arch} VAE encode mean {IMAGE_SIZE}px", full.model.vae.encode(full.inputs["images"]).mean,
            full.expected["vae_mean"])
    compare(f"{full.arch} VAE decode {IMAGE_SIZE}px", full.model.vae.decode(full.inputs["z"]), full.expected["vae_decode"])


@torch.no_grad()
def test_text_encoder(full):
    width = {"sd15": 768, "sd21": 1024}[full.arch]
    out = full.model.text_encoder(full.inputs["ids"])
    assert out.shape == (len(PROMPTS), 77, width)
    compare(f"{full.arch} text encoder", out, full.expected["text"])


RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys, time
    from pathlib import Path
    import torch
    from diffedit.checkpoints.loading import load_model

    def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

    baseline = peak_rss()
    start = time.perf_counter()
    model = load_model(sys.argv[1])
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for m in (model.unet, model.vae, model.text_encoder)
                 for p in m.parameters())
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "seconds": seconds, "param_bytes": params}))
""")


def test_peak_rss_of_loading(full):
    """Loading never holds two copies of the weights: peak RSS <= 1.3 x fp32 weight bytes + 600 MB."""
    weight_bytes = sum(f.stat().st_size for f in full.folder.glob("*/*.safetensors"))
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(full.folder)], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"[full-size {full.arch}] load {m['seconds']:.1f} s; peak RSS {m['peak'] / gib:.2f} GiB "
          f"(after imports {m['baseline'] / gib:.2f} GiB) for {weight_bytes / gib:.2f} GiB of fp32 weights "
          f"(bound {(1.3 * weight_bytes + RSS_SLACK_BYTES) / gib:.2f} GiB)")
    assert m["baseline"] < RSS_SLACK_BYTES, "the measurement counts more than this process"
    assert abs(m["param_bytes"] - weight_bytes) < 0.01 * weight_bytes  # the files are the fp32 weights
    assert m["peak"] <= 1.3 * weight_bytes + RSS_SLACK_BYTES
