"""Fused attention on the CPU: the C kernels of cpu_attention.c (bf16) and cpu_attention_fp32.c
(fp32), each built on first use.

Why and how (algorithm, register tiles, memory traffic): the comments at the top of the two C
files. In short, softmax(q k^T * scale) v per head, both products in register tiles (bf16:
VDPBF16PS on AVX512-BF16; fp32: FMA on AVX2) and the softmax of a block of rows held in the core's
caches, where torch's CPU `scaled_dot_product_attention` reaches 14-25 % of an AVX512-BF16 machine's
peak (without AMX) at SD's head dims in bf16, and 30-55 % of an AVX2 machine's in fp32.

Build: on first use, by c_build.py (cached across processes). On a CPU without
the fast path's instructions (AVX512-BF16 for bf16, AVX2 and FMA for fp32) the same source
compiles its portable C path (`path(dtype)` says which), correct but slow. diffedit's "auto" rule
(`chosen(dtype)`) takes the kernel where it was measured faster than torch's SDPA: bf16 where the
AVX512-BF16 path builds and torch cannot use AMX tiles (with AMX, SDPA's flash attention multiplies
on the tiles and was 1.1x-7x faster than the kernel on an Intel Xeon); fp32 where the AVX2 path
builds and torch's own CPU kernels are AVX2 ones (no AVX-512: measured on an AMD Zen 2; on AVX-512
CPUs fp32 stays torch's until measured there).
The tests run whichever paths the machine has.

Tensors in, tensors out: this file imports nothing of diffedit.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import c_build

SOURCES = {torch.bfloat16: Path(__file__).with_name("cpu_attention.c"),
           torch.float32: Path(__file__).with_name("cpu_attention_fp32.c")}
FAST_PATHS = {torch.bfloat16: "avx512_bf16", torch.float32: "avx2_fma"}  # kernel_path() of each fast build
ENTRIES = {torch.bfloat16: "attention_bf16", torch.float32: "attention_fp32"}
PROFILER_NAME = "diffedit::cpu_attention"
MAX_SIZE = 2 ** 26   # tokens, channels, batch: the kernels' int index products (e.g. key x 16) stay below 2^31

def build(extra_flags: tuple[str, ...] = (), dtype: torch.dtype = torch.bfloat16) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel for `dtype`; `extra_flags` e.g.
    ("-DPORTABLE_ONLY",) builds the portable path on a machine that has the fast one (the tests run both)."""
    library = c_build.load(SOURCES[dtype], "CPU attention kernel", tuple(extra_flags))
    entry = getattr(library, ENTRIES[dtype])
    entry.restype = ctypes.c_int
    entry.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 8 + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
    return library


def library(dtype: torch.dtype = torch.bfloat16) -> ctypes.CDLL:
    """The built kernel for `dtype` (built once per process at first use); RuntimeError when it cannot be built."""
    return c_build.once(("attention", dtype), lambda: build(dtype=dtype))


@functools.cache  # asked on every attention call under "auto": once the library is loaded, it is fixed
def path(dtype: torch.dtype = torch.bfloat16) -> str:
    """"avx512_bf16" / "avx2_fma" (the fast path of `dtype`) or "portable" (plain C), as built for this CPU."""
    return library(dtype).kernel_path().decode()


def fast(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the kernel for `dtype` builds here with its fast path."""
    try:
        return path(dtype) == FAST_PATHS[dtype]
    except RuntimeError:
        return False


def torch_uses_amx() -> bool:
    """True when torch's CPU kernels (SDPA's flash attention among them) can run bf16 products on AMX
    tiles here: the CPU has them and the OS lets this process use them."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):  # a torch without these probes
        return False


@functools.cache
def chosen(dtype: torch.dtype) -> bool:
    """diffedit's "auto" rule, fixed per machine kind: the kernel where it was measured faster than
    torch's SDPA (module docstring): bf16 on its AVX512-BF16 path unless torch's SDPA runs on AMX
    tiles; fp32 on its AVX2 path where torch's CPU kernels are AVX2 too."""
    if dtype == torch.float32:
        return fast(dtype) and torch.backends.cpu.get_cpu_capability() == "AVX2"
    return dtype == torch.bfloat16 and fast(dtype) and not torch_uses_amx()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> None:
    """One-sentence TypeError / ValueError for what the kernel cannot serve (cheap: builds nothing)."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise TypeError("q, k and v must be tensors")
    if any(x.device.type != "cpu" for x in (q, k, v)):
        raise ValueError("the CPU attention kernel takes CPU tensors only")
    if q.dtype not in SOURCES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the CPU attention kernel takes bf16 or fp32 (all three alike), got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if upcast and q.dtype != torch.float32:
        raise ValueError("the CPU attention kernel computes bf16 attention with fp32 sums, not upcast (fp32) "
                         "attention of bf16 inputs: that goes to torch")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("the CPU attention kernel has no backward pass; it serves inference only")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k and v must be (batch, tokens, heads * head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads < 1 or q.shape[2] % heads:
        raise ValueError(f"{q.shape[2]} channels do not split into {heads} heads")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined")
    if q.shape[2] == 0:
        raise ValueError("q, k and v have no channels (head dimension 0)")
    if max(q.shape[0], q.shape[1], k.shape[1], q.shape[2], heads) > MAX_SIZE:
        raise ValueError(f"the CPU attention kernel takes at most {MAX_SIZE:,} tokens, channels or batch rows "
                         f"(its int indices), got q {tuple(q.shape)}, k {tuple(k.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False,
              built: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head. q: (B, Nq, heads*d), k and v: (B, Nk, heads*d), bf16 -> bf16
    or fp32 -> fp32.

    `upcast` (SD 2's fp32 attention) changes nothing in fp32; of bf16 inputs it is not this kernel's
    arithmetic, and the caller sends it to torch. `built`: a library from `build` (for this dtype)
    instead of this process's `library(dtype)`."""
    check_inputs(q, k, v, heads, upcast)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, queries, channels = q.shape
    head_dim = channels // heads
    out = torch.empty(batch, queries, channels, dtype=q.dtype)
    entry = getattr(built or library(q.dtype), ENTRIES[q.dtype])
    with torch.profiler.record_function(PROFILER_NAME):  # so that torch.profiler sees the C call
        status = entry(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            batch, heads, queries, k.shape[1], head_dim, head_dim ** -0.5, torch.get_num_threads())
    if status == -2:
        raise ValueError(f"the CPU attention kernel refused the sizes q {tuple(q.shape)}, k {tuple(k.shape)}")
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its buffers")
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same attention in fp32 by torch's matmuls (what the tests compare against)."""
    split = lambda x: x.float().unflatten(2, (heads, -1)).transpose(1, 2)  # (B, heads, N, d)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)  # (B, N, heads * d)
