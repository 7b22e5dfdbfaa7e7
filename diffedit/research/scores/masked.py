"""Scores with a ground-truth mask (1 = the region the edit may change), through torchmetrics.
Two definitions are kept under two names, as they differ:

    bg_*_gt    the project's: over the background pixels only -- bg_mse_gt (mean squared error of
               those pixels, [0, 1] images) and bg_lpips_gt (torchmetrics' LPIPS spatial map,
               averaged over them); bg_psnr_gt / bg_ssim_gt are research/metrics.py's
    bg_*_pie   PIE-Bench's: the whole-image score of both images multiplied by (1 - mask), pixels
               in [0, 1] (the edited region black in both): torchmetrics' PSNR (data range 1),
               SSIM (data range 1), MSE and LPIPS (the LPIPS network given: `bench score` passes
               SqueezeNet, PIE-Bench's, whatever --lpips-net says)
    clip_edited   CLIPScore of the edited image multiplied by the mask, with the target text
               (PIE-Bench's "edited" CLIP similarity)

Everything at the input's own size (no FlexIT crop, no resize: the mask is applied to the pictures
as they are, which must have one size); LPIPS values are x100 like `lpips`. Without background
(a mask over the whole picture) every background score is NaN, as PIE-Bench's "nan".

Checked against PIE-Bench's evaluation (cure-lab/PnPInversion, evaluation/evaluate.py:
calculate_metric's *_unedit_part and clip_similarity_target_image_edit_part; evaluation/
matrics_calculator.py: MetricsCalculator.calculate_psnr / _lpips / _mse / _ssim /
_clip_similarity): pixels / 255, both pictures times (1 - mask) at 512 x 512 with no resize, then
the torchmetrics metric on the whole picture; LPIPS squeeze fed 2x - 1 (= normalize=True); CLIP of
uint8(picture x mask) with the editing prompt.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from diffedit.errors import ParameterError
from diffedit.research.scores.networks import device_of

BACKGROUND = ("bg_mse_gt", "bg_lpips_gt", "bg_psnr_pie", "bg_ssim_pie", "bg_mse_pie", "bg_lpips_pie")


def as_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def keep_of(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) float: 1 outside the edit region (the background), at `size` (width, height)."""
    m = mask if isinstance(mask, Image.Image) else Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    m = np.asarray(m.convert("L").resize(size, Image.NEAREST)) >= 128
    return torch.from_numpy(~m).float()[None, None]


@torch.no_grad()
def background_scores(edited: Image.Image, original: Image.Image, mask, lpips_module) -> dict[str, float]:
    """bg_mse_gt, bg_lpips_gt, bg_psnr_pie, bg_ssim_pie, bg_mse_pie, bg_lpips_pie of one edit."""
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as ssim,
    )
    from torchmetrics.functional.image.lpips import _lpips_update
    if edited.size != original.size:
        raise ParameterError(f"the edit is {edited.size[0]}x{edited.size[1]} but its input {original.size[0]}x"
                             f"{original.size[1]}; background scores compare pictures of one size.")
    device = device_of(lpips_module)            # every score of the edit computed where the network is
    x, y = as_tensor(edited).to(device), as_tensor(original).to(device)
    keep = keep_of(mask, original.size).to(device)
    if keep.sum() == 0:
        return dict.fromkeys(BACKGROUND, math.nan)
    out = {}
    pixels = keep.expand_as(x).bool()
    out["bg_mse_gt"] = float(mean_squared_error(x[pixels], y[pixels]))
    previous = lpips_module.spatial
    lpips_module.spatial = True          # the library's per-pixel LPIPS map, at the input's size
    try:
        spatial = lpips_module(x, y, normalize=True)
    finally:
        lpips_module.spatial = previous
    out["bg_lpips_gt"] = 100 * float((spatial * keep).sum() / keep.sum())
    xm, ym = x * keep, y * keep
    out["bg_psnr_pie"] = float(peak_signal_noise_ratio(xm, ym, data_range=1.0))
    out["bg_ssim_pie"] = float(ssim(xm, ym, data_range=1.0))
    out["bg_mse_pie"] = float(mean_squared_error(xm, ym))
    out["bg_lpips_pie"] = 100 * float(_lpips_update(xm, ym, net=lpips_module, normalize=True).mean())
    return out


def clip_edited(scorer, edited: Image.Image, mask, text: str) -> float:
    """CLIPScore of the edited region: the edited image multiplied by the mask, with `text`
    (NaN for an empty mask, as PIE-Bench)."""
    region = 1 - keep_of(mask, edited.size)
    if region.sum() == 0:
        return math.nan
    pixels = (as_tensor(edited) * region * 255).round().to(torch.uint8)[0]
    return scorer(pixels, text)


MASKED_INFO = {
    "background": {"backbone": "torchmetrics PSNR / SSIM / MSE, and LPIPS squeeze (PIE-Bench's)",
                   "resolution": "the input's own size",
                   "range": "_gt: over background pixels only (MSE of [0, 1] pixels, LPIPS x100); _pie: "
                            "whole-image scores of both images x (1 - mask) (PSNR dB, SSIM [-1, 1], MSE, LPIPS x100)"},
    "clip_edited": {"backbone": "the CLIP model of clip_score, torchmetrics CLIPScore",
                    "resolution": "the model's processor", "range": "[0, 100], edited image x mask vs target text"},
}
