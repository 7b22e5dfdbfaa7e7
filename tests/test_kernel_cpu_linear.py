"""The fp32 CPU linear kernel (kernels/cpu_linear_fp32.c through kernels/cpu_linear.py) against
float64 and torch's F.linear, and the rule that chooses it.

On a CPU with AVX2 and FMA these tests run its fast path, elsewhere its portable C path; both are
built and compared where the fast one exists. "auto" takes it for fp32 inference only where torch's
own CPU kernels are AVX2 ones (measured faster than MKL and oneDNN there: benchmarks/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffedit.kernels import cpu_linear as kernel

PATH = kernel.path()
# |y - ref| / max|ref| against float64: the kernel sums in fp32 in another order than torch; it must be
# within ERROR_VS_TORCH times F.linear's own error plus RTOL (measured: 0.5x-2x F.linear's, ~1e-7 relative)
ERROR_VS_TORCH, RTOL = 3.0, 1e-6

SHAPES = [  # (rows M, in K, out N): every edge of the 6 x 16 tiles, the 384-wide K chunks, the 72-row blocks
    (1, 1, 16), (5, 3, 16), (6, 17, 32), (7, 40, 48), (13, 383, 16), (71, 384, 80), (72, 385, 64), (73, 800, 144),
    (145, 77, 272), (2, 1280, 160), (300, 320, 320),
]


def operands(m, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    return x, w, torch.randn(n, generator=g) if bias else None


def relative(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
@pytest.mark.parametrize("portable", [False, True], ids=["machine-path", "portable"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_as_closely_as_f_linear(shape, bias, portable):
    built = kernel.build(("-DPORTABLE_ONLY",)) if portable else None
    x, w, b = operands(*shape, bias=bias)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    out = kernel.linear(x, kernel.pack(w), b, built=built)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    error, torch_error = relative(out, ref), relative(F.linear(x, w, b), ref)
    path = "portable" if portable else PATH
    assert error <= ERROR_VS_TORCH * torch_error + RTOL, f"{path} path: error {error:.2e}, F.linear {torch_error:.2e}"


@torch.no_grad()
def test_same_bits_for_every_thread_count_and_leading_dimensions():
    """Each output element is computed by one thread in one order (the blocks do not depend on the
    thread count); a (..., K) input is its rows."""
    x, w, b = operands(150, 700, 96, seed=1)
    panels, threads = kernel.pack(w), torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kernel.linear(x, panels, b))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert torch.equal(kernel.linear(x.reshape(3, 5, 10, 700), panels, b).reshape(150, 96), outs[0])


@torch.no_grad()
@pytest.mark.parametrize("flags", [("-DWBLOCK=1",), ("-DWBLOCK=(1L<<40)", "-DMIN_ITEMS=1"), ("-DMIN_ITEMS=1000",),
                                   ("-DMC=6", "-DWBLOCK=40000")], ids=lambda f: " ".join(f))
def test_blocking_changes_no_bit(flags):
    """How rows and panels are cut into work items (WBLOCK, MIN_ITEMS, MC) decides speed only: every
    output element is the same sum in the same order, with any blocks (one panel each, one block of
    everything, blocks of one tile)."""
    built = kernel.build(flags)
    for shape in [(1, 5, 16), (73, 800, 144), (145, 77, 272), (300, 320, 320), (2, 1280, 160), (500, 64, 1024)]:
        x, w, b = operands(*shape, seed=5)
        panels = kernel.pack(w)
        assert torch.equal(kernel.linear(x, panels, b, built=built), kernel.linear(x, panels, b)), shape


@torch.no_grad()
def test_strided_and_broadcast_inputs():
    x, w, b = operands(40, 64, 32, seed=2)
    panels, expect = kernel.pack(w), kernel.linear(x, kernel.pack(w), b)
    wide = torch.zeros(40, 3 * 64)
    wide[:, 64:128] = x  # rows read in place with their stride
    assert torch.equal(kernel.linear(wide[:, 64:128], panels, b), expect)
    assert torch.equal(kernel.linear(torch.zeros(40, 128)[:, ::2].copy_(x), panels, b), expect)  # copied first
    row = x[:1].expand(40, -1)  # row stride 0
    assert torch.equal(kernel.linear(row, panels, b), kernel.linear(row.contiguous(), panels, b))


def test_pack_round_trip_empty_inputs_and_refusals():
    x, w, b = operands(4, 24, 32, seed=3)
    assert torch.equal(kernel.unpack(kernel.pack(w)), w)
    one_panel = w[:16].clone()  # unpacked contiguous, as a saved weight must be
    unpacked = kernel.unpack(kernel.pack(one_panel))
    assert torch.equal(unpacked, one_panel) and unpacked.is_contiguous()
    panels = kernel.pack(w)
    assert kernel.linear(x[:0], panels, b).shape == (0, 32)
    assert torch.equal(kernel.linear(x[0], panels, b), kernel.linear(x, panels, b)[0])  # a single vector
    assert torch.equal(kernel.linear(torch.zeros(3, 0), kernel.pack(torch.zeros(16, 0)), torch.arange(16.0)),
                       torch.arange(16.0).expand(3, 16))  # K = 0: the bias alone
    refusals = [
        (lambda: kernel.pack(torch.randn(10, 4)), "multiple of 16"),
        (lambda: kernel.pack(w.double()), "fp32 weights"),
        (lambda: kernel.linear(x.double(), panels, b), "fp32 CPU tensors"),
        (lambda: kernel.linear(x, w, b), "must come from pack"),
        (lambda: kernel.linear(x[:, :20], panels, b), "x has 20 features, the weight takes 24"),
        (lambda: kernel.linear(x, panels, b[:16]), "contiguous fp32 vector of 32"),
        (lambda: kernel.linear(x.requires_grad_(), panels, b), "no backward pass"),
    ]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_auto_rule_follows_the_cpu_capability(monkeypatch):
    kernel.chosen.cache_clear()
    try:
        for capability, expect in (("AVX2", PATH == "avx2_fma"), ("AVX512", False), ("DEFAULT", False)):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            kernel.chosen.cache_clear()
            assert kernel.chosen() is expect, capability
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        monkeypatch.setattr(kernel, "path", lambda: "portable")  # built without its fast path: never chosen
        kernel.chosen.cache_clear()
        assert kernel.chosen() is False
    finally:
        kernel.chosen.cache_clear()


def test_without_a_compiler_forcing_the_kernel_is_one_sentence_and_auto_falls_back(tmp_path):
    """The command line with CC pointing nowhere: DIFFEDIT_CPU_LINEAR=kernel is refused in one
    sentence with status 2 before anything is written; "auto" runs on oneDNN and builds nothing."""
    image = Path(__file__).resolve().parents[1] / "weights" / "examples" / "red-circle.png"
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DIFFEDIT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "diffedit", "mask", str(image), "--source", "a red circle",
               "--target", "a blue circle", "--out", str(tmp_path / "mask.png")]
    forced = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**env, "DIFFEDIT_CPU_LINEAR": "kernel"})
    assert forced.returncode == 2
    assert forced.stderr.strip() == (f"diffedit: error: DIFFEDIT_CPU_LINEAR='kernel' cannot be served: no C compiler "
                                     f"('{tmp_path / 'no-such-cc'}') to build the CPU linear kernel; use 'auto' or "
                                     "'torch'.")
    assert not (tmp_path / "mask.png").exists()
    auto = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, "DIFFEDIT_CPU_LINEAR": "auto"})
    assert auto.returncode == 0, auto.stderr
    assert (tmp_path / "mask.png").is_file() and not (tmp_path / "cache").exists()
