"""The feed-forward block's gated GELU in one pass, fp32 or bf16 on the CPU: the C kernel of
cpu_geglu.c (built on first use by c_build.py).

    y (..., 2 inner) -> y[..., :inner] * gelu(y[..., inner:])   (..., inner)

What and why: the comment at the top of the C file. diffedit runs it where the feed-forward's input
projection runs packed for inference (models/packed_linear.py): in fp32 on diffedit's linear kernel
(the "kernel" backend), in bf16 on oneDNN (the "onednn" backend, CPUs with native bf16). Where the
CPU lacks a dtype's instructions (AVX2 and FMA for fp32, AVX512-BF16 for bf16) the same source
compiles a portable C path for it (`path(dtype)` says which).

Tensors in, tensors out: this file imports nothing of diffedit.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import c_build

SOURCE = Path(__file__).with_name("cpu_geglu.c")
ENTRIES = {torch.float32: "geglu_fp32", torch.bfloat16: "geglu_bf16"}
PROFILER_NAME = "diffedit::cpu_geglu"


def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; `extra_flags` e.g. ("-DPORTABLE_ONLY",)."""
    library = c_build.load(SOURCE, "CPU GEGLU kernel", tuple(extra_flags))
    library.kernel_path_bf16.restype = ctypes.c_char_p
    for entry in ENTRIES.values():
        getattr(library, entry).restype = None
        getattr(library, entry).argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                            ctypes.c_long, ctypes.c_long, ctypes.c_int]
    return library


def library() -> ctypes.CDLL:
    """The built kernel (built once per process at first use); RuntimeError when it cannot be built."""
    return c_build.once("geglu", build)


def available() -> bool:
    """True when the kernel builds here (either path)."""
    try:
        library()
        return True
    except RuntimeError:
        return False


@functools.cache
def path(dtype: torch.dtype = torch.float32) -> str:
    """The path built for `dtype` on this CPU: fp32 "avx2_fma", bf16 "avx512_bf16" (the fast ones), or
    "portable" (plain C)."""
    return (library().kernel_path_bf16 if dtype == torch.bfloat16 else library().kernel_path)().decode()


def geglu(y: torch.Tensor, built: ctypes.CDLL | None = None) -> torch.Tensor:
    """y[..., :inner] * gelu(y[..., inner:]) for an fp32 or bf16 CPU tensor y (..., 2 inner), gelu the
    exact (erf) one; in bf16 rounded where torch rounds. `built`: a library from `build` instead of
    this process's `library()`."""
    if y.dtype not in ENTRIES or y.device.type != "cpu":
        raise ValueError(f"the CPU GEGLU kernel takes an fp32 or bf16 CPU tensor, got {y.dtype} on {y.device.type}")
    if y.ndim == 0 or y.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last dimension (hidden values, then gates), got {tuple(y.shape)}")
    if torch.is_grad_enabled() and y.requires_grad:
        raise ValueError("the CPU GEGLU kernel has no backward pass; it serves inference only")
    inner = y.shape[-1] // 2
    rows = y.reshape(math.prod(y.shape[:-1]), 2 * inner)  # (M, 2 inner)
    if rows.stride(-1) != 1 or rows.stride(0) < 2 * inner:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], inner, dtype=y.dtype)
    if out.numel():
        with torch.profiler.record_function(PROFILER_NAME):  # so that torch.profiler sees the C call
            entry = getattr(built or library(), ENTRIES[y.dtype])
            entry(rows.data_ptr(), rows.stride(0), out.data_ptr(), out.stride(0), rows.shape[0], inner,
                  torch.get_num_threads())
    return out.reshape(*y.shape[:-1], inner)


def reference(y: torch.Tensor) -> torch.Tensor:
    """The same map in torch: what the feed-forward block computes without the kernel."""
    hidden, gate = y.chunk(2, dim=-1)
    return hidden * F.gelu(gate)
