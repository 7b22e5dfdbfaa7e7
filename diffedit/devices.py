"""Turning the user's `device` and `dtype` into torch objects, with one-sentence refusals."""

from __future__ import annotations

import warnings

import torch

from .errors import ParameterError


class PrecisionWarning(UserWarning):
    """A precision was asked for that this machine runs slowly or inexactly."""


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N').") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("CUDA was asked for but this machine has no CUDA device (or torch was built without "
                             "CUDA); use device='cpu'.")
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"device {device.type!r} is not supported; use 'cpu' or 'cuda'.")
    return device


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ParameterError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16.")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ParameterError(f"dtype {dtype} is not supported; use fp32, bf16 or fp16.")
    if dtype == torch.float16 and device.type == "cpu":
        raise ParameterError("fp16 is not supported on the CPU (slow and overflow-prone there); "
                             "use bf16 for speed or fp32 as the reference.")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("this CPU has no native bf16 (no AVX-512 or AMX): torch emulates bf16 convolutions, which "
                      "makes bf16 several times slower than fp32 here; use dtype='fp32' for speed.",
                      PrecisionWarning, stacklevel=3)
    return dtype


def cpu_has_fast_bf16() -> bool:
    """True when torch runs bf16 convolutions on this CPU through oneDNN (AVX-512 or AMX: AVX512-BF16
    and AMX-BF16 make them about 2x faster than fp32). Without it they fall back to a slow reference
    convolution: measured 3-5x slower than fp32 (and bf16 matmuls 3-4x) on an AVX2-only CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # the check torch's convolution itself uses
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
