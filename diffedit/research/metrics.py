"""Edit metrics that need no downloaded network: how well the background survived, and how good
the mask is.

    background PSNR   10 log10(1 / MSE) over the pixels outside the edit mask, images in [0, 1]
    background SSIM   SSIM (Wang et al. 2004) computed over the whole image with an 11 x 11
                      Gaussian window (sigma 1.5), then averaged over the pixels outside the mask
    mask IoU          |predicted & ground truth| / |predicted | ground truth|
    mask area         fraction of the image inside the mask

The edit mask is 1 (True) where the edit may change the image; the metrics compare the rest.
It can be the ground-truth region of the edit, or the predicted DiffEdit mask.

Metrics that need a network's weights (LPIPS, CLIPScore, FID, DeiT, DINO) are not here: the
maintained libraries compute them, after a run, from its saved pictures (`diffedit bench score`,
research/scores/, the `eval` extra). During a sweep, the user can also register their own with
`register_metric(name, fn)` (or name a factory and the weights they supply in a sweep config,
`load_metric`); a metric that is not registered is absent from the results, never replaced by a
stand-in.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.io.images import to_rgb
from diffedit.io.pictures import mask_to_pil

PSNR_CAP = 100.0          # dB reported when the images agree exactly (MSE = 0) or better than this
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
BUILTIN_METRICS = ("bg_psnr_gt", "bg_ssim_gt", "bg_psnr_mask", "bg_ssim_mask", "mask_iou", "mask_area",
                   "gt_mask_area", "success", "colour_ok", "shape_ok", "others_kept", "bg_psnr_scene")


# ---------------------------------------------------------------------- inputs

def as_float_image(image: Any) -> np.ndarray:
    """(H, W, C) float64 in [0, 1] from a PIL image (any mode, read as the pipeline reads it:
    16-bit scaled, alpha on white), a uint8 array (H, W[, C]), a float array in [0, 1] (H, W[, C]),
    or a torch tensor (3, H, W) / (1, 3, H, W) in [-1, 1] (the model's range)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode in ("L", "RGB") else to_rgb(image))
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ParameterError(f"an image tensor must be float in [-1, 1], got {image.dtype}; pass x / 127.5 - 1, "
                                 "or a uint8 numpy array for 0-255 images.")
        t = image.detach().cpu().double()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3:
            raise ParameterError("an image tensor must be (3, H, W) or (1, 3, H, W) in [-1, 1]; "
                                 f"got shape {tuple(t.shape)}.")
        a = ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        a = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
        if image.dtype != np.uint8 and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ParameterError("a float image array must hold values in [0, 1]; pass uint8 for 0-255 images.")
    else:
        raise ParameterError(f"cannot use a {type(image).__name__} as an image; pass a PIL image, a numpy array "
                             "or a torch tensor.")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ParameterError(f"an image must be (H, W), (H, W, 1) or (H, W, 3); got shape {a.shape}.")
    return a


def as_bool_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool at `size` (width, height) from a bool/float/uint8 array, tensor or mode-L image of
    any size: binary masks are resized nearest-neighbour, soft maps bilinearly and cut at 0.5."""
    return np.asarray(mask_to_pil(mask, size)) >= 128


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float_image(a), as_float_image(b)
    if x.shape[:2] != y.shape[:2]:
        raise ParameterError(f"the images differ in size ({x.shape[1]}x{x.shape[0]} and {y.shape[1]}x{y.shape[0]}); "
                             "compare the edit with the input at the input's size.")
    if x.shape[2] != y.shape[2]:
        x, y = np.broadcast_to(x, (*x.shape[:2], 3)), np.broadcast_to(y, (*y.shape[:2], 3))
    return x, y


def _allowed(mask: Any | None, shape: tuple[int, int]) -> np.ndarray:
    """Pixels that take part: outside the edit mask (all pixels without a mask)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    return ~as_bool_mask(mask, (shape[1], shape[0]))


# ---------------------------------------------------------------------- PSNR and SSIM

def psnr(image: Any, reference: Any, mask: Any | None = None, cap: float | None = PSNR_CAP) -> float | None:
    """PSNR in dB of `image` against `reference` over the pixels outside `mask` (edit = True):
    10 log10(1 / MSE) with both images in [0, 1], MSE over those pixels and all channels.
    Identical images (MSE = 0) give `cap` (100 dB; cap=None gives inf). None when the mask
    leaves no pixel."""
    x, y = _pair(image, reference)
    keep = _allowed(mask, x.shape[:2])
    if not keep.any():
        return None
    mse = float(((x[keep] - y[keep]) ** 2).mean())
    value = math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return value if cap is None else min(value, cap)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The 1-D Gaussian of the SSIM window, normalised to sum 1 (the 2-D window is its outer product)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (1, C, H, W), same size out: reflect padding (edge-repeat for
    images too small to reflect)."""
    r = len(g) // 2
    C = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def ssim_map(image: Any, reference: Any, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(H, W) SSIM at every pixel, averaged over the channels (Wang et al. 2004, eq. 13):

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    means and (population) covariances weighted by the Gaussian window, data range 1,
    C1 = (0.01)^2, C2 = (0.03)^2."""
    x, y = _pair(image, reference)
    tx = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]  # (H, W, C) -> (1, C, H, W)
    ty = torch.from_numpy(np.ascontiguousarray(y)).permute(2, 0, 1)[None]
    g = gaussian_window(window, sigma)
    mu_x, mu_y = _filter(tx, g), _filter(ty, g)
    var_x = _filter(tx * tx, g) - mu_x * mu_x
    var_y = _filter(ty * ty, g) - mu_y * mu_y
    cov = _filter(tx * ty, g) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s[0].mean(dim=0).numpy()


def ssim(image: Any, reference: Any, mask: Any | None = None) -> float | None:
    """Mean SSIM over the pixels outside `mask` (edit = True); windows near the mask edge still see
    edited pixels, as SSIM is computed over the whole image first. None when no pixel is left."""
    s = ssim_map(image, reference)
    keep = _allowed(mask, s.shape)
    return float(s[keep].mean()) if keep.any() else None


# ---------------------------------------------------------------------- masks

def mask_iou(predicted: Any, ground_truth: Any) -> float:
    """Intersection over union of two masks, at the ground truth's size. Two empty masks agree: 1."""
    gt = as_bool_mask(ground_truth, _size_of(ground_truth))
    pred = as_bool_mask(predicted, (gt.shape[1], gt.shape[0]))
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def mask_area(mask: Any) -> float:
    """Fraction of the pixels inside the mask."""
    return float(as_bool_mask(mask, _size_of(mask)).mean())


def _size_of(mask: Any) -> tuple[int, int]:
    if isinstance(mask, Image.Image):
        return mask.size
    shape = tuple(np.shape(mask))
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ParameterError(f"a mask must be (h, w), (1, h, w) or (1, 1, h, w); got shape {tuple(np.shape(mask))}.")
    return shape[1], shape[0]


# ---------------------------------------------------------------------- user metrics

@dataclass
class MetricInputs:
    """What a user metric sees for one edit."""
    edited: Image.Image                 # the edited image at the input's size
    original: Image.Image               # the input image
    source_prompt: str
    target_prompt: str
    gt_mask: np.ndarray | None = None   # (H, W) bool ground-truth edit region, if known
    mask: np.ndarray | None = None      # (H, W) bool predicted DiffEdit mask, if one was used
    target_image: Image.Image | None = None  # the ideal edit, if known (synthetic benchmark)


MetricFn = Callable[[MetricInputs], "float | None"]
_REGISTRY: dict[str, MetricFn] = {}


def register_metric(name: str, fn: MetricFn) -> None:
    """Add a metric computed on every edit from now on: fn(MetricInputs) -> float or None (None:
    not defined for this edit, absent from the row). E.g. LPIPS or CLIP scores with weights you have."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ParameterError(f"a metric name must be an identifier (letters, digits, _), got {name!r}.")
    if name in BUILTIN_METRICS or name.startswith(("time_", "cache_")):
        raise ParameterError(f"{name!r} is a built-in column name; register the metric under another name.")
    if name in _REGISTRY:
        raise ParameterError(f"a metric named {name!r} is already registered; unregister_metric it first.")
    if not callable(fn):
        raise ParameterError(f"the metric {name!r} must be a function of MetricInputs, got {type(fn).__name__}.")
    _REGISTRY[name] = fn


def unregister_metric(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_metrics() -> dict[str, MetricFn]:
    return dict(_REGISTRY)


def load_metric(name: str, factory: str, weights: str | os.PathLike) -> MetricFn:
    """A user metric from a sweep config: `factory` is "package.module:function", called once
    with the path of the weights the user supplies; it returns fn(MetricInputs) -> float.
    Nothing is downloaded: a missing weights path is an error."""
    path = user_path(weights, ParameterError)
    if not path.exists():
        raise ParameterError(f"the weights {path} for metric {name!r} do not exist; give the path of weights you "
                             "have, or remove the metric from the config.")
    module_name, _, attr = str(factory).partition(":")
    if not module_name or not attr:
        raise ParameterError(f"the factory of metric {name!r} must read 'package.module:function', got {factory!r}.")
    try:
        make = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ParameterError(f"cannot import {factory!r} for metric {name!r} ({e}); check the module path.") from None
    fn = make(str(path))
    if not callable(fn):
        raise ParameterError(f"{factory!r} must return a function of MetricInputs, it returned {type(fn).__name__}.")
    return fn


# ---------------------------------------------------------------------- one edit

def edit_metrics(edited: Image.Image, original: Image.Image, gt_mask: np.ndarray | None = None,
                 mask: np.ndarray | None = None, extra: dict[str, MetricFn] | None = None,
                 source_prompt: str = "", target_prompt: str = "",
                 target_image: Image.Image | None = None) -> dict[str, float]:
    """The metrics of one edit as a flat dict. Keys appear only when defined:
    bg_psnr_gt / bg_ssim_gt / gt_mask_area (with a ground-truth mask), bg_psnr_mask /
    bg_ssim_mask / mask_area (with a predicted mask), mask_iou (with both), then `extra`."""
    out: dict[str, float] = {}
    for suffix, m in (("gt", gt_mask), ("mask", mask)):
        if m is None:
            continue
        for name, fn in (("bg_psnr", psnr), ("bg_ssim", ssim)):
            value = fn(edited, original, m)
            if value is not None:
                out[f"{name}_{suffix}"] = value
    if gt_mask is not None:
        out["gt_mask_area"] = mask_area(gt_mask)
    if mask is not None:
        out["mask_area"] = mask_area(mask)
    if mask is not None and gt_mask is not None:
        out["mask_iou"] = mask_iou(mask, gt_mask)
    inputs = MetricInputs(edited, original, source_prompt, target_prompt, gt_mask, mask, target_image)
    for name, fn in (extra if extra is not None else registered_metrics()).items():
        value = fn(inputs)
        if value is not None and math.isfinite(float(value)):
            out[name] = float(value)
    return out
