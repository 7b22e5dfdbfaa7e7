"""Turning the user's `device` and `dtype` into torch objects, with one-sentence refusals."""

from __future__ import annotations

import torch

from .errors import ParameterError

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
    return dtype
