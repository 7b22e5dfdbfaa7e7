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

    soft = blur(soft, sigma)    optional Gaussian smoothing (sigma in latent cells, 0 = none)
    mask = soft > threshold     (0.5 by default in both modes)
    mask = dilate(mask, cells)  optional growth by that many latent cells (0 = none)

A map that is zero everywhere (source equal to target) gives a soft map and a mask of zeros.
`mask_maps_torch` is the torch path; `diffedit.kernels.mask_reduction` computes the same on CUDA
in one pass over the noise predictions. `mask_maps` chooses between them with
`diffedit.devices.choose_kernel`: its `backend` argument, else the environment variable
DIFFEDIT_MASK_KERNEL, "auto" (default, Triton for CUDA tensors when it is installed), "torch" or
"triton" (raises when the kernel cannot serve the tensors).

The pipeline never holds all the predictions: `method.mask_difference` streams them into the
difference map (its memory does not depend on n) and `maps_of_difference` does the rest, in torch
(normalising a (B, h, w) map is cheap); the kernel serves callers of `mask_maps` that hold
(B, n, C, h, w) predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffedit.devices import choose_kernel
from diffedit.errors import ParameterError
from diffedit.settings import check


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
    check("normalization", normalization)
    d = difference.float().flatten(1)  # (B, h*w)
    if normalization == "paper":
        mean, std = d.mean(dim=1, keepdim=True), d.std(dim=1, unbiased=False, keepdim=True)
        d = torch.minimum(d, mean + clamp_std * std)  # outlier clamp
        low, high = d.amin(dim=1, keepdim=True), d.amax(dim=1, keepdim=True)
        span = high - low
        soft = torch.where(span > 0, (d - low) / span.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
    else:  # "mean_ratio"
        bound = mean_ratio * d.mean(dim=1, keepdim=True)
        soft = torch.where(bound > 0, torch.minimum(d, bound) / bound.clamp_min(torch.finfo(d.dtype).tiny),
                           torch.zeros_like(d))
    return soft.view_as(difference)


def per_sample_difference(eps_target: torch.Tensor, eps_source: torch.Tensor) -> torch.Tensor:
    """|eps_target - eps_source| of each noise sample, averaged over channels: (B, n, C, h, w) -> (B, n, h, w)."""
    return (eps_target.float() - eps_source.float()).abs().mean(dim=2)


def blur(soft: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, h, w) maps, sigma in latent cells (borders replicated)."""
    if sigma <= 0:
        return soft
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=soft.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    m = soft[:, None]  # (B, 1, h, w)
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m[:, 0]


def dilate(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Grow a (B, h, w) boolean mask by `cells` latent cells (a square max filter)."""
    if cells <= 0:
        return mask
    cells = min(cells, max(mask.shape[-2:]))  # further than the map's side changes nothing
    return F.max_pool2d(mask[:, None].float(), 2 * cells + 1, stride=1, padding=cells)[:, 0] > 0


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
    check("normalization", normalization)


def mask_maps(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str = "paper",
              threshold: float = 0.5, clamp_std: float = 3.0, mean_ratio: float = 3.0,
              blur_sigma: float = 0.0, dilate_cells: int = 0, backend: str | None = None) -> MaskMaps:
    """DiffEdit step 1 after the UNet, all of it: difference, normalisation, optional blur,
    threshold, optional dilation, from noise predictions (B, n, C, h, w)."""
    return _finish(_reduce(eps_target, eps_source, normalization, threshold, clamp_std, mean_ratio, backend),
                   threshold, blur_sigma, dilate_cells)


def maps_of_difference(difference: torch.Tensor, normalization: str = "paper", threshold: float = 0.5,
                       clamp_std: float = 3.0, mean_ratio: float = 3.0, blur_sigma: float = 0.0,
                       dilate_cells: int = 0) -> MaskMaps:
    """`mask_maps` from the difference map (B, h, w) itself, as `method.mask_difference` streams
    it (the noise predictions are never all held, so this is the torch path)."""
    soft = normalize_difference(difference, normalization, clamp_std, mean_ratio)
    return _finish(MaskMaps(difference=difference, soft=soft, mask=soft > threshold), threshold, blur_sigma,
                   dilate_cells)


def _finish(maps: MaskMaps, threshold: float, blur_sigma: float, dilate_cells: int) -> MaskMaps:
    """The optional blur (then the threshold again) and dilation."""
    if blur_sigma > 0:
        maps.soft = blur(maps.soft, blur_sigma)
        maps.mask = maps.soft > threshold
    maps.mask = dilate(maps.mask, dilate_cells)
    return maps


def _reduce(eps_target: torch.Tensor, eps_source: torch.Tensor, normalization: str, threshold: float,
            clamp_std: float, mean_ratio: float, backend: str | None) -> MaskMaps:
    """Difference, normalisation and threshold: the Triton kernel or the torch path."""
    check_mask_inputs(eps_target, eps_source, normalization)
    kernel = choose_kernel("mask", (eps_target, eps_source), backend)
    if kernel is None:
        return mask_maps_torch(eps_target, eps_source, normalization, threshold, clamp_std, mean_ratio)
    difference, soft, mask = kernel.mask_reduction(eps_target, eps_source, normalization, threshold, clamp_std,
                                                   mean_ratio)
    return MaskMaps(difference=difference, soft=soft, mask=mask)
