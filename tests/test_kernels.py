"""The Triton kernels (diffedit.kernels) on the CPU, under Triton's interpreter, against the torch paths.

Triton decides interpreter or compiler when a kernel is decorated and reads TRITON_INTERPRET again
at launch, and its own library functions (tl.sum, ...) are decorated when triton is first
imported, which the test oracles (diffusers, transformers) already do. So the interpreter cannot
be switched on inside the suite's process. The kernel tests are named `interpreted_test_*`: those
of each kernel against its torch path are in test_kernel_attention.py and test_kernel_mask.py,
those of the dispatch and of the kernels inside the models below. The suite collects only
`test_kernels_under_the_interpreter`, which runs them all in a child pytest whose environment has
TRITON_INTERPRET=1 from the start. To run them directly:

    TRITON_INTERPRET=1 pytest tests/test_kernel*.py -o python_functions=interpreted_test_

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
from diffedit.mask_maps import mask_maps, mask_maps_torch
from reference_models import interpreted_kernel
from test_kernel_attention import qkv
from test_kernel_mask import assert_maps_agree, eps_pair

REPO = Path(__file__).resolve().parents[1]
KERNEL_TEST_FILES = [str(Path(__file__).with_name(name)) for name in
                     ("test_kernel_attention.py", "test_kernel_mask.py", "test_kernels.py")]
kernel_attention = interpreted_kernel("attention")  # None outside the interpreter's process
kernel_mask = interpreted_kernel("mask_reduction")


@pytest.mark.interpreter
def test_kernels_under_the_interpreter():
    """Every `interpreted_test_*` of the three kernel test files, in a child pytest with TRITON_INTERPRET=1."""
    env = {key: value for key, value in os.environ.items() if key not in ("DIFFEDIT_ATTENTION", "DIFFEDIT_MASK_KERNEL")}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-o", "python_functions=interpreted_test_", *KERNEL_TEST_FILES]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and " failed" not in result.stdout and " skipped" not in result.stdout


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
    target, source = eps_pair((2, 2, 4, 9, 11), torch.float32)
    ref = mask_maps_torch(target, source)
    auto = mask_maps(target, source)  # CPU tensors: torch, even with the interpreter loaded
    assert spies["mask"] == 0 and torch.equal(auto.soft, ref.soft) and torch.equal(auto.mask, ref.mask)
    assert_maps_agree(mask_maps(target, source, backend="triton"), ref, 0.5)
    assert spies["mask"] == 1
    monkeypatch.setenv("DIFFEDIT_MASK_KERNEL", "triton")
    assert_maps_agree(mask_maps(target, source), ref, 0.5)
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
    q, k, v = qkv(1, 2, 40, 20, 77, torch.float32)
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


def test_bench_exits_with_one_line_on_a_gpu_too_old_for_triton(monkeypatch):
    from diffedit.kernels.bench_gpu import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))     # a T4
    with pytest.raises(SystemExit, match=r"compute capability 7\.5\) is too old for Triton's bf16 kernels"):
        main(["--dtypes", "fp16", "bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))     # a P100
    with pytest.raises(SystemExit, match="too old for Triton's fp16 kernels"):
        main(["--dtypes", "fp16"])


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
    assert_maps_agree(ours, mask_maps_torch(*eps_triton), 0.5)  # the mask kernel on the same inputs
    # the whole torch path: the rescale to [0, 1] divides by the span of a small map (~1e-2),
    # which amplifies the ~1e-7 differences of the noise predictions (measured: 1.5e-5)
    ref = mask_maps(*eps_torch, backend="torch")
    torch.testing.assert_close(ours.soft, ref.soft, atol=2e-4, rtol=0)
    decided = (ref.soft - 0.5).abs() > 2e-4
    assert torch.equal(ours.mask[decided], ref.mask[decided]) and ref.mask.any()
