"""DiffEdit step 1, the arithmetic: from noise predictions to a soft map and a binary mask.

Given eps_target and eps_source of shape (B, n, C, h, w) (n noise samples of each image under
the target query and the source/reference text):

    difference[b]  = mean over n and C of |eps_target - eps_source|          (B, h, w)

then per image b, independently of the other images of the batch:

    "paper"       clamp the outliers at mean + clamp_std * std of the map, rescale to [0, 1]
                  with its min and max (paper, sec. 3.2: "remove extreme values ... rescale
                  to the range [0, 1]")
    "mean_ratio"  soft = min(difference, ratio * mean) / (ratio * mean), the normalisation of
                  diffusers' pipeline (ratio = its `mask_thresholding_ratio`, 3.0), but with the
                  mean taken per image rather than over the whole batch

    mask = soft > threshold     (0.5 by default in both modes)

A map that is zero everywhere (source equal to target) gives a soft map and a mask of zeros.
`mask_maps_torch` is the torch path; `diffedit.kernels.mask_reduction` computes the same on CUDA
in one pass over the noise predictions. `mask_maps` chooses between them:

- `backend` argument or the environment variable DIFFEDIT_MASK_KERNEL = "auto" (default),
  "torch" or "triton";
- "auto" takes the Triton kernel for CUDA tensors when Triton is importable, torch otherwise;
- "triton" raises when the kernel cannot serve the tensors (CPU tensors only under Triton's
  interpreter, TRITON_INTERPRET=1, for the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ParameterError

NORMALIZATIONS = ("paper", "mean_ratio")
MASK_BACKENDS = ("auto", "torch", "triton")


@dataclass
class MaskMaps:
    difference: torch.Tensor  # (B, h, w) float32, mean |eps_target - eps_source|
    soft: torch.Tensor        # (B, h, w) float32 in [0, 1]
    mask: torch.Tensor        # (B, h, w) bool, soft > threshold


def noise_difference(eps_target: torch.Tensor, eps_source: torch.Tensor) -> torch.Tensor:
    """mean over samples and channels of |eps_target - eps_source|: (B, n, C, h, w) -> (B, h, w) fp32."""
    return (eps_target.float() - eps_source.float()).abs().mean(dim=(1, 2))


def normalize_difference(difference: torch.Tensor, normalization: str = "paper", clamp_std: float = 3.0,
                         mean_ratio: float = 3.0) -> torch.Tensor:
    """Per-image normalisation of a (B, h, w) difference map to a soft map in [0, 1]."""
    d = difference.float().flatten(1)  # (B, h*w)
    if normalization == "paper":
        mean, std = d.mean(dim=1, keepdim=True), d.std(dim=1, unbiased=False, keepdim=True)
        d = torch.minimum(d, mean + clamp_std * std)  # outlier clamp
        low, high = d.amin(dim=1, keepdim=True), d.amax(dim=1, keepdim=True)
        span = high - low
        soft = torch.where(span > 0, (d - low) / span.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
    elif normalization == "mean_ratio":
        bound = mean_ratio * d.mean(dim=1, keepdim=True)
        soft = torch.where(bound > 0, torch.minimum(d, bound) / bound.clamp_min(torch.finfo(d.dtype).tiny),
                           torch.zeros_like(d))
    else:
        raise ParameterError(f"unknown mask normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}.")
    return soft.view_as(difference)


def mask_maps_torch(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str = "paper",
                    threshold: float = 0.5, clamp_std: float = 3.0, mean_ratio: float = 3.0) -> MaskMaps:
    """The whole reduction in plain torch (the reference of the Triton kernel)."""
    difference = noise_difference(eps_target, eps_source)
    soft = normalize_difference(difference, normalization, clamp_std, mean_ratio)
    return MaskMaps(difference=difference, soft=soft, mask=soft > threshold)


def check_mask_inputs(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str) -> None:
    """Raise ParameterError unless both are (B, n, C, h, w) of one shape and the normalization is known."""
    if eps_target.dim() != 5 or eps_target.shape != eps_source.shape:
        raise ParameterError("eps_target and eps_source must have the same shape (batch, samples, channels, "
                             f"height, width), not {tuple(eps_target.shape)} and {tuple(eps_source.shape)}.")
    if normalization not in NORMALIZATIONS:
        raise ParameterError(f"unknown mask normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}.")


def mask_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else DIFFEDIT_MASK_KERNEL, else "auto"."""
    name = backend if backend is not None else os.environ.get("DIFFEDIT_MASK_KERNEL", "auto")
    name = name.strip().lower() or "auto"
    if name not in MASK_BACKENDS:
        source = "mask backend" if backend is not None else "DIFFEDIT_MASK_KERNEL"
        raise ParameterError(f"{source} {name!r} is not a backend; use one of {', '.join(MASK_BACKENDS)}.")
    return name


def _triton_mask_kernel():
    """The Triton mask reduction module, or None when Triton cannot be imported or run."""
    try:
        from .kernels import mask_reduction
    except ImportError:
        return None
    return mask_reduction if mask_reduction.available() else None


def mask_maps(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str = "paper",
              threshold: float = 0.5, clamp_std: float = 3.0, mean_ratio: float = 3.0,
              backend: str | None = None) -> MaskMaps:
    """DiffEdit's mask from noise predictions (B, n, C, h, w): the Triton kernel or the torch path."""
    check_mask_inputs(eps_target, eps_source, normalization)
    choice = mask_backend(backend)
    if choice == "triton" or (choice == "auto" and eps_target.is_cuda):  # CPU "auto" never imports Triton
        kernel = _triton_mask_kernel()
        if kernel is not None and kernel.supports(eps_target, eps_source):
            return kernel.mask_maps(eps_target, eps_source, normalization, threshold, clamp_std, mean_ratio)
        if choice == "triton":
            raise ParameterError(f"the Triton mask kernel cannot serve {eps_target.dtype} tensors on "
                                 f"{eps_target.device} (it needs Triton and a CUDA device); "
                                 "use backend='torch' or DIFFEDIT_MASK_KERNEL=auto.")
    return mask_maps_torch(eps_target, eps_source, normalization, threshold, clamp_std, mean_ratio)
