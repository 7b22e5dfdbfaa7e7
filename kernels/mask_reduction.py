"""DiffEdit's mask reduction in Triton: noise predictions -> difference map -> soft map -> mask.

From eps_target and eps_source of shape (B, n, C, h, w) (n noise samples of each image under the
target and the source text), per image b:

    difference[b] = mean over n and C of |eps_target - eps_source|              (h, w) fp32
    "paper"       soft = (min(d, bound) - low) / (high - low), bound = mean + clamp_std * std,
                  low and high the min and max of the clamped map (DiffEdit, sec. 3.2)
    "mean_ratio"  soft = min(d, bound) / bound, bound = mean_ratio * mean (diffusers' pipeline)
    mask[b]       = soft > threshold                      (a map that is zero everywhere: all zero)

`mask_reduction_reference` is this in plain torch, the same operations as diffedit's torch path
`diffedit.mask_maps.mask_maps_torch`. Two kernels compute it:

1. `_difference_kernel`, one pass over the inputs: a program owns BLOCK_P pixels of one image
   and walks the n * C slices of both tensors, accumulating |eps_target - eps_source| in fp32
   registers, then writes the mean, (B, h*w) fp32. The inputs are read exactly once. The torch
   path materialises four (B, n, C, h, w) fp32 tensors on the way (two casts, the difference,
   its absolute value), each written and read back: for n = 10 noise samples of a 64x64 latent
   in fp16 that is about 5.9 MB of traffic against 0.66 MB here.

2. `_normalize_kernel`, one program per image over its small map (h*w fp32 values, read a few
   times from L2): the mean (both modes), then for "paper" the population std, the outlier
   clamp at mean + clamp_std * std and the min / max of the clamped map (min and max commute
   with the clamp: min(clamp(d)) = min(min(d), bound)), and the rescale to [0, 1]; for
   "mean_ratio" the bound mean_ratio * mean. It writes the soft map and the thresholded mask.

Agreement with the torch reference. Every elementwise step is the same fp32 operation as torch's
(|t - s| after the cast, the division by n * C, the mean, the clamp, the rescale, the comparison;
divisions and the square root correctly rounded, tl.div_rn / tl.sqrt_rn, as torch's are). Only
the order of the sums differs: the n * C values of a pixel, and the h * w values of an image for
the mean and the (two-pass) variance. So the results are bitwise equal whenever those sums are
exact (the tests check this with dyadic inputs) and otherwise differ by a few fp32 ulps: the
difference and soft maps within rtol 1e-5 / atol 1e-6 (measured: <= 2e-7), and the masks equal
except at pixels whose soft value lies within 1e-5 of the threshold.

Interface. `mask_reduction` checks its inputs (`check_inputs`, plain TypeError / ValueError),
computes the grids, launches both kernels and returns the tuple (difference, soft, mask). Tensors
in, tensors out: this file imports nothing of diffedit, which wraps the tuple in its `MaskMaps`
and chooses between this kernel and torch in `diffedit.devices.choose_kernel`.
"""

from __future__ import annotations

import contextlib
import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORMALIZATIONS = ("paper", "mean_ratio")
FLOAT32_TINY: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).tiny)  # the torch path's clamp_min


@triton.jit(do_not_specialize=["samples", "channels"])  # a count of 1 must stay a number, not a constexpr
def _difference_kernel(
    Target, Source, Difference,
    stride_tb, stride_tn, stride_tc, stride_sb, stride_sn, stride_sc,
    samples, channels, pixels,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs < pixels
    target = Target + b * stride_tb + offs
    source = Source + b * stride_sb + offs
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i in range(samples):
        for c in range(channels):
            t = tl.load(target + i * stride_tn + c * stride_tc, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(source + i * stride_sn + c * stride_sc, mask=ok, other=0.0).to(tl.float32)
            total += tl.abs(t - s)
    tl.store(Difference + b * pixels + offs, tl.div_rn(total, (samples * channels).to(tl.float32)), mask=ok)


@triton.jit(do_not_specialize=["pixels"])
def _normalize_kernel(
    Difference, Soft, Mask,
    pixels, threshold, clamp_std, mean_ratio,
    PAPER: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    difference = Difference + b * pixels
    offs = tl.arange(0, BLOCK_P)

    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, pixels, BLOCK_P):
        total += tl.load(difference + start + offs, mask=start + offs < pixels, other=0.0)
    mean = tl.div_rn(tl.sum(total, axis=0), pixels.to(tl.float32))

    if PAPER:
        squares = tl.zeros([BLOCK_P], dtype=tl.float32)
        low = tl.full([BLOCK_P], float("inf"), dtype=tl.float32)
        high = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        for start in range(0, pixels, BLOCK_P):
            ok = start + offs < pixels
            d = tl.load(difference + start + offs, mask=ok, other=0.0)
            squares += tl.where(ok, (d - mean) * (d - mean), 0.0)
            low = tl.minimum(low, tl.where(ok, d, float("inf")))
            high = tl.maximum(high, tl.where(ok, d, float("-inf")))
        std = tl.sqrt_rn(tl.div_rn(tl.sum(squares, axis=0), pixels.to(tl.float32)))
        bound = mean + clamp_std * std  # outlier clamp
        low = tl.minimum(tl.min(low, axis=0), bound)
        high = tl.minimum(tl.max(high, axis=0), bound)
        span = high - low
    else:
        bound = mean_ratio * mean
        low = 0.0
        span = bound

    for start in range(0, pixels, BLOCK_P):
        ok = start + offs < pixels
        d = tl.load(difference + start + offs, mask=ok, other=0.0)
        soft = tl.where(span > 0, tl.div_rn(tl.minimum(d, bound) - low, tl.maximum(span, FLOAT32_TINY)), 0.0)
        tl.store(Soft + b * pixels + start + offs, soft, mask=ok)
        tl.store(Mask + b * pixels + start + offs, (soft > threshold).to(tl.int8), mask=ok)


INTERPRETED = not isinstance(_difference_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def available() -> bool:
    """True when the kernels can run at all: on a CUDA device, or on the CPU under the interpreter."""
    return INTERPRETED or torch.cuda.is_available()


def check_inputs(eps_target: torch.Tensor, eps_source: torch.Tensor) -> None:
    """Raise TypeError (types, dtypes) or ValueError (devices, shapes, gradients) unless the kernels can serve
    these tensors."""
    if not isinstance(eps_target, torch.Tensor) or not isinstance(eps_source, torch.Tensor):
        raise TypeError("eps_target and eps_source must be torch tensors.")
    if eps_target.dim() != 5 or eps_target.shape != eps_source.shape:
        raise ValueError("eps_target and eps_source must have one shape (batch, samples, channels, height, width), "
                         f"not {tuple(eps_target.shape)} and {tuple(eps_source.shape)}.")
    on_device = eps_target.is_cuda or (INTERPRETED and eps_target.device.type == "cpu")
    if not on_device or eps_source.device != eps_target.device:
        raise ValueError("eps_target and eps_source must be on one CUDA device (or the CPU under TRITON_INTERPRET=1), "
                         f"not {eps_target.device} and {eps_source.device}.")
    if eps_target.dtype not in DTYPES or eps_source.dtype not in DTYPES:
        raise TypeError("eps_target and eps_source must be float16, bfloat16 or float32, "
                        f"not {eps_target.dtype} and {eps_source.dtype}.")
    if torch.is_grad_enabled() and (eps_target.requires_grad or eps_source.requires_grad):
        raise ValueError("the Triton mask kernels have no backward pass; they serve inference only.")


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}.")


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """x with its (h, w) dims contiguous, so that the pixels of each slice are one run of memory."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def mask_reduction(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str = "paper",
                   threshold: float = 0.5, clamp_std: float = 3.0, mean_ratio: float = 3.0,
                   block_pixels: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiffEdit mask by the two kernels: (B, n, C, h, w) float16/bfloat16/float32 inputs ->
    (difference, soft, mask), each (B, h, w): float32, float32 in [0, 1], bool.

    `block_pixels` (a power of two) is the tile of pixels a program handles."""
    check_inputs(eps_target, eps_source)
    _check_normalization(normalization)
    if block_pixels < 16 or block_pixels & (block_pixels - 1):
        raise ValueError(f"block_pixels must be a power of two of at least 16, not {block_pixels}.")
    eps_target, eps_source = _flat_pixels(eps_target), _flat_pixels(eps_source)
    batch, samples, channels, height, width = eps_target.shape
    pixels = height * width
    block = min(block_pixels, max(16, triton.next_power_of_2(pixels)))

    difference = torch.empty(batch, height, width, device=eps_target.device, dtype=torch.float32)
    soft = torch.empty_like(difference)
    mask = torch.empty(batch, height, width, device=eps_target.device, dtype=torch.int8)
    # Triton launches on the current CUDA device, not on the tensors' one: make theirs current
    with torch.cuda.device(eps_target.device) if eps_target.is_cuda else contextlib.nullcontext():
        _difference_kernel[(batch, triton.cdiv(pixels, block))](
            eps_target, eps_source, difference,
            eps_target.stride(0), eps_target.stride(1), eps_target.stride(2),
            eps_source.stride(0), eps_source.stride(1), eps_source.stride(2),
            samples, channels, pixels, BLOCK_P=block,
        )
        _normalize_kernel[(batch,)](
            difference, soft, mask, pixels, float(threshold), float(clamp_std), float(mean_ratio),
            PAPER=normalization == "paper", BLOCK_P=block,
        )
    return difference, soft, mask.view(torch.bool)


def mask_reduction_reference(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str = "paper",
                             threshold: float = 0.5, clamp_std: float = 3.0,
                             mean_ratio: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same reduction in plain torch, in fp32, on any device (the benchmark's and the tests' oracle)."""
    _check_normalization(normalization)
    difference = (eps_target.float() - eps_source.float()).abs().mean(dim=(1, 2))
    d = difference.flatten(1)
    mean = d.mean(dim=1, keepdim=True)
    if normalization == "paper":
        bound = mean + clamp_std * d.std(dim=1, unbiased=False, keepdim=True)
        low, high = torch.minimum(d, bound).aminmax(dim=1, keepdim=True)
    else:
        bound = mean_ratio * mean
        low, high = torch.zeros_like(bound), bound
    span = high - low
    soft = torch.where(span > 0, (torch.minimum(d, bound) - low) / span.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
    soft = soft.view_as(difference)
    return difference, soft, soft > threshold
