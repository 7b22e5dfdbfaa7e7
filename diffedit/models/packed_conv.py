"""3x3 convolutions with their weights kept in oneDNN's blocked layout, for inference on the CPU.

torch's CPU convolution hands oneDNN a weight in the plain (out, in, kh, kw) layout, and oneDNN
reorders it into its blocked layout on every call: the whole weight is read and written once more
per call. Where the arithmetic is small against the weight -- SD's 1280-channel convolutions on
8x8 and 4x4 latents, i.e. the two lowest UNet levels of a 256-px edit -- that reorder is most of
the call.

`PackedConv2d` stores the weight once, in the layout oneDNN picks for the shape of the input it
sees (the layout depends on that shape: a weight packed for another shape can be slower than
plain). So it packs on its first call and re-packs, from the packed weight itself, when the
input shape changes. Re-packing every weight costs more than a UNet call, and an edit changes
batch twice (mask and decoding at batch 2, inversion at batch 1). The big weights (>= REPACK_BYTES:
the 1280- and 640-channel convolutions of the low levels) run about as fast whatever batch size
their layout was picked for, the small ones do not; so big weights are re-packed only when the
image size changes, small ones (a tenth of the bytes) at every shape change; each re-pack runs
inside host_memory.big_blocks_mapped, so the layout it replaces goes back to the system instead of
leaving a hole in the heap; first packs copy the plain weight channels-last into one reused buffer
(`_channels_last`: torch's op would copy it into fresh memory every time). The parameter count,
`state_dict()` keys and values (plain layout) are those of `nn.Conv2d`; the results differ from
the plain convolution by rounding only (another summation order).

1x1 convolutions are packed only in bf16 (`pack_convolutions(..., one_by_one=True)`, which the
pipeline asks for in bf16, where the models run channels-last): there the per-call reorder of
their weights is a tenth of the UNet call, packing them makes a bf16 UNet call about 7 % faster
with bit-identical outputs (Intel Xeon with AMX-BF16, benchmarks/README.md). In fp32 packing
them gained nothing in the UNet call on that CPU (within the +-5 % noise) and made single shapes
up to 25 % slower, as earlier measurements on AMD Zen CPUs had found: fp32 1x1 convolutions stay
plain here (where the linear layers run on diffedit's fp32 kernel, they run on it too:
packed_linear.PointwiseConv2d). When autograd is recording, the plain weight is rebuilt and
`F.conv2d` runs (the packed op has no backward).
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffedit import devices
from diffedit.models import host_memory

REPACK_BYTES = 16 * 2**20  # weights this big keep their layout across batch sizes (see above)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing serves fp32 on a CPU with oneDNN (bf16 only where the CPU runs it natively)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and devices.cpu_has_fast_bf16())


class PackedConv2d(nn.Module):
    """An `nn.Conv2d` (any kernel size and stride) whose weight lives in oneDNN's layout for the
    last input shape seen."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert conv.padding_mode == "zeros" and isinstance(conv.padding, tuple), "only zero, numeric padding"
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)  # plain until the first call
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.packed_for: tuple | None = None  # the input shape the weight is laid out for
        self.batch_blind = conv.weight.numel() * conv.weight.element_size() >= REPACK_BYTES

    def plain_weight(self) -> torch.Tensor:
        return self.weight if self.packed_for is None else self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.conv2d(x, self.plain_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.packed_for is None or self._layout_key(x.shape) != self._layout_key(self.packed_for):
            with host_memory.big_blocks_mapped(), _scratch_lock:  # the old layout goes back (host_memory.py)
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    _channels_last(self.plain_weight()), list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, list(x.shape))
                self.weight = nn.Parameter(packed, requires_grad=False)  # the old layout is freed here
            self.packed_for = tuple(x.shape)
        elif _scratch is not None:
            _release_scratch()
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def _layout_key(self, shape) -> tuple:
        """Inputs with equal keys share a layout: big weights ignore the batch size."""
        return tuple(shape)[1:] if self.batch_blind else tuple(shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.plain_weight() if keep_vars else self.plain_weight().detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, packed_for={self.packed_for}")


# torch's pack op copies a weight channels-last first (its layouts are picked for channels-last
# inputs, which serve contiguous ones as fast), into fresh memory each time: the first call of an
# SD 1.5 UNet faulted in 4.2 GB of new pages for 2 GB of weights. Copied by us into one buffer,
# reused by every pack, the op's copy is a no-op: a 1280 x 1280 3x3 weight packs in 20 ms instead
# of 30 (2-core Zen 2), the same layout. The buffer lives while convolutions are being packed; the
# first call of a packed convolution that packs nothing frees it.
_scratch: torch.Tensor | None = None
_scratch_lock = threading.Lock()


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, kh, kw), channels-last, in the shared scratch buffer (call under the lock)."""
    global _scratch
    if weight.is_contiguous(memory_format=torch.channels_last):  # bf16 models are channels-last already
        return weight
    if _scratch is None or _scratch.numel() < weight.numel() or _scratch.dtype != weight.dtype:
        _scratch = None  # the old buffer goes before the new one is made
        with torch.inference_mode(False):  # a normal tensor: packs may run inside inference_mode or not
            _scratch = torch.empty(weight.numel(), dtype=weight.dtype)
    _, in_channels, kh, kw = weight.shape
    view = _scratch[:weight.numel()].as_strided(weight.shape, (in_channels * kh * kw, 1, kw * in_channels, in_channels))
    return view.copy_(weight)


def _release_scratch() -> None:
    global _scratch
    with _scratch_lock:
        _scratch = None


def replace_children(module: nn.Module, replace) -> int:
    """Swap each submodule `c` for which replace(c) is not None, one at a time; returns the count.
    Only (parent, name) pairs are listed up front: a list of the children themselves would keep
    every replaced module, and its weights, alive until the end."""
    count = 0
    for parent, name in [(parent, name) for parent in module.modules() for name, _ in parent.named_children()]:
        new = replace(getattr(parent, name))
        if new is not None:
            setattr(parent, name, new)
            count += 1
    return count


def pack_convolutions(module: nn.Module, one_by_one: bool = False) -> int:
    """Replace every `nn.Conv2d` inside `module` by a `PackedConv2d`, the 1x1 ones only with
    `one_by_one` (in place, one at a time, so no second copy of the weights is ever held).
    Returns how many were replaced."""
    return replace_children(module, lambda c: PackedConv2d(c) if type(c) is nn.Conv2d and
                            (one_by_one or c.kernel_size != (1, 1)) else None)


def plain_conv(packed: nn.Module) -> nn.Conv2d:
    """The plain `nn.Conv2d` of a packed one (its attributes and `plain_weight()`), same weights."""
    conv = nn.Conv2d(packed.in_channels, packed.out_channels, packed.kernel_size, packed.stride, packed.padding,
                     packed.dilation, packed.groups, bias=packed.bias is not None, device="meta")
    conv.weight = nn.Parameter(packed.plain_weight().detach(), requires_grad=False)
    if packed.bias is not None:
        conv.bias = packed.bias
    return conv


def unpack_convolutions(module: nn.Module) -> int:
    """Turn every `PackedConv2d` back into a plain `nn.Conv2d` (same weights). Returns the count."""
    return replace_children(module, lambda c: plain_conv(c) if isinstance(c, PackedConv2d) else None)
