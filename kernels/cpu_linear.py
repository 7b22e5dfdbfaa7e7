"""fp32 linear layers on the CPU: the C kernel of cpu_linear_fp32.c (built on first use by c_build.py).

Why and how (register tiles, blocking, memory traffic): the comment at the top of the C file. In
short, y = x w^T + b in 6 x 16 FMA register tiles on a weight packed once into panels of 16
columns, where torch's fp32 GEMMs (MKL, oneDNN) run SD's linear shapes at 120-155 GFLOP/s on 2
cores of a Zen 2 whose 3x3 convolutions reach 180 (the kernel: 145-185). On a CPU without AVX2
and FMA the same source compiles a portable C path (`path()` says which), correct but slow;
diffedit's "auto" rule (`chosen()`) takes the kernel where its AVX2 path builds and torch's own
CPU kernels are AVX2 ones (measured on an AMD Zen 2; on AVX-512 CPUs oneDNN runs AVX-512 and
stays).

Tensors in, tensors out: this file imports nothing of diffedit.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from . import c_build

SOURCE = Path(__file__).with_name("cpu_linear_fp32.c")
PANEL = 16            # output columns per packed panel (COLS in the C file)
PROFILER_NAME = "diffedit::cpu_linear"
MAX_SIZE = 2 ** 30     # rows and features: the kernel's int sizes (and M + a block) stay below 2^31

def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; `extra_flags` e.g. ("-DPORTABLE_ONLY",)."""
    library = c_build.load(SOURCE, "CPU linear kernel", tuple(extra_flags))
    library.linear_fp32.restype = ctypes.c_int
    library.linear_fp32.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_long] + [ctypes.c_int] * 4)
    return library


def library() -> ctypes.CDLL:
    """The built kernel (built once per process at first use); RuntimeError when it cannot be built."""
    return c_build.once("linear", build)


@functools.cache
def path() -> str:
    """"avx2_fma" (the fast path) or "portable" (plain C), as built for this CPU."""
    return library().kernel_path().decode()


def fast() -> bool:
    """True when the kernel builds here with its fast (AVX2 + FMA) path."""
    try:
        return path() == "avx2_fma"
    except RuntimeError:
        return False


@functools.cache
def chosen() -> bool:
    """diffedit's "auto" rule, fixed per machine kind: the kernel on its AVX2 path where torch's
    CPU kernels are AVX2 too (module docstring)."""
    return fast() and torch.backends.cpu.get_cpu_capability() == "AVX2"


def pack(weight: torch.Tensor) -> torch.Tensor:
    """w (N, K) fp32 -> panels (N / 16, K, 16): the 16 output columns of a panel side by side."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.float32 or out_features % PANEL:
        raise ValueError(f"the CPU linear kernel packs fp32 weights with a multiple of {PANEL} rows, "
                         f"got {weight.dtype} ({out_features}, {in_features})")
    return weight.reshape(out_features // PANEL, PANEL, in_features).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: panels (N / 16, K, 16) -> w (N, K), contiguous (a single panel's
    reshape alone would be a transposed view, which e.g. safetensors refuses to save)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1]).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None,
           built: ctypes.CDLL | None = None, profiler_name: str = PROFILER_NAME) -> torch.Tensor:
    """x (..., K) w^T + b for fp32 CPU tensors, w given as `pack(w)`. `built`: a library from
    `build` instead of this process's `library()`; `profiler_name`: what torch.profiler calls the
    C call (a 1x1 convolution's caller names it so)."""
    tensors = (x, panels) if bias is None else (x, panels, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU linear kernel takes fp32 CPU tensors, got "
                         + ", ".join(f"{t.dtype} on {t.device.type}" for t in tensors))
    if panels.ndim != 3 or panels.shape[2] != PANEL or not panels.is_contiguous():
        raise ValueError(f"the weight must come from pack(): contiguous (N / {PANEL}, K, {PANEL}), "
                         f"got {tuple(panels.shape)}")
    in_features, out_features = panels.shape[1], panels.shape[0] * PANEL
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {in_features}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != torch.float32 or
                             not bias.is_contiguous()):
        raise ValueError(f"the bias must be a contiguous fp32 vector of {out_features}")
    if torch.is_grad_enabled() and (x.requires_grad or panels.requires_grad):
        raise ValueError("the CPU linear kernel has no backward pass; it serves inference only")
    if max(math.prod(x.shape[:-1]), in_features, out_features) > MAX_SIZE:   # before any copy of x
        raise ValueError(f"the CPU linear kernel takes at most {MAX_SIZE:,} rows or features (its int sizes), "
                         f"got {math.prod(x.shape[:-1])} x {in_features} -> {out_features}")
    rows = x.reshape(math.prod(x.shape[:-1]), in_features)  # (M, K)
    if rows.stride(-1) != 1 or rows.stride(0) < in_features:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    if rows.shape[0] and in_features and out_features:
        with torch.profiler.record_function(profiler_name):  # so that torch.profiler sees the C call
            (built or library()).linear_fp32(
                rows.data_ptr(), rows.stride(0), panels.data_ptr(), 0 if bias is None else bias.data_ptr(),
                out.data_ptr(), out.stride(0), rows.shape[0], in_features, out_features, torch.get_num_threads())
    elif bias is not None:  # K = 0 (or nothing to compute): only the bias
        out.copy_(bias)
    else:
        out.zero_()
    return out.reshape(*x.shape[:-1], out_features)
