"""Turning the user's `device` and `dtype` into torch objects, with one-sentence refusals, and
choosing, per call, between a Triton kernel of `diffedit.kernels` and the torch path.

The one chooser, `choose_kernel`, serves both kernels ("attention" and "mask"). The backend is
the caller's `requested` argument, else the kind's environment variable (DIFFEDIT_ATTENTION,
DIFFEDIT_MASK_KERNEL), else "auto":

- "torch" always takes the torch path;
- "auto" takes the kernel for CUDA tensors it can serve when Triton is importable and compiles for
  the GPU (`check_triton_gpu`), torch otherwise (on CPU tensors it never imports Triton); the
  kernels have no backward pass, so tensors that need gradients go to torch;
- "triton" takes the kernel or raises ParameterError saying why it cannot serve the tensors
  (CPU tensors are served only under Triton's interpreter, TRITON_INTERPRET=1, for the tests).

Attention has a CPU kernel too (`diffedit.kernels.cpu_attention`, C built on first use): "auto" takes
it for bf16 inference on CPUs where its AVX512-BF16 path builds and torch cannot use AMX tiles (a
rule from the CPU's features, the same on every run), and "cpu" takes it or raises, as "triton" does.

`cpu_name()` names the CPU (model, family/model number, vector features) wherever a figure or a
set of weights depends on it: the benchmarks' output and the embedded model's card.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from diffedit.errors import ParameterError


class PrecisionWarning(UserWarning):
    """A precision was asked for that this machine runs slowly or inexactly."""


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_device(device: str | torch.device | None) -> torch.device:
    """None: the CPU; "auto": CUDA if there is a device, else the CPU; else what torch.device reads
    (cuda:N only for a device this machine has)."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N').") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("CUDA was asked for but this machine has no CUDA device (or torch was built without "
                             "CUDA); use the CPU (device='cpu', --device cpu).")
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"device {device.type!r} is not supported; use 'cpu' or 'cuda'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ParameterError(f"{device} was asked for but this machine's CUDA devices are {names}; choose one of them.")
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
                      "makes bf16 several times slower than fp32 here; use fp32 for speed (dtype='fp32', --dtype fp32).",
                      PrecisionWarning, stacklevel=3)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.version.hip \
            and torch.cuda.get_device_capability(device) < (8, 0):
        warnings.warn(f"{device} has no native bf16 (compute capability below 8.0): bf16 runs emulated there, slowly; "
                      "use fp16 for speed (dtype='fp16', --dtype fp16) or fp32 as the reference.",
                      PrecisionWarning, stacklevel=3)
    return dtype


def cpu_has_fast_bf16() -> bool:
    """True when torch runs bf16 convolutions on this CPU through oneDNN (AVX-512 or AMX: AVX512-BF16
    and AMX-BF16 make them faster than fp32). Without it they fall back to a slow reference
    convolution, several times slower than fp32 (figures: benchmarks/README.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # the check torch's convolution itself uses
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


# kind -> (its environment variable, where else a caller chooses its backend, its backends)
KERNEL_SWITCHES = {"attention": ("DIFFEDIT_ATTENTION", "set_attention_backend", ("auto", "torch", "triton", "cpu")),
                   "mask": ("DIFFEDIT_MASK_KERNEL", "the backend argument", ("auto", "torch", "triton"))}


def kernel_backend(kind: str, requested: str | None = None) -> str:
    """One of the kind's backends ("auto", "torch", "triton", and "cpu" for attention): `requested`
    if given, else the kind's environment variable, else "auto"."""
    variable, _, backends = KERNEL_SWITCHES[kind]
    if requested is not None:
        name = str(requested).strip().lower() or "auto"
        if name not in backends:
            raise ParameterError(f"unknown {kind} backend {requested!r}; use one of {', '.join(backends)}.")
        return name
    name = os.environ.get(variable, "auto").strip().lower() or "auto"
    if name not in backends:
        raise ParameterError(f"{variable}={name!r} is not a backend; use one of {', '.join(backends)}.")
    return name


def choose_kernel(kind: str, operands: tuple, requested: str | None = None) -> ModuleType | None:
    """The kernel module that is to serve `kind` ("attention" or "mask") on `operands` (the
    arguments of the kernel's `check_inputs`, a tensor first), or None for the torch path."""
    backend = kernel_backend(kind, requested)
    if backend == "torch":
        return None
    if kind == "attention" and not operands[0].is_cuda and backend in ("auto", "cpu"):
        return _cpu_attention_kernel(operands, forced=backend == "cpu")
    variable, switch, _ = KERNEL_SWITCHES[kind]
    if backend == "cpu":
        raise ParameterError(f"the CPU attention kernel takes CPU tensors only; choose 'auto' or 'triton' with "
                             f"{switch} or {variable} for CUDA tensors.")
    if backend == "auto" and not operands[0].is_cuda:
        return None
    try:
        kernel = _import_kernel(kind)
        kernel.check_inputs(*operands)
        check_triton_gpu(operands[0].device, {x.dtype for x in operands if isinstance(x, torch.Tensor)})
        return kernel
    except ImportError:
        problem = "Triton cannot be imported (pip install 'diffedit-sd[triton]')"
    except (TypeError, ValueError) as error:  # the kernel's own one-sentence refusal
        problem = str(error).rstrip(".")
    if backend == "triton":
        raise ParameterError(f"the Triton {kind} kernel cannot serve these tensors: {problem}; "
                             f"choose 'torch' or 'auto' with {switch} or {variable}.")
    return None


# The oldest NVIDIA GPUs Triton compiles for, per dtype: Volta (7.0), and Ampere (8.0) for bf16, whose
# instructions older GPUs lack (torch.compile's rules for its own Triton code).
TRITON_MIN_CAPABILITY = {torch.float16: (7, 0), torch.float32: (7, 0), torch.bfloat16: (8, 0)}


def check_triton_gpu(device: torch.device, dtypes: set[torch.dtype]) -> None:
    """ValueError unless Triton compiles for these dtypes on this device: an NVIDIA GPU's compute
    capability (ROCm GPUs, and the CPU under Triton's interpreter, pass)."""
    if device.type != "cuda" or torch.version.hip:
        return
    needed = max(TRITON_MIN_CAPABILITY[dtype] for dtype in dtypes)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < needed:
        names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
        raise ValueError(f"{device} has compute capability {major}.{minor} and Triton's {names} code needs "
                         f"{needed[0]}.{needed[1]}")


def _cpu_attention_kernel(operands: tuple, forced: bool) -> ModuleType | None:
    """diffedit.kernels.cpu_attention if it serves `operands`: under "auto" only where its rule chooses
    it (`chosen`: bf16 on AVX512-BF16 without AMX, fp32 on AVX2-only CPUs, where it was measured
    faster than torch's SDPA); `forced` ("cpu") raises."""
    from diffedit.kernels import cpu_attention as kernel

    try:
        kernel.check_inputs(*operands)
        if forced:
            kernel.library(operands[0].dtype)
            return kernel
        return kernel if kernel.chosen(operands[0].dtype) else None
    except (TypeError, ValueError, RuntimeError) as error:
        if not forced:
            return None
        variable, switch, _ = KERNEL_SWITCHES["attention"]
        raise ParameterError(f"the CPU attention kernel cannot serve these tensors: {str(error).rstrip('.')}; "
                             f"choose 'torch' or 'auto' with {switch} or {variable}.") from None


def _import_kernel(kind: str) -> ModuleType:
    """diffedit.kernels.attention or .mask_reduction; ImportError without Triton."""
    if kind == "attention":
        from diffedit.kernels import attention as kernel
    else:
        from diffedit.kernels import mask_reduction as kernel
    return kernel


# ---------------------------------------------------------------------- naming the CPU

AMD_FAMILIES = {23: "Zen 1/2", 25: "Zen 3/4", 26: "Zen 5"}  # /proc/cpuinfo "cpu family" of AMD's cores
AMD_ZEN4_MODELS = range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0)  # family 25 models that are Zen 4


def cpu_name(info: str | None = None) -> str:
    """The CPU's model name, family / model (a virtual machine often hides the product name:
    "AMD EPYC" alone is Zen 2 to Zen 5) and the vector features that decide its speed, read from
    `info` (the text of /proc/cpuinfo; by default this machine's)."""
    try:
        info = Path("/proc/cpuinfo").read_text() if info is None else info
    except OSError:  # not Linux
        return f"{platform.processor() or platform.machine()} (torch capability {torch.backends.cpu.get_cpu_capability()})"
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.split("\n\n")[0].splitlines())}
    model, flags = field.get("model name", "?"), set(field.get("flags", "").split())
    family, number = int(field.get("cpu family", -1)), int(field.get("model", -1))
    core = ""
    if field.get("vendor_id") == "AuthenticAMD" and family in AMD_FAMILIES:
        core = AMD_FAMILIES[family] if family != 25 else ("Zen 4" if any(number in r for r in AMD_ZEN4_MODELS) else "Zen 3")
        core = f", {core}"
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model} (family {family} model {number}{core}; {os.cpu_count()} CPUs; "
            f"{', '.join(features) or 'no AVX2'})")
