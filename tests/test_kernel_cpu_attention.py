"""The CPU attention kernel (kernels/cpu_attention.c, .py) against fp32 attention and torch's own bf16
attention, and the rule that chooses it.

The kernel builds with the machine's C compiler: on a CPU with AVX512-BF16 these tests run its fast
path (the one "auto" chooses), elsewhere its portable C path (same packing, blocking, softmax and
threads; "auto" never chooses it there). The first line of each parity failure names the path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffedit.devices import choose_kernel
from diffedit.errors import ParameterError
from diffedit.kernels import cpu_attention as kernel
from diffedit.models import attention as attention_module

PATH = kernel.path()
# |out - ref| against fp32 attention of the same bf16 inputs: the kernel rounds the softmax
# numerators and the output to bf16 (relative 2^-9 each), like torch's bf16 attention, so it must be
# within ERROR_VS_TORCH times torch's own error plus ATOL (measured: 0.8x-1.0x torch's error).
ERROR_VS_TORCH, ATOL = 1.5, 2e-3

SHAPES = [  # (batch, heads, queries, keys, head_dim): SD's shapes scaled down, and every irregular edge
    (2, 8, 64, 64, 40), (2, 8, 64, 77, 40), (1, 4, 33, 33, 80), (2, 2, 16, 16, 160), (1, 5, 40, 40, 64),
    (1, 1, 64, 64, 512), (3, 2, 9, 50, 12), (1, 3, 1, 1, 7), (2, 1, 17, 31, 13), (1, 2, 8, 97, 50), (1, 1, 130, 5, 2),
    (1, 2, 19, 45, 88), (2, 1, 11, 21, 33),  # a 256-bit last vector (head dim 40's path) at c0 = 48; one real column
]


def qkv(batch, heads, queries, keys, head_dim, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (scale * torch.randn(batch, n, heads * head_dim, generator=g)).bfloat16()
    return make(queries), make(keys), make(keys)


def torch_bf16(q, k, v, heads):
    split = lambda x: x.unflatten(2, (heads, -1)).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp32_attention_as_closely_as_torch_bf16(shape):
    q, k, v = qkv(*shape)
    heads = shape[1]
    ref = kernel.reference(q, k, v, heads)
    out = kernel.attention(q, k, v, heads)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    error = (out.float() - ref).abs().max().item()
    torch_error = (torch_bf16(q, k, v, heads).float() - ref).abs().max().item()
    assert error <= ERROR_VS_TORCH * torch_error + ATOL, f"{PATH} path: error {error:.4f}, torch bf16 {torch_error:.4f}"


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES[::2], ids=lambda s: "x".join(map(str, s)))
def test_portable_path_matches_too(shape):
    """The portable C path, built beside the machine's own (the fast one where the CPU has it)."""
    portable = kernel.build(("-DPORTABLE_ONLY",))
    assert portable.kernel_path() == b"portable"
    q, k, v = qkv(*shape)
    ref = kernel.reference(q, k, v, shape[1])
    error = (kernel.attention(q, k, v, shape[1], built=portable).float() - ref).abs().max().item()
    torch_error = (torch_bf16(q, k, v, shape[1]).float() - ref).abs().max().item()
    assert error <= ERROR_VS_TORCH * torch_error + ATOL, f"portable path: error {error:.4f}, torch bf16 {torch_error:.4f}"


@torch.no_grad()
def test_peaked_softmax_and_large_scores():
    """Scores up to ~1e3 (inputs x 6): the row maximum is subtracted before exp, nothing overflows."""
    q, k, v = qkv(2, 2, 24, 40, 40, seed=1, scale=6.0)
    out, ref = kernel.attention(q, k, v, 2).float(), kernel.reference(q, k, v, 2)
    assert torch.isfinite(out).all()
    torch_error = (torch_bf16(q, k, v, 2).float() - ref).abs().max().item()
    assert (out - ref).abs().max().item() <= ERROR_VS_TORCH * torch_error + ATOL * 6


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_bits_for_every_thread_count(dtype):
    """Each output element is computed by one thread in one order: 1, 2 or 3 threads give the same bits
    (the bf16 kernel and the fp32 one, cpu_attention_fp32.c)."""
    q, k, v = (x.to(dtype) for x in qkv(2, 3, 45, 70, 40, seed=2))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kernel.attention(q, k, v, 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@torch.no_grad()
def test_strided_views_read_in_place():
    """q, k, v split from one fused projection (token stride 3C), k and v broadcast over the batch
    (batch stride 0), and a last dimension that is not contiguous: the same result as contiguous copies."""
    heads, d = 2, 24
    fused = torch.randn(2, 19, 3 * heads * d).bfloat16()
    q, k, v = fused.chunk(3, dim=-1)
    expect = kernel.attention(q.contiguous(), k.contiguous(), v.contiguous(), heads)
    assert torch.equal(kernel.attention(q, k, v, heads), expect)
    k1, v1 = k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1)
    assert k1.stride(0) == 0
    assert torch.equal(kernel.attention(q, k1, v1, heads), kernel.attention(q, k1.contiguous(), v1.contiguous(), heads))
    q_t = q.contiguous().transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert q_t.stride(-1) != 1 and torch.equal(kernel.attention(q_t, k, v, heads), expect)


def test_refuses_in_one_sentence_what_it_cannot_serve():
    q, k, v = qkv(1, 2, 4, 4, 8)
    cases = [
        ((q.float(), k, v, 2), ValueError, r"bf16 or fp32 \(all three alike\)"),
        ((q.half(), k.half(), v.half(), 2), ValueError, r"bf16 or fp32 \(all three alike\), got torch.float16"),
        ((q, k, v, 3), ValueError, "do not split into 3 heads"),
        ((q, k[:, :2], v, 2), ValueError, "shapes do not match"),
        ((q, k[:, :0], v[:, :0], 2), ValueError, "zero keys"),
        ((q[0], k, v, 2), ValueError, r"\(batch, tokens, heads \* head_dim\)"),
        ((None, k, v, 2), TypeError, "must be tensors"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            kernel.attention(*args)
    qg = q.float().requires_grad_().bfloat16()
    with pytest.raises(ValueError, match="no backward pass"):
        kernel.attention(qg, k, v, 2)
    with pytest.raises(ValueError, match="upcast"):
        kernel.attention(q, k, v, 2, upcast=True)


# ---------------------------------------------------------------------- the rule that chooses it

def test_auto_chooses_the_kernel_only_for_fast_inference(monkeypatch):
    monkeypatch.delenv("DIFFEDIT_ATTENTION", raising=False)
    q, k, v = qkv(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert choose_kernel("attention", (q, k, v, 2)) is (kernel if kernel.chosen(torch.bfloat16) else None)
        expect_fp32 = kernel if kernel.chosen(torch.float32) else None                  # fp32: AVX2-only CPUs
        assert choose_kernel("attention", (q.float(), k.float(), v.float(), 2)) is expect_fp32
        assert choose_kernel("attention", (q.half(), k.half(), v.half(), 2)) is None
    qg = q.float().requires_grad_().bfloat16()
    assert choose_kernel("attention", (qg, k, v, 2)) is None                              # training: torch
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "torch")
    assert choose_kernel("attention", (q, k, v, 2)) is None
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "cpu")                                       # forced: any path
    assert choose_kernel("attention", (q, k, v, 2)) is kernel
    assert choose_kernel("attention", (q.float(), k.float(), v.float(), 2)) is kernel
    with pytest.raises(ParameterError, match="^the CPU attention kernel cannot serve these tensors: .*bf16 or fp32.*; "
                                             "choose 'torch' or 'auto'"):
        choose_kernel("attention", (q.half(), k.half(), v.half(), 2))
    with pytest.raises(ParameterError, match="unknown mask backend 'cpu'"):
        choose_kernel("mask", (q,), "cpu")


def test_bf16_rule_leaves_amx_cpus_to_torch(monkeypatch):
    """bf16: the kernel where its AVX512-BF16 path builds, unless torch's SDPA multiplies on AMX tiles
    (measured 1.1x-7x faster than the kernel there, benchmarks/README.md)."""
    q, k, v = qkv(1, 2, 8, 8, 8)
    try:
        for amx in (False, True):
            monkeypatch.setattr(kernel, "torch_uses_amx", lambda amx=amx: amx)
            kernel.chosen.cache_clear()
            assert kernel.chosen(torch.bfloat16) is (kernel.fast() and not amx), amx
            with torch.no_grad():
                assert choose_kernel("attention", (q, k, v, 2)) is (kernel if kernel.fast() and not amx else None)
            assert choose_kernel("attention", (q, k, v, 2), "cpu") is kernel                 # forced: still the kernel
    finally:
        monkeypatch.undo()
        kernel.chosen.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert kernel.torch_uses_amx() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")                                   # an older torch: no AMX
    assert kernel.torch_uses_amx() is False


@torch.no_grad()
def test_model_attention_routes_by_rule(monkeypatch):
    """diffedit.models.attention: the forced kernel gives the kernel's bits; causal and upcast stay torch's."""
    q, k, v = qkv(2, 4, 20, 20, 16, seed=3)
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "cpu")
    assert torch.equal(attention_module.attention(q, k, v, heads=4), kernel.attention(q, k, v, 4))
    assert attention_module.backend_name(torch.bfloat16) == f"cpu kernel ({PATH})"
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "torch")
    expect_causal = attention_module.attention(q, k, v, heads=4, causal=True)
    expect_upcast = attention_module.attention(q, k, v, heads=4, upcast=True)
    assert attention_module.backend_name(torch.bfloat16) == "torch"
    monkeypatch.setenv("DIFFEDIT_ATTENTION", "cpu")
    assert torch.equal(attention_module.attention(q, k, v, heads=4, causal=True), expect_causal)
    with pytest.raises(ParameterError, match="upcast"):                 # forced: says why, no silent fallback
        attention_module.attention(q, k, v, heads=4, upcast=True)
    monkeypatch.delenv("DIFFEDIT_ATTENTION")
    assert torch.equal(attention_module.attention(q, k, v, heads=4, upcast=True), expect_upcast)  # auto: torch
    assert attention_module.backend_name(torch.float32) == ("cpu kernel (avx2_fma)" if kernel.chosen(torch.float32)
                                                            else "torch")
    assert attention_module.backend_name(torch.bfloat16) == ("cpu kernel (avx512_bf16)" if kernel.chosen(torch.bfloat16)
                                                             else "torch")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mapped libraries (Linux)")
def test_threads_are_torchs_own():
    """The kernel's OpenMP is the runtime torch loaded: one OpenMP library in the process, not two pools."""
    kernel.library()
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes


def _child(code: str, env: dict, tmp_path) -> subprocess.CompletedProcess:
    full = {**os.environ, "DIFFEDIT_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_built_once_into_the_cache_and_without_a_compiler_auto_falls_back(tmp_path):
    code = """
import torch
from diffedit.devices import choose_kernel
from diffedit.errors import ParameterError
from diffedit.kernels import cpu_attention as kernel
q = torch.randn(1, 4, 8).bfloat16()
with torch.no_grad():
    print("auto:", choose_kernel("attention", (q, q, q, 2)) is not None)
    try:
        choose_kernel("attention", (q, q, q, 2), "cpu")
        print("forced: kernel")
    except ParameterError as error:
        print("forced:", error)
"""
    built = _child(code, {}, tmp_path)
    assert built.returncode == 0, built.stderr
    assert f"auto: {kernel.chosen(torch.bfloat16)}" in built.stdout and "forced: kernel" in built.stdout
    files = sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir())
    assert len(files) == 1 and files[0].startswith("cpu_attention-") and files[0].endswith(".so")  # nothing half-built
    stamp = (tmp_path / "cache" / "kernels" / files[0]).stat().st_mtime_ns
    again = _child(code, {}, tmp_path)                                                # cached: not rebuilt
    assert again.returncode == 0 and (tmp_path / "cache" / "kernels" / files[0]).stat().st_mtime_ns == stamp

    no_compiler = _child(code, {"CC": str(tmp_path / "no-such-cc")}, tmp_path / "other")
    assert no_compiler.returncode == 0, no_compiler.stderr
    lines = no_compiler.stdout.strip().splitlines()
    assert lines[0] == "auto: False"
    assert lines[1].startswith("forced: the CPU attention kernel cannot serve these tensors: no C compiler")
    assert not (tmp_path / "other" / "cache").exists()

    no_openmp = tmp_path / "cc-without-openmp"                                       # refuses -fopenmp only
    no_openmp.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    no_openmp.chmod(0o755)
    serial = _child(code + "print('path:', kernel.path())", {"CC": str(no_openmp)}, tmp_path / "serial")
    assert serial.returncode == 0, serial.stderr
    assert "forced: kernel" in serial.stdout and f"path: {kernel.path()}" in serial.stdout  # built without OpenMP
    assert len(list((tmp_path / "serial" / "cache" / "kernels").iterdir())) == 1

    failing = _child(code, {"CC": "false"}, tmp_path / "failing")                    # a compiler that fails
    assert failing.returncode == 0, failing.stderr
    assert "forced: the CPU attention kernel cannot serve these tensors: false could not build" in failing.stdout
    assert list((tmp_path / "failing" / "cache" / "kernels").iterdir()) == []        # no half-written library
