"""Masks and panels as pictures: a latent mask or soft map brought to the input's size, a mask
painted over an image, a row of labelled images, and a user's mask image read and checked."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from diffedit.errors import ParameterError
from diffedit.io.images import Geometry, as_pil, load_image, to_rgb


def mask_to_pil(mask: torch.Tensor | np.ndarray | Image.Image, size: tuple[int, int] | Geometry,
                threshold: float | None = None) -> Image.Image:
    """A (h, w) mask or map (latent or pixel resolution; (1, h, w) and (1, 1, h, w) too) as a
    mode-L image of `size` (width, height; a Geometry means its original size).
    Values: bool, float in [0, 1], or uint8 0-255 (as a mode-L image). A binary mask (only 0s
    and 1s) is resized nearest-neighbour; a soft map bilinearly, then thresholded if `threshold`
    is given. The result is 0-255 (0 or 255 when binary or thresholded)."""
    width, height = size.original_size if isinstance(size, Geometry) else size
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    else:
        m = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2 or m.numel() == 0:
        raise ParameterError(f"a mask must be (h, w), (1, h, w) or (1, 1, h, w); got shape {tuple(m.shape)}.")
    m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    binary = bool(((m == 0) | (m == 1)).all())
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ParameterError("mask values must lie in [0, 1] (1 = edit, 0 = keep); normalise the map first.")
    if binary:
        m = F.interpolate(m[None, None], size=(height, width), mode="nearest-exact")[0, 0]
    else:
        m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0, 0].clamp(0, 1)
    if threshold is not None:
        m = (m > threshold).float()
    return Image.fromarray((m * 255).round().to(torch.uint8).numpy(), "L")


def overlay_mask(image: Any, mask: Any, colour: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5) -> Image.Image:
    """The image with `colour` blended in where the mask is set (soft masks: in proportion)."""
    if not 0 <= alpha <= 1:
        raise ParameterError(f"alpha must lie in [0, 1], got {alpha}.")
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ParameterError(f"colour must be three values in 0-255, got {colour!r}.")
    base = to_rgb(image) if isinstance(image, Image.Image) else as_pil(image, min_side=1)
    m = np.asarray(mask_to_pil(mask, base.size), dtype=np.float32)[..., None] / 255.0 * alpha
    out = np.asarray(base, dtype=np.float32) * (1 - m) + np.asarray(colour, dtype=np.float32) * m
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")


MAX_ENLARGED_SIDE = 2048  # side_by_side never enlarges a picture beyond this many pixels


def side_by_side(images: Sequence[Any], labels: Sequence[str] | None = None, gap: int = 8,
                 background: tuple[int, int, int] = (255, 255, 255), min_side: int = 1,
                 title: str | None = None) -> Image.Image:
    """A panel of images left to right (e.g. input | mask overlay | edit), `gap` pixels apart,
    vertically centred, with an optional label under each and a title above (one line per "\\n"). Images whose
    shorter side is under `min_side` are enlarged by a whole factor, nearest neighbour (every
    pixel becomes a k x k block: a 64 px image stays readable, nothing is invented), as long as
    the longer side stays within MAX_ENLARGED_SIDE (a 2 x 3000 strip is not blown up)."""
    if len(images) == 0:
        raise ParameterError("side_by_side needs at least one image.")
    if labels is not None and len(labels) != len(images):
        raise ParameterError(f"{len(labels)} labels for {len(images)} images; give one label per image.")
    pictures = [to_rgb(x) if isinstance(x, Image.Image) else as_pil(x, min_side=1) for x in images]
    layout = _Layout([p.size for p in pictures], labels, gap, min_side, title)
    pictures = [p.resize((p.width * k, p.height * k), Image.NEAREST) if k > 1 else p
                for p, k in zip(pictures, layout.factors)]
    height, font, title_height = layout.height, layout.font, layout.title_height
    panel = Image.new("RGB", layout.size, background)
    draw = ImageDraw.Draw(panel)
    if title:
        draw.multiline_text((gap // 2, gap // 2), title, fill=(0, 0, 0), font=font)
    x = 0
    for i, picture in enumerate(pictures):
        panel.paste(picture, (x, title_height + (height - picture.height) // 2))
        if labels:
            text_width = draw.textlength(str(labels[i]), font=font)
            draw.text((x + max(0, (picture.width - text_width) / 2), title_height + height + gap // 2), str(labels[i]),
                      fill=(0, 0, 0), font=font)
        x += picture.width + gap
    return panel


def side_by_side_size(sizes: Sequence[tuple[int, int]], labels: Sequence[str] | None = None, gap: int = 8,
                      min_side: int = 1, title: str | None = None) -> tuple[int, int]:
    """(width, height) of the panel `side_by_side` makes of images of these sizes, without drawing it."""
    return _Layout(sizes, labels, gap, min_side, title).size


class _Layout:
    """Where side_by_side puts things: each image's enlargement factor, the font, the heights of the
    picture row, the title and the labels, and the panel's size."""

    def __init__(self, sizes, labels, gap: int, min_side: int, title: str | None):
        self.factors = [max(1, min(-(-min_side // min(s)), MAX_ENLARGED_SIDE // max(s))) for s in sizes]
        self.height = max(s[1] * k for s, k in zip(sizes, self.factors))
        self.font = ImageFont.load_default(size=max(11, min(self.height // 14, 20)))
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

        def line_height(texts) -> int:
            return max(probe.multiline_textbbox((0, 0), str(t), font=self.font)[3] for t in texts) + gap

        self.title_height = line_height([title]) if title else 0
        width = sum(s[0] * k for s, k in zip(sizes, self.factors)) + gap * (len(sizes) - 1)
        self.size = (width, self.title_height + self.height + (line_height(labels) if labels else 0))


def read_mask_image(path: str, size: tuple[int, int]):
    """A mask image (white = edit, black = keep) as a (H, W) float tensor of 0s and 1s at the
    input's `size`. Another size with the same shape is resized (said once), gray levels are
    thresholded at 50% (said once); another shape or an all-black mask is refused."""
    mask = load_image(path, min_side=1).convert("L")
    (mw, mh), (w, h) = mask.size, size
    if mask.size != size:
        if abs(mw * h - w * mh) > max(w, h, mw, mh):  # aspect ratios differ by more than a pixel's worth
            raise ParameterError(f"the mask {path} is {mw} x {mh} pixels but the image is {w} x {h}, another shape; "
                                 "give a mask of the image's size (white = edit, black = keep).")
        warnings.warn(f"the mask {path} is {mw} x {mh} pixels; it was resized to the image's {w} x {h}.", UserWarning)
        mask = mask.resize(size, Image.Resampling.NEAREST)
    a = np.asarray(mask)
    gray = float(((a > 0) & (a < 255)).mean())
    if gray > 0:
        warnings.warn(f"the mask {path} is not black and white ({gray:.0%} of its pixels are gray); "
                      "it was thresholded at 50% (lighter = edit).", UserWarning)
    binary = a >= 128
    if not binary.any():
        raise ParameterError(f"the mask {path} is black everywhere, so nothing would be edited; "
                             "paint the region to edit in white.")
    return torch.from_numpy(binary.astype(np.float32))


def mask_picture(mask: torch.Tensor) -> Image.Image:
    """A (H, W) mask of 0s and 1s as a mode-L picture (0 or 255)."""
    return Image.fromarray((mask.numpy() * 255).astype("uint8"), "L")


def mask_tensor(mask) -> torch.Tensor:
    """A mask given as a tensor, a PIL image, an array or an image path, as a float tensor in [0, 1]."""
    if isinstance(mask, torch.Tensor):
        return mask.detach().float().cpu()
    pil = as_pil(mask) if not isinstance(mask, (str, os.PathLike)) else load_image(mask)
    return torch.from_numpy(np.asarray(pil.convert("L"), dtype=np.float32) / 255.0)


def latent_mask_of(mask, x0: torch.Tensor, soft: bool) -> torch.Tensor:
    """The mask as (B, 1, h, w) float at latent resolution, from a MaskResult, a tensor of
    latent or pixel size, or an image (values in [0, 1]). Another size is averaged over each latent
    cell (area); unless `soft`, the mask is then binary: a cell is edited when at least half of it
    is (so a mask picture of generate_mask reads back as the mask it shows, not grown)."""
    h, w = x0.shape[-2:]
    if hasattr(mask, "soft") and hasattr(mask, "mask"):   # a MaskResult
        m = (mask.soft if soft else mask.mask).float()
    else:
        m = mask_tensor(mask)
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1 or m.numel() == 0:
        raise ParameterError(f"a mask must be (h, w), (B, h, w) or (B, 1, h, w); got shape {tuple(m.shape)}.")
    if not bool(torch.isfinite(m).all()):
        raise ParameterError("the mask contains NaN or infinite values; pass values in [0, 1] (1 = edit, 0 = keep).")
    if m.min() < 0 or m.max() > 1:
        raise ParameterError("mask values must lie in [0, 1] (1 = edit, 0 = keep); rescale the mask.")
    if m.shape[-2:] != (h, w):
        m = F.interpolate(m, (h, w), mode="area")
    if not soft:
        marked = m.flatten(1).amax(1) > 0
        m = (m >= 0.5).float()
        if bool((marked & (m.flatten(1).amax(1) == 0)).any()):
            raise ParameterError(f"the mask marks no latent cell ({x0.shape[-1]} x {x0.shape[-2]} cells) by half or "
                                 "more, so nothing would be edited; mark a larger region, or pass soft_mask=True.")
    if m.shape[0] == 1 and x0.shape[0] > 1:
        m = m.expand(x0.shape[0], -1, -1, -1)
    if m.shape[0] != x0.shape[0]:
        raise ParameterError(f"{m.shape[0]} masks for {x0.shape[0]} images; give one mask per image.")
    return m.to(x0.device, torch.float32)
