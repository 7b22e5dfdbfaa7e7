"""Linear layers on the CPU's fastest matrix-multiply backend, for inference.

torch's CPU `F.linear` multiplies with the BLAS torch was built with (MKL on x86) in fp32. MKL
chooses its kernels by the CPU's vendor as well as its instruction set: on AMD processors it
runs its AVX2 kernels even where the CPU has AVX-512, i.e. vectors half as wide as the machine's.
oneDNN, which torch also ships (its convolutions run on it), chooses by instruction set alone, and
its inner-product primitive can take a weight reordered once into its own blocked layout
("prepacked"), so that no call pays for that reorder again. On CPUs whose widest vectors are AVX2,
both libraries run SD's short-K layers at 120-155 GFLOP/s on 2 cores of a Zen 2, diffedit's own
fp32 kernel (kernels/cpu_linear_fp32.c: 6 x 16 FMA register tiles on a weight packed into panels
of 16 columns) at 145-185.

`PackedLinear` is an `nn.Linear` whose weight lives in one of those packed layouts: it is packed
once, when the layer is made, and every inference call is one oneDNN inner product or one call of
the kernel on it. Unlike a convolution's (packed_conv.py), neither layout depends on the number of
rows of the input, so it is never re-packed when the batch or the image size changes. Parameter
count, `state_dict()` keys and values (plain layout) are those of `nn.Linear`; results differ from
`F.linear` by rounding only (another summation order). When autograd is recording for the input,
or the input has another dtype than the kernel or library serves, the plain weight is rebuilt and
`F.linear` runs (neither has a backward; a dtype mismatch gets torch's own error).

Which backend serves the linear layers (`linear_backend`): the caller's choice, else the
environment variable DIFFEDIT_CPU_LINEAR, else "auto":

- "torch": plain `nn.Linear` (torch's default: MKL in fp32, oneDNN in bf16 on CPUs with AVX-512);
- "onednn": `PackedLinear` on oneDNN, or ParameterError if oneDNN cannot serve the device and dtype;
- "kernel": `PackedLinear` on diffedit's fp32 kernel (layers whose output width is not a multiple
  of 16 on oneDNN), or ParameterError if it cannot serve the device and dtype; where the kernel
  builds only its portable C path, forcing it runs that (correct, slow). Where the 3x3
  convolutions are packed (so the activations are channels-last), the pipeline puts the 1x1
  convolutions on the kernel too (`PointwiseConv2d`: there a 1x1 convolution is a linear layer over
  each pixel's channels; 1.01x-3.1x torch's oneDNN convolution at SD's shapes on a Zen 2);
- "auto": a fixed rule from the CPU's capabilities, never a timing race, so that a run repeats
  bit for bit on a machine of the same kind: "kernel" in fp32 where its AVX2 path builds and
  torch's CPU capability is AVX2 (kernels/cpu_linear.py: `chosen`); else "onednn" on an x86 CPU
  with oneDNN in fp32, and in bf16 where the CPU runs bf16 natively (devices.cpu_has_fast_bf16);
  "torch" everywhere else (GPUs, other architectures, emulated bf16). The rule was validated with
  benchmarks/bench_linear_cpu.py (figures and CPUs: benchmarks/README.md).
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffedit import devices
from diffedit.kernels import cpu_geglu, cpu_linear
from diffedit.errors import ParameterError
from diffedit.models.packed_conv import plain_conv, replace_children

VARIABLE = "DIFFEDIT_CPU_LINEAR"
BACKENDS = ("auto", "torch", "onednn", "kernel")


def onednn_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot serve linear layers on `device` in `dtype`, or None when it can."""
    if device.type != "cpu":
        return f"oneDNN serves the CPU only, not {device.type}"
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN"
    if dtype == torch.bfloat16 and not devices.cpu_has_fast_bf16():
        return "this CPU has no native bf16 (no AVX-512 or AMX)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN linear layers serve fp32 and bf16, not {dtype}"
    return None


def kernel_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why diffedit's linear kernel cannot serve `device` in `dtype`, or None when it can."""
    if device.type != "cpu":
        return f"the linear kernel serves the CPU only, not {device.type}"
    if dtype != torch.float32:
        return f"the linear kernel serves fp32, not {dtype}"
    try:
        cpu_linear.library()
    except RuntimeError as error:
        return str(error)
    return None


def linear_backend(device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """"kernel", "onednn" or "torch": the backend of the linear layers of a model on `device` in `dtype`
    (`requested`, else DIFFEDIT_CPU_LINEAR, else "auto"; see the module docstring)."""
    source = "linear_backend" if requested is not None else VARIABLE
    name = str(requested if requested is not None else os.environ.get(VARIABLE, "auto")).strip().lower() or "auto"
    if name not in BACKENDS:
        raise ParameterError(f"{source}={name!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    problem = {"onednn": onednn_problem, "kernel": kernel_problem}.get(name, lambda *_: None)(device, dtype)
    if problem is not None:
        raise ParameterError(f"{source}={name!r} cannot be served: {problem}; use 'auto' or 'torch'.")
    if name == "auto":
        if kernel_problem(device, dtype) is None and cpu_linear.chosen():
            return "kernel"
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        return "onednn" if onednn_problem(device, dtype) is None and x86 else "torch"
    return name


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight lives in a packed layout, packed once: oneDNN's blocked layout
    (`backend` "onednn") or the panels of diffedit's fp32 kernel ("kernel", kernels/cpu_linear.py)."""

    def __init__(self, linear: nn.Linear, backend: str = "onednn"):
        super().__init__()
        assert backend in ("onednn", "kernel"), backend
        self.in_features, self.out_features, self.backend = linear.in_features, linear.out_features, backend
        weight = linear.weight.detach()
        if backend == "kernel":
            packed = cpu_linear.pack(weight)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def plain_weight(self) -> torch.Tensor:
        return cpu_linear.unpack(self.weight) if self.backend == "kernel" else self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (torch.is_grad_enabled() and x.requires_grad) or x.dtype != self.weight.dtype
        if self.backend == "kernel":  # fp32 on the CPU only (after a .to(), the plain path)
            if plain or x.dtype != torch.float32 or x.device.type != "cpu":
                return F.linear(x, self.plain_weight(), self.bias)
            return cpu_linear.linear(x, self.weight, self.bias)
        if plain:
            return F.linear(x, self.plain_weight(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.plain_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.backend}")


class PointwiseConv2d(nn.Module):
    """An `nn.Conv2d` with a 1x1 kernel (stride 1, no padding, one group) on diffedit's fp32 linear
    kernel. On a channels-last input (B, C, H, W) -- the layout of the UNet's and VAE's activations
    after their first packed convolution -- the channels of each pixel are a contiguous row, so the
    convolution is x (B*H*W, C) w^T + b, one kernel call on a view, and its output (B, H, W, O) read
    as (B, O, H, W) is channels-last as oneDNN's would be. Any other input, autograd or a dtype
    other than fp32 runs `F.conv2d` on the rebuilt plain weight."""

    PROFILER_NAME = "diffedit::cpu_conv1x1"
    backend = "kernel"
    kernel_size, stride, padding, dilation, groups = (1, 1), (1, 1), (0, 0), (1, 1), 1  # as in fits_kernel

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert fits_kernel(conv), conv
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        weight = conv.weight.detach()
        self.weight = nn.Parameter(cpu_linear.pack(weight.reshape(weight.shape[:2])), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def plain_weight(self) -> torch.Tensor:
        return cpu_linear.unpack(self.weight)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ((torch.is_grad_enabled() and x.requires_grad) or x.dtype != torch.float32 or self.weight.dtype != x.dtype
                or x.device.type != "cpu" or x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last)):
            return F.conv2d(x, self.plain_weight(), self.bias)
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view
        return cpu_linear.linear(pixels, self.weight, self.bias, profiler_name=self.PROFILER_NAME).permute(0, 3, 1, 2)

    _save_to_state_dict = PackedLinear._save_to_state_dict  # the plain weight, as nn.Conv2d's

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), bias={self.bias is not None}, kernel"


def fits_kernel(conv: nn.Module) -> bool:
    """True for a plain `nn.Conv2d` that is a linear map of each pixel's channels (1x1 kernel, stride 1,
    no padding, one group) with an output width the kernel's 16-column panels divide."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and
            conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and
            conv.out_channels % cpu_linear.PANEL == 0)


def pack_linears(module: nn.Module, backend: str = "onednn") -> int:
    """Replace every `nn.Linear` inside `module` by a `PackedLinear` on `backend` (in place, one at
    a time, so no second copy of the weights is ever held). With "kernel", layers whose output
    width the kernel's panels do not divide go to oneDNN. Returns how many were replaced."""
    def packed(child: nn.Module) -> PackedLinear | None:
        if type(child) is not nn.Linear:
            return None
        fits = backend == "kernel" and child.out_features % cpu_linear.PANEL == 0
        return PackedLinear(child, "kernel" if fits else "onednn")
    return replace_children(module, packed)


def _plain_linear(packed: PackedLinear) -> nn.Linear:
    linear = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
    linear.weight = nn.Parameter(packed.plain_weight(), requires_grad=False)
    if packed.bias is not None:
        linear.bias = packed.bias
    return linear


def pack_pointwise_convolutions(module: nn.Module) -> int:
    """Replace every 1x1 convolution inside `module` that the kernel serves (`fits_kernel`) by a
    `PointwiseConv2d` (in place, one at a time). For models whose activations are channels-last,
    i.e. whose 3x3 convolutions are packed (on other inputs it runs F.conv2d on a rebuilt weight).
    Returns how many were replaced."""
    return replace_children(module, lambda c: PointwiseConv2d(c) if fits_kernel(c) else None)


def unpack_linears(module: nn.Module) -> int:
    """Turn every `PackedLinear` back into a plain `nn.Linear` and every `PointwiseConv2d` into a plain
    `nn.Conv2d` (same weights). Returns the count."""
    return replace_children(module, lambda c: _plain_linear(c) if isinstance(c, PackedLinear) else
                            plain_conv(c) if isinstance(c, PointwiseConv2d) else None)


def on_kernel(layer: nn.Module, y: torch.Tensor) -> bool:
    """True when the kernel's companion (the feed-forward's gating, kernels/cpu_geglu.py) is to serve
    `y`, the output of `layer`, outside autograd on the CPU: where `layer` ran packed on diffedit's
    fp32 kernel with y fp32 and the gating kernel builds, or on oneDNN with y bf16 and the gating
    kernel builds its AVX512-BF16 path (1.3x-1.6x torch's bf16 map at SD's shapes on a Zen 4, torch's
    values but for the erf formula's last bit)."""
    recording = torch.is_grad_enabled() and y.requires_grad
    if not isinstance(layer, PackedLinear) or y.device.type != "cpu" or recording:
        return False
    if layer.backend == "kernel" and y.dtype == torch.float32:
        return cpu_geglu.available()
    return layer.backend == "onednn" and y.dtype == torch.bfloat16 and cpu_geglu.available() \
        and cpu_geglu.path(torch.bfloat16) == "avx512_bf16"


def backend_of(module: nn.Module) -> str:
    """"kernel" if `module` holds linear layers on diffedit's kernel, else "onednn" if it holds
    packed ones, else "torch"."""
    backends = {m.backend for m in module.modules() if isinstance(m, (PackedLinear, PointwiseConv2d))}
    return "kernel" if "kernel" in backends else "onednn" if backends else "torch"
