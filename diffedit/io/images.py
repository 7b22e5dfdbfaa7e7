"""Images in: loading that refuses bad files with one clear sentence, and the geometry that brings
an image to the model's multiple-of-8 size and back (written atomically by saving.py; masks and
panels as pictures: pictures.py).

Inputs (`load_image` for paths, `as_pil` for anything) always become RGB PIL images:
  - the file is fully decoded (PNG chunk checksums verified too), so a truncated or corrupt file
    fails here and not halfway through an edit; Pillow's LOAD_TRUNCATED_IMAGES is never touched;
  - EXIF orientation is applied (a phone photo comes out the way it is displayed);
  - transparency is flattened onto white (an `ImageWarning` says so once per process);
  - 16-bit and float grayscale are scaled to 8 bits, not clipped (rules in `_gray_to_uint8`);
  - sides below `min_side` (one latent cell, 8 px) and more than `max_pixels` pixels are refused.

Arrays and tensors (`as_pil`):
  numpy   (H, W), (H, W, 1|3|4): uint8 0-255, uint16 0-65535, bool, float in [0, 1]
  torch   (3, H, W), (1, 3, H, W) (also 1 or 4 channels): uint8 0-255, bool, or float with the
          rule: a float tensor with any negative value is read as [-1, 1] (the model's range),
          otherwise as [0, 1]; pass value_range=(-1, 1) to say it explicitly (an all-bright
          [-1, 1] image would otherwise be read as [0, 1]).

"""

from __future__ import annotations

import math
import os
import stat
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffedit.errors import ImageInputError, ParameterError
from diffedit.io.files import _reason, user_path

DEFAULT_MAX_PIXELS = 4096 * 4096
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
RANGE_TOLERANCE = 1e-3   # float inputs may overshoot their range by this much (then clipped)


class ImageWarning(UserWarning):
    """Something was done to an input image that the user should know about (e.g. alpha flattened)."""


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, ImageWarning, stacklevel=3)


# ---------------------------------------------------------------------- loading


def load_image(path: str | os.PathLike, *, min_side: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file into an RGB PIL image, or raise ImageInputError saying what is wrong.
    Anything that is not a path is handed to `as_pil`."""
    if not isinstance(path, (str, os.PathLike)):
        return as_pil(path, min_side=min_side, max_pixels=max_pixels)
    _positive(min_side=min_side, max_pixels=max_pixels)
    p = user_path(path, ImageInputError)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageInputError(f"the image file {p} does not exist; check the path.") from None
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot read the image file {p} ({_reason(e)}); check the path.") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageInputError(f"{p} is a folder, not an image file; pass the path of a PNG, JPEG or WebP image.")
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(f"{p} is not a regular file; pass the path of a PNG, JPEG or WebP image.")
    if st.st_size == 0:
        raise ImageInputError(f"the image file {p} is empty (0 bytes); re-export or re-download it.")
    image = _open_fully_decoded(p, max_pixels)
    return _prepare(image, str(p), min_side, max_pixels)


def _open_fully_decoded(p: Path, max_pixels: int) -> Image.Image:
    """Open, check the declared size before decoding, verify (PNG checksums), decode every pixel."""
    try:
        with warnings.catch_warnings(), open(p, "rb") as f:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(f)
            _check_pixels(probe.size, str(p), max_pixels)
            probe.verify()
            f.seek(0)
            image = Image.open(f)
            image.load()
            return first_frame(image, str(p))
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"{p} declares more than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} "
                              "pixels; refusing to decode it (downscale the image if you trust it).") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{p} is not an image Pillow can read (or its header is damaged); "
                              "pass a PNG, JPEG or WebP file.") from None
    except PermissionError:
        raise ImageInputError(f"cannot read {p} (permission denied); fix its permissions or copy it.") from None
    except MemoryError:
        raise ImageInputError(f"{p} is too large to decode in memory; downscale it first.") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, struct.error, ... on damaged data
        raise ImageInputError(f"the image file {p} is truncated or corrupt ({_reason(e)}); "
                              "re-export or re-download it.") from None


def first_frame(image: Image.Image, name: str) -> Image.Image:
    """An animated GIF, WebP or APNG is edited on its first frame, said once (README "Inputs")."""
    try:
        frames = getattr(image, "n_frames", 1)
    except (ValueError, OSError):  # a multi-frame image whose file is closed: its first frame is loaded
        return image
    if frames <= 1:
        return image
    _warn_once("animated", f"{name} is animated ({frames} frames); only its first frame is edited.")
    image.seek(0)
    image.load()
    return image.copy()


def as_pil(image: Any, *, min_side: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS,
           value_range: tuple[float, float] | None = None) -> Image.Image:
    """Any supported image (path, PIL image, numpy array, torch tensor: see the module docstring)
    as an RGB PIL image, checked like a loaded file."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, min_side=min_side, max_pixels=max_pixels)
    _positive(min_side=min_side, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "the image", max_pixels)
        try:
            image.load()
        except Exception as e:
            raise ImageInputError(f"the image is truncated or corrupt ({_reason(e)}); "
                                  "re-export or re-download it.") from None
        return _prepare(image, "the image", min_side, max_pixels)
    if isinstance(image, torch.Tensor):
        return _prepare(Image.fromarray(_tensor_to_uint8(image, value_range)), "the tensor", min_side, max_pixels)
    if isinstance(image, np.ndarray):
        return _prepare(Image.fromarray(_array_to_uint8(image)), "the array", min_side, max_pixels)
    raise ImageInputError(f"cannot use an object of type {type(image).__name__} as an image; pass a path, "
                          "a PIL image, a numpy array or a torch tensor.")


def _prepare(image: Image.Image, name: str, min_side: int, max_pixels: int) -> Image.Image:
    image = first_frame(image, name)
    image = _exif_upright(image)
    _check_pixels(image.size, name, max_pixels)
    w, h = image.size
    if min(w, h) < min_side:
        raise ImageInputError(f"{name} is {w} x {h} pixels, smaller than one latent cell ({min_side} x {min_side}); "
                              f"use an image at least {min_side} pixels on each side.")
    return to_rgb(image, name)


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (2..8); a broken EXIF block is ignored."""
    with suppress(Exception):
        if image.getexif().get(0x0112, 1) in range(2, 9):
            return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image, name: str = "the image", warn: bool = True) -> Image.Image:
    """Any PIL mode -> RGB: gray replicated, 16-bit/float scaled, palette expanded, alpha on white
    (with an ImageWarning once per process, unless warn=False)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # I;16*, I (32-bit), F (float)
        return Image.fromarray(_gray_to_uint8(np.asarray(image), name)).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ALPHA_MODES:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        return _flatten_on_white(image, name, warn)
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise ImageInputError(f"{name} has colour mode {mode!r}, which cannot be converted to RGB; "
                              "convert it to RGB first.") from None


def _flatten_on_white(rgba: Image.Image, name: str, warn: bool) -> Image.Image:
    if warn and rgba.getextrema()[3][0] < 255:
        _warn_once("alpha", f"{name} has transparency; transparent parts are composited onto white "
                            "(said once per process).")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float gray image to 8 bits without clipping:
    uint16 / 257; other integers: as is within [0, 255], / 257 within [0, 65535];
    floats: x 255 within [0, 1], as is within [0, 255]; anything else is stretched min..max."""
    a = np.asarray(a)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageInputError(f"{name} contains NaN or infinite values; fix the image data.")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        scale, offset = 1 / 257, 0.0
    elif a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif a.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        scale, offset = 1 / 257, 0.0
    else:
        scale, offset = 255.0 / max(hi - lo, 1e-12), lo
    return np.clip(np.rint((a.astype(np.float64) - offset) * scale), 0, 255).astype(np.uint8)


def _array_to_uint8(a: np.ndarray, name: str = "the array") -> np.ndarray:
    """numpy (H, W) or (H, W, 1|3|4) -> uint8 array Pillow understands."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        hint = " (channels go last: use array.transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageInputError(f"{name} has shape {a.shape}; an image array must be (H, W), (H, W, 3) or "
                              f"(H, W, 4){hint}.")
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a.astype(np.uint8) * 255)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return np.rint(a / 257.0).astype(np.uint8)
    if a.dtype.kind == "f":
        return _unit_float_to_uint8(a.astype(np.float32), (0.0, 1.0), name)
    raise ImageInputError(f"{name} has dtype {a.dtype}; use uint8 (0-255), uint16 (0-65535) or float in [0, 1].")


def _unit_float_to_uint8(a: np.ndarray, value_range: tuple[float, float], name: str) -> np.ndarray:
    lo, hi = value_range
    if not np.isfinite(a).all():
        raise ImageInputError(f"{name} contains NaN or infinite values; fix the image data.")
    slack = RANGE_TOLERANCE * (hi - lo)
    if a.size and (a.min() < lo - slack or a.max() > hi + slack):
        raise ImageInputError(f"{name} has values in [{a.min():.4g}, {a.max():.4g}], outside [{lo:g}, {hi:g}]; "
                              "rescale it (0-255 data: divide by 255).")
    return np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _tensor_to_uint8(tensor: torch.Tensor, value_range: tuple[float, float] | None,
                     name: str = "the tensor") -> np.ndarray:
    """torch (C, H, W) or (1, C, H, W), C in 1, 3, 4 -> uint8 (H, W[, C]); see the float rule above."""
    t = tensor.detach().cpu()
    t = t[0] if t.dim() == 4 and t.shape[0] == 1 else t[None] if t.dim() == 2 else t
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ImageInputError(f"{name} has shape {tuple(tensor.shape)}; an image tensor must be (3, H, W) or "
                              "(1, 3, H, W) (one image at a time: index a batch with tensor[i]).")
    a = (t.float() if t.dtype == torch.bfloat16 else t).permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
    a = a[..., 0] if a.shape[-1] == 1 else a
    if t.dtype in (torch.bool, torch.uint8):
        return _array_to_uint8(a, name)
    if not t.is_floating_point():
        raise ImageInputError(f"{name} has dtype {t.dtype}; use a float tensor in [-1, 1] or [0, 1], or uint8.")
    a = a.astype(np.float32)
    if value_range is None:
        value_range = (-1.0, 1.0) if a.size and np.nanmin(a) < 0 else (0.0, 1.0)
    return _unit_float_to_uint8(a, value_range, name)


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        side = math.isqrt(max_pixels)
        limit = f"{side} x {side} = " if side * side == max_pixels else ""
        fh = max(1, math.isqrt(max_pixels * h // w))  # the same aspect ratio, fw * fh <= max_pixels
        fw = max(1, fh * w // h)
        raise ImageInputError(f"{name} is {w} x {h} = {w * h / 1e6:.1f} MP, above the limit of "
                              f"{limit}{max_pixels / 1e6:.1f} MP ({max_pixels:,} pixels) that keeps memory in check; "
                              f"downscale it first, e.g. to {fw} x {fh} (the same aspect ratio).")


def _positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ParameterError(f"{key} must be a positive integer, got {value!r}.")


# ---------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where an image came from and the size the model works at, both (width, height)."""
    original_size: tuple[int, int]
    working_size: tuple[int, int]


def working_size(size: tuple[int, int], multiple: int = 8, resolution: int | None = None,
                 max_side: int | None = None) -> tuple[int, int]:
    """(width, height) for the model: the longer side scaled to `resolution` (if given), or down
    to `max_side` (if larger), aspect ratio kept, each side rounded to the nearest `multiple`
    (never below `multiple`, never above `max_side` rounded down)."""
    _positive(multiple=multiple, resolution=resolution, max_side=max_side)
    w, h = size
    scale = 1.0
    if resolution is not None:
        scale = resolution / max(w, h)
    elif max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
    ceiling = max(multiple, max_side // multiple * multiple) if max_side is not None else None

    def fit(side: int) -> int:
        n = max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)  # halves round up
        return min(n, ceiling) if ceiling is not None else n

    return fit(w), fit(h)


def fit_to_model(image: Any, multiple: int = 8, resolution: int | None = None,
                 max_side: int | None = None) -> tuple[torch.Tensor, Geometry]:
    """Resize to `working_size` (Lanczos) and return (1, 3, H', W') float32 pixels in [-1, 1]
    and the Geometry to `restore` the output with."""
    image = as_pil(image)
    size = working_size(image.size, multiple, resolution, max_side)
    resized = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
    return pil_to_tensor(resized), Geometry(original_size=image.size, working_size=size)


def restore(image_or_tensor: Image.Image | torch.Tensor, geometry: Geometry) -> Image.Image:
    """A model output (PIL image, or (3, H, W) / (1, 3, H, W) tensor in [-1, 1]) back at the
    input's size, resampled with Lanczos."""
    is_image = isinstance(image_or_tensor, Image.Image)
    image = to_rgb(image_or_tensor) if is_image else tensor_to_pil(image_or_tensor)
    if image.size == tuple(geometry.original_size):
        return image.copy() if image is image_or_tensor else image
    return image.resize(tuple(geometry.original_size), Image.Resampling.LANCZOS)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous() / 127.5 - 1.0  # (H, W, 3) -> (1, 3, H, W)


def tensor_to_pil(tensor: torch.Tensor, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) tensor -> RGB PIL image ((1, H, W) -> mode L). Values in
    `value_range` ([-1, 1], the model's, by default; None: the auto rule of `as_pil`)."""
    a = _tensor_to_uint8(tensor, value_range)
    return to_rgb(Image.fromarray(a)) if a.ndim == 3 else Image.fromarray(a, "L")
