"""The Triton kernels (diffedit.kernels) on the CPU, under Triton's interpreter, against the torch paths.

Triton decides interpreter or compiler when a kernel is decorated and reads TRITON_INTERPRET again
at launch, and its own library functions (tl.sum, ...) are decorated when triton is first
imported, which the test oracles (diffusers, transformers) already do. So the interpreter cannot
be switched on inside the suite's process. The kernel tests below are named `interpreted_test_*`:
the suite collects only `test_kernels_under_the_interpreter`, which runs them in a child pytest
whose environment has TRITON_INTERPRET=1 from the start. To run them directly, one by one:

    TRITON_INTERPRET=1 pytest tests/test_kernels.py -o python_functions=interpreted_test_

The `test_*` functions are checks that need a process without the interpreter or without Triton.

Interpreter facts the tolerances account for: tl.dot in fp32/fp16 is numpy's matmul; bf16 operands
are cast to fp32 by the kernel (see kernels/attention.py); fp32 -> bf16 casts truncate instead of
rounding to nearest as the GPU does, so bf16 outputs are within 1 ulp rather than half an ulp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffedit.models import attention as attention_module
from diffedit.errors import ParameterError
from diffedit.mask_maps import MaskMaps, mask_maps, mask_maps_torch

REPO = Path(__file__).resolve().parents[1]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETER:  # the child process (or a direct run as above): kernels built for the interpreter
    from diffedit.kernels import attention as kernel_attention
    from diffedit.kernels import mask_reduction as kernel_mask

    assert kernel_attention.INTERPRETED and kernel_mask.INTERPRETED


@pytest.mark.interpreter
def test_kernels_under_the_interpreter():
    """Every `interpreted_test_*` of this file, in a child pytest with TRITON_INTERPRET=1."""
    env = {key: value for key, value in os.environ.items() if key not in ("DIFFEDIT_ATTENTION", "DIFFEDIT_MASK_KERNEL")}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-o", "python_functions=interpreted_test_", __file__]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and " failed" not in result.stdout and " skipped" not in result.stdout


# attention: |out - ref| <= atol + rtol * |ref|, ref computed in fp32 from the same (rounded) inputs.
# Measured worst ratios to these bounds: fp32 0.09, fp16 0.24, bf16 0.47.
ATTENTION_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def _qkv(batch, heads, head_dim, n_q, n_k, dtype, seed=0, q_scale=2.0):
    """Random q, k, v; q scaled up so the softmax is peaked and the running max matters."""
    g = torch.Generator().manual_seed(seed)
    q = q_scale * torch.randn(batch, n_q, heads * head_dim, generator=g)
    k, v = (torch.randn(batch, n_k, heads * head_dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _assert_attention_close(out, q, k, v, heads):
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = kernel_attention.attention_reference(q.float(), k.float(), v.float(), heads)
    atol, rtol = ATTENTION_TOL[q.dtype]
    assert torch.isfinite(out).all()
    worst = ((out.float() - ref).abs() / (atol + rtol * ref.abs())).max().item()
    assert worst <= 1.0, f"attention off by {worst:.2f}x the {q.dtype} tolerance"


# A covering subset: head dims 40/64/80/160, query lengths 77/100/256/1000, keys 77 (cross) or
# as many as the queries (self), batch x heads 1/3/16, each dtype with upcast off and on.
ATTENTION_CASES = [
    # batch, heads, head_dim, n_q, n_k, dtype, upcast
    (1, 1, 40, 77, 77, torch.float32, False),
    (1, 3, 64, 100, 77, torch.float16, False),
    (2, 8, 80, 256, 256, torch.float16, False),
    (1, 1, 160, 1000, 77, torch.float16, True),
    (1, 1, 40, 1000, 1000, torch.bfloat16, False),
    (3, 1, 160, 100, 100, torch.bfloat16, True),
    (1, 16, 64, 256, 77, torch.float32, True),
    (1, 3, 80, 77, 77, torch.float16, True),
    (2, 8, 40, 256, 77, torch.bfloat16, False),
    (1, 3, 160, 77, 77, torch.float32, False),
    (1, 1, 64, 1000, 1000, torch.float16, False),
]


@pytest.mark.parametrize("batch,heads,head_dim,n_q,n_k,dtype,upcast", ATTENTION_CASES)
def interpreted_test_attention_matches_reference(batch, heads, head_dim, n_q, n_k, dtype, upcast):
    q, k, v = _qkv(batch, heads, head_dim, n_q, n_k, dtype)
    _assert_attention_close(kernel_attention.attention(q, k, v, heads=heads, upcast=upcast), q, k, v, heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def interpreted_test_upcast_leaves_only_the_output_rounding(dtype):
    """With upcast everything is fp32 until the output cast: within 1 ulp of the fp32 result
    (the interpreter truncates bf16). Without it the probabilities are rounded: a larger error."""
    q, k, v = _qkv(1, 3, 64, 100, 100, dtype)
    ref = kernel_attention.attention_reference(q.float(), k.float(), v.float(), 3)
    ulps = {}
    for upcast in (True, False):
        out = kernel_attention.attention(q, k, v, heads=3, upcast=upcast).float()
        ulps[upcast] = ((out - ref).abs() / (1e-6 + torch.finfo(dtype).eps * ref.abs())).max().item()
    assert ulps[True] <= 1.0 < ulps[False], ulps


def interpreted_test_attention_scores_beyond_fp16_range():
    """q.k = 40 * 40 * 64 > 65504 overflows a half-precision score matrix; the kernel accumulates
    scores in fp32 (the reason SD 2 needs `upcast` elsewhere), so it stays finite and exact."""
    q, k, v = _qkv(1, 2, 64, 77, 77, torch.float16, q_scale=1.0)
    q, k = torch.full_like(q, 40.0), k.abs() * 40.0
    out = kernel_attention.attention(q, k, v, heads=2)
    _assert_attention_close(out, q, k, v, 2)


def interpreted_test_attention_strided_views_and_small_tiles():
    """Batch/token strides of views are used as they are; a non-contiguous last dim is copied;
    16-wide tiles give many masked tail tiles (77 = 4 * 16 + 13)."""
    batch, heads, head_dim, n_q, n_k = 2, 3, 40, 77, 50
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n_q, batch, heads * head_dim, generator=g).transpose(0, 1)  # batch stride < token stride
    kv = torch.randn(batch, n_k, 2 * heads * head_dim, generator=g)
    k, v = kv[..., : heads * head_dim], kv[..., heads * head_dim:]             # token stride 2 * width
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    _assert_attention_close(kernel_attention.attention(q, k, v, heads, block_m=16, block_n=16), q, k, v, heads)
    q_t = torch.randn(batch, heads * head_dim, n_q, generator=g).transpose(1, 2)  # last dim strided
    assert q_t.stride(-1) != 1
    _assert_attention_close(kernel_attention.attention(q_t, k, v, heads, block_m=32), q_t, k, v, heads)


def interpreted_test_attention_refuses_what_it_cannot_serve():
    """The kernel file stands alone: it refuses with plain TypeError / ValueError, not diffedit's errors."""
    q, k, v = _qkv(1, 2, 64, 16, 16, torch.float32)
    assert kernel_attention.available()
    kernel_attention.check_inputs(q, k, v, 2)
    refused = [
        (TypeError, (q.double(), k.double(), v.double(), 2)),         # dtype
        (TypeError, (q, k.half(), v, 2)),                              # mixed dtypes
        (TypeError, (q.numpy(), k, v, 2)),                             # not a tensor
        (ValueError, (q, k, v, 3)),                                    # width not a multiple of heads
        (ValueError, (q.repeat(1, 1, 8), k.repeat(1, 1, 8), v.repeat(1, 1, 8), 2)),  # head dim 512 > 256
        (ValueError, (q, k[:, :5], v, 2)),                             # k and v token counts differ
        (ValueError, (q[0], k[0], v[0], 2)),                           # not 3-D
    ]
    for error, args in refused:
        with pytest.raises(error):
            kernel_attention.check_inputs(*args)
        with pytest.raises(error) as refusal:
            kernel_attention.attention(*args)
        assert not isinstance(refusal.value, ParameterError)
    with pytest.raises(ValueError):
        kernel_attention.attention(q, k, v, 2, block_m=24)


def interpreted_test_attention_reference_matches_torch_sdpa():
    """The oracle itself against torch's scaled_dot_product_attention (the torch path)."""
    q, k, v = _qkv(2, 3, 40, 30, 20, torch.float32)
    attention_module.set_attention_backend("torch")
    try:
        expected = attention_module.attention(q, k, v, heads=3)
    finally:
        attention_module.set_attention_backend(None)
    torch.testing.assert_close(kernel_attention.attention_reference(q, k, v, 3), expected, atol=1e-5, rtol=1e-5)


# --- mask reduction -------------------------------------------------------------------------

def _eps_pair(shape, dtype, seed=0):
    """Noise predictions that differ strongly in one corner region, as an edit would."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    source = target + 0.3 * torch.randn(shape, generator=g)
    source[..., : shape[-2] // 3, : shape[-1] // 2] += 1.5
    return target.to(dtype), source.to(dtype)


def _assert_maps_agree(ours: MaskMaps, ref: MaskMaps, threshold: float):
    """Float tolerance: sums in another order. The masks agree wherever the torch soft value is
    not within 1e-5 of the threshold."""
    assert ours.difference.dtype == ours.soft.dtype == torch.float32 and ours.mask.dtype == torch.bool
    torch.testing.assert_close(ours.difference, ref.difference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.soft, ref.soft, rtol=1e-5, atol=1e-6)
    decided = (ref.soft - threshold).abs() > 1e-5
    assert torch.equal(ours.mask[decided], ref.mask[decided])
    assert 0 < ref.mask.sum() < ref.mask.numel()  # a mask that is neither empty nor full


def _kernel_maps(*args, **kwargs) -> MaskMaps:
    """The kernel's (difference, soft, mask) tuple as diffedit's MaskMaps."""
    difference, soft, mask = kernel_mask.mask_reduction(*args, **kwargs)
    return MaskMaps(difference=difference, soft=soft, mask=mask)


MASK_CASES = [
    # shape (B, n, C, h, w), dtype, block_pixels
    ((1, 1, 4, 8, 8), torch.float32, 1024),
    ((2, 3, 4, 13, 17), torch.float16, 64),
    ((3, 2, 4, 9, 30), torch.bfloat16, 32),
    ((1, 10, 4, 64, 64), torch.float16, 1024),
]


@pytest.mark.parametrize("normalization,threshold", [("paper", 0.5), ("mean_ratio", 0.4)])
@pytest.mark.parametrize("shape,dtype,block", MASK_CASES)
def interpreted_test_mask_kernel_matches_torch_path(shape, dtype, block, normalization, threshold):
    target, source = _eps_pair(shape, dtype)
    ours = _kernel_maps(target, source, normalization, threshold, block_pixels=block)
    _assert_maps_agree(ours, mask_maps_torch(target, source, normalization, threshold), threshold)


@pytest.mark.parametrize("normalization,threshold", [("paper", 0.5), ("mean_ratio", 0.4)])
@pytest.mark.parametrize("shape,dtype,block", MASK_CASES)
def interpreted_test_mask_kernel_reference_is_the_torch_path(shape, dtype, block, normalization, threshold):
    """The kernel file's own torch reference (the benchmark's baseline) is diffedit's torch path, bit for bit."""
    target, source = _eps_pair(shape, dtype)
    ours = MaskMaps(*kernel_mask.mask_reduction_reference(target, source, normalization, threshold))
    ref = mask_maps_torch(target, source, normalization, threshold)
    for name in ("difference", "soft", "mask"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("normalization", ["paper", "mean_ratio"])
def interpreted_test_mask_kernel_is_bitwise_equal_when_sums_are_exact(normalization):
    """Dyadic inputs (multiples of 1/4, n * C a power of two) make every sum exact in any order:
    then the kernel and the torch path must agree bit for bit, outlier clamp included."""
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 12, 20)
    target = torch.randint(-8, 8, shape, generator=g) / 4
    source = torch.randint(-8, 8, shape, generator=g) / 4
    source[:, :, :, 3, 5] += 64.0  # an outlier per image, above mean + 3 std
    ref = mask_maps_torch(target, source, normalization)
    d = ref.difference.flatten(1)
    assert (d.amax(1) > d.mean(1) + 3 * d.std(1, unbiased=False)).all()  # the paper clamp is active
    ours = _kernel_maps(target, source, normalization, block_pixels=64)
    assert torch.equal(ours.difference, ref.difference)
    assert torch.equal(ours.soft, ref.soft)
    assert torch.equal(ours.mask, ref.mask)
    attained = ref.soft[1, 4, 7].item()  # a threshold some pixels sit exactly on: soft > threshold, not >=
    assert torch.equal(_kernel_maps(target, source, normalization, attained).mask,
                       mask_maps_torch(target, source, normalization, attained).mask)


@pytest.mark.parametrize("normalization", ["paper", "mean_ratio"])
def interpreted_test_mask_kernel_zero_map(normalization):
    target, _ = _eps_pair((2, 2, 4, 10, 6), torch.float16)
    ours = _kernel_maps(target, target.clone(), normalization)
    assert not ours.difference.any() and not ours.soft.any() and not ours.mask.any()


def interpreted_test_mask_kernel_strided_inputs():
    """Views with free batch/sample/channel strides are read in place; (h, w) not contiguous is copied."""
    target, source = _eps_pair((2, 4, 4, 11, 7), torch.float32)
    sliced_t, sliced_s = target[:, ::2], source[:, 1::2]  # every other sample
    ours = _kernel_maps(sliced_t, sliced_s, block_pixels=16)
    _assert_maps_agree(ours, mask_maps_torch(sliced_t, sliced_s), 0.5)
    flipped_t, flipped_s = target.transpose(-1, -2), source.transpose(-1, -2)
    ours = _kernel_maps(flipped_t, flipped_s)
    _assert_maps_agree(ours, mask_maps_torch(flipped_t, flipped_s), 0.5)


def interpreted_test_mask_kernel_refuses_bad_input():
    """Plain TypeError / ValueError from the kernel file, not diffedit's errors."""
    target, source = _eps_pair((1, 1, 4, 8, 8), torch.float32)
    assert kernel_mask.available()
    kernel_mask.check_inputs(target, source)
    with pytest.raises(TypeError):
        kernel_mask.check_inputs(target.double(), source.double())
    for error, args, kwargs in [(ValueError, (target, source[..., :7]), {}), (ValueError, (target[0], source[0]), {}),
                                (ValueError, (target, source, "median"), {}),
                                (TypeError, (target.double(), source.double()), {}),
                                (ValueError, (target, source), {"block_pixels": 48})]:
        with pytest.raises(error) as refusal:
            kernel_mask.mask_reduction(*args, **kwargs)
        assert not isinstance(refusal.value, ParameterError)
    with pytest.raises(ValueError):
        kernel_mask.mask_reduction_reference(target, source, "median")


# --- dispatch -------------------------------------------------------------------------------

@pytest.fixture
def spies(monkeypatch):
    """Count the calls that reach each kernel (the wrapped functions still run)."""
    calls = {"attention": 0, "mask": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernel_attention, "attention", counting("attention", kernel_attention.attention))
    monkeypatch.setattr(kernel_mask, "mask_reduction", counting("mask", kernel_mask.mask_reduction))
    monkeypatch.delenv("DIFFEDIT_MASK_KERNEL", raising=False)
    monkeypatch.delenv("DIFFEDIT_ATTENTION", raising=False)
    yield calls
    attention_module.set_attention_backend(None)


def interpreted_test_mask_dispatch(spies, monkeypatch):
    target, source = _eps_pair((2, 2, 4, 9, 11), torch.float32)
    ref = mask_maps_torch(target, source)
    auto = mask_maps(target, source)  # CPU tensors: torch, even with the interpreter loaded
    assert spies["mask"] == 0 and torch.equal(auto.soft, ref.soft) and torch.equal(auto.mask, ref.mask)
    _assert_maps_agree(mask_maps(target, source, backend="triton"), ref, 0.5)
    assert spies["mask"] == 1
    monkeypatch.setenv("DIFFEDIT_MASK_KERNEL", "triton")
    _assert_maps_agree(mask_maps(target, source), ref, 0.5)
    assert spies["mask"] == 2
    assert torch.equal(mask_maps(target, source, backend="torch").soft, ref.soft)  # the argument wins
    assert spies["mask"] == 2
    with pytest.raises(ParameterError, match="mask kernel cannot serve .* float16, bfloat16 or float32"):
        mask_maps(target.double(), source.double())  # "triton" forced on a dtype it cannot serve
    monkeypatch.setenv("DIFFEDIT_MASK_KERNEL", "cuda")
    with pytest.raises(ParameterError, match="DIFFEDIT_MASK_KERNEL='cuda' is not a backend"):
        mask_maps(target, source)
    with pytest.raises(ParameterError, match="unknown mask backend 'fast'"):
        mask_maps(target, source, backend="fast")
    with pytest.raises(ParameterError):
        mask_maps(target, source[:, :1], backend="torch")


def interpreted_test_attention_dispatch(spies, monkeypatch):
    q, k, v = _qkv(1, 2, 40, 20, 77, torch.float32)
    expected = kernel_attention.attention_reference(q, k, v, 2)
    torch.testing.assert_close(attention_module.attention(q, k, v, 2), expected, atol=1e-5, rtol=1e-5)
    assert spies["attention"] == 0  # auto on CPU: torch
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "triton")
    torch.testing.assert_close(attention_module.attention(q, k, v, 2, upcast=True), expected, atol=1e-5, rtol=1e-5)
    assert spies["attention"] == 1
    attention_module.set_attention_backend("torch")  # the override wins over the variable
    attention_module.attention(q, k, v, 2)
    assert spies["attention"] == 1
    attention_module.set_attention_backend("triton")
    with pytest.raises(ParameterError, match="attention kernel cannot serve .* float16, bfloat16 and float32"):
        attention_module.attention(q.double(), k.double(), v.double(), 2)


def _run(code: str, env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "DIFFEDIT_ATTENTION", "DIFFEDIT_MASK_KERNEL")}
    env.update(CUDA_VISIBLE_DEVICES="", **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


DISPATCH_WITHOUT_KERNELS = """
    import torch
    from diffedit.models.attention import attention, set_attention_backend
    from diffedit.errors import ParameterError
    from diffedit.mask_maps import mask_maps, mask_maps_torch
    t = torch.randn(1, 2, 4, 6, 6); s = t + torch.randn(1, 2, 4, 6, 6)
    assert torch.equal(mask_maps(t, s).soft, mask_maps_torch(t, s).soft)
    x = torch.randn(1, 5, 8)
    assert attention(x, x, x, heads=2).shape == (1, 5, 8)
    for force in (lambda: mask_maps(t, s, backend="triton"),
                  lambda: (set_attention_backend("triton"), attention(x, x, x, heads=2))):
        try:
            force()
        except ParameterError as error:
            print("refused:", error)
    """


def test_cpu_without_interpreter_falls_back_to_torch(tmp_path):
    code = DISPATCH_WITHOUT_KERNELS + """
    from diffedit.kernels import attention as ka, mask_reduction as km
    print("kernels available:", ka.INTERPRETED, ka.available(), km.available())
    """
    result = _run(code, {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused:") == 2
    assert result.stdout.count("must be on one CUDA device (or the CPU under TRITON_INTERPRET=1)") == 2
    assert "kernels available: False False False" in result.stdout


def test_everything_works_without_triton(tmp_path):
    """A `triton` that fails to import, first on sys.path: diffedit imports, the torch paths run,
    forcing Triton raises the project's error; kernels/ imported as a top-level package is inert."""
    fake = tmp_path / "hidden" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('triton hidden by the test')\n")
    code = DISPATCH_WITHOUT_KERNELS + f"""
    import diffedit, diffedit.kernels
    try:
        import triton
    except ImportError:
        print("triton hidden")
    import sys
    sys.path.insert(0, {str(REPO)!r})
    import kernels
    assert kernels.__doc__ and not [name for name in vars(kernels) if not name.startswith("__")]
    assert "triton" not in sys.modules
    print("top-level kernels inert")
    """
    result = _run(code, {"PYTHONPATH": str(fake.parent), "TRITON_INTERPRET": "1"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused:") == 2 and result.stdout.count("Triton cannot be imported") == 2
    assert "triton hidden" in result.stdout and "top-level kernels inert" in result.stdout


def test_one_chooser_for_both_kernels(monkeypatch):
    """diffedit.devices decides Triton or torch for both kernels: the caller's choice, else the
    kind's environment variable, else "auto"; unknown names are refused in one sentence."""
    from diffedit.devices import choose_kernel, kernel_backend

    x = torch.zeros(1, 2, 4, 3, 3)
    for kind, variable in (("attention", "DIFFEDIT_ATTENTION"), ("mask", "DIFFEDIT_MASK_KERNEL")):
        monkeypatch.delenv(variable, raising=False)
        assert kernel_backend(kind) == "auto"
        monkeypatch.setenv(variable, " Torch ")
        assert kernel_backend(kind) == "torch" and kernel_backend(kind, "triton") == "triton"  # the argument wins
        monkeypatch.setenv(variable, "cuda")
        with pytest.raises(ParameterError, match=f"^{variable}='cuda' is not a backend; use one of auto, torch, triton"):
            kernel_backend(kind)
        with pytest.raises(ParameterError, match=f"^unknown {kind} backend 'fast'; use one of auto, torch, triton"):
            kernel_backend(kind, "fast")
        monkeypatch.setenv(variable, "auto")
        assert choose_kernel(kind, (x,)) is None and choose_kernel(kind, (x,), "torch") is None  # CPU: torch
    with pytest.raises(ParameterError, match="unknown attention backend"):
        attention_module.set_attention_backend("fast")


def test_bench_exits_with_one_line_without_cuda(tmp_path):
    result = _run("from diffedit.kernels.bench_gpu import main; main([])", {}, tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["bench_gpu: no CUDA device found; this benchmark needs an "
                                                  "NVIDIA GPU with Triton."]
    from diffedit.kernels.bench_gpu import attention_shapes
    shapes = attention_shapes(512) + attention_shapes(768)
    assert {(s.n_q, s.head_dim) for s in shapes if s.n_k == s.n_q} == {
        (4096, 40), (1024, 80), (256, 160), (64, 160), (9216, 40), (2304, 80), (576, 160), (144, 160)}
    assert {s.n_k for s in shapes if s.n_k != s.n_q} == {77}


def interpreted_test_bench_functions_on_the_cpu(capsys):
    """The benchmark's measuring code, run once per shape on the CPU with a fixed 0.5 ms timer."""
    from diffedit.kernels.bench_gpu import AttentionShape, bench_attention, bench_mask

    def timer(fn):
        fn()
        return 0.5

    shapes = [AttentionShape(1, 2, 40, 64, 64), AttentionShape(2, 1, 80, 36, 77)]
    rows = bench_attention(shapes, torch.float16, device="cpu", timer=timer)
    flops = [4 * 1 * 2 * 64 * 64 * 40, 4 * 2 * 1 * 36 * 77 * 80]
    assert [row["triton"] for row in rows] == pytest.approx([f / 0.5e9 for f in flops])  # TFLOP/s
    assert all(row["error"] < 2e-3 for row in rows)
    row = bench_mask((1, 2, 4, 8, 8), torch.float16, device="cpu", timer=timer)
    assert row["torch"] == pytest.approx((2 * 2 * 4 * 64 * 2 + 64 * 9) / 0.5e6) and row["error"] < 1e-5
    printed = capsys.readouterr().out
    assert "cross B=2 h=1 d= 80 Nq=   36 Nk=   77" in printed and "GB/s" in printed


# --- the kernels inside the models ----------------------------------------------------------

def interpreted_test_kernels_in_tiny_unet_and_diffedit_mask(spies):
    """The tiny UNet with every attention served by the kernel, and a tiny DiffEdit mask (noise
    predictions for two prompts over two noise samples, then the mask kernel), give the torch
    path's results."""
    from diffedit.models.config import PRESETS
    from diffedit.models.unet import Attention, UNet

    config = PRESETS["tiny"].unet
    torch.manual_seed(0)
    unet = UNet(config).eval()
    samples, side = 2, 8
    latents = torch.randn(samples, config.in_channels, side, side)
    target_text = torch.randn(1, 77, config.cross_attention_dim).expand(samples, -1, -1)
    source_text = torch.randn(1, 77, config.cross_attention_dim).expand(samples, -1, -1)

    def noise_predictions(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        attention_module.set_attention_backend(backend)
        try:
            with torch.no_grad():
                return tuple(unet(latents, 500, text).unsqueeze(0) for text in (target_text, source_text))
        finally:
            attention_module.set_attention_backend(None)

    eps_torch = noise_predictions("torch")
    assert spies["attention"] == 0
    eps_triton = noise_predictions("triton")
    layers = sum(isinstance(module, Attention) for module in unet.modules())
    assert layers >= 4 and spies["attention"] == 2 * layers  # every attention of both forwards
    for ours, ref in zip(eps_triton, eps_torch):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)

    ours = mask_maps(*eps_triton, backend="triton")
    assert spies["mask"] == 1
    _assert_maps_agree(ours, mask_maps_torch(*eps_triton), 0.5)  # the mask kernel on the same inputs
    # the whole torch path: the rescale to [0, 1] divides by the span of a small map (~1e-2),
    # which amplifies the ~1e-7 differences of the noise predictions (measured: 1.5e-5)
    ref = mask_maps(*eps_torch, backend="torch")
    torch.testing.assert_close(ours.soft, ref.soft, atol=2e-4, rtol=0)
    decided = (ref.soft - 0.5).abs() > 2e-4
    assert torch.equal(ours.mask[decided], ref.mask[decided]) and ref.mask.any()
