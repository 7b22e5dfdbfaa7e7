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
This file is the torch path; `diffedit.kernels.mask_reduction` computes the same on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ParameterError

NORMALIZATIONS = ("paper", "mean_ratio")


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
