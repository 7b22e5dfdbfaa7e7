"""Image input/output: every bad input refused with our exception and a useful sentence (and no
file touched), odd-but-valid inputs converted to the right RGB pixels, the multiple-of-8 geometry
and its inverse, mask pictures and panels, and atomic outputs (refusals, failures midway, a
writer killed with SIGKILL, stale temporary files)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import diffedit.io.images as image_io
from diffedit.errors import (
    DiffEditError,
    ImageInputError,
    OutputFileError,
    ParameterError,
)
from diffedit.io.images import (
    Geometry,
    ImageWarning,
    as_pil,
    atomic_write,
    atomic_write_text,
    fit_to_model,
    load_image,
    pil_to_tensor,
    restore,
    save_image,
    tensor_to_pil,
    working_size,
)
from diffedit.io.pictures import mask_to_pil, overlay_mask, side_by_side

REPO = Path(__file__).resolve().parents[1]
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


# ---------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict:
    """Every entry under folder -> (kind, content hash): detects created, removed or changed files."""
    state = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            state[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            state[str(p.relative_to(folder))] = ("file", hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            state[str(p.relative_to(folder))] = ("other", p.stat().st_mode)
    return state


def noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test starts as a fresh process would: the once-per-process warnings not yet given."""
    image_io._warned.clear()
    yield
    image_io._warned.clear()


# ---------------------------------------------------------------------- bad inputs (table)


def _truncated_png(tmp):
    data = encoded(noise_rgb(64, 64), "PNG")
    return write(tmp, "cut.png", data[: len(data) // 2])


def _png_without_end(tmp):
    return write(tmp, "noend.png", encoded(noise_rgb(64, 64), "PNG")[:-12])


def _png_bad_checksum(tmp):
    data = bytearray(encoded(noise_rgb(64, 64), "PNG"))
    data[len(data) // 2] ^= 0xFF
    return write(tmp, "flipped.png", bytes(data))


def _truncated_jpeg(tmp):
    data = encoded(noise_rgb(64, 64), "JPEG", quality=90)
    return write(tmp, "cut.jpg", data[: len(data) // 2])


def _jpeg_without_end(tmp):
    return write(tmp, "noend.jpg", encoded(noise_rgb(64, 64), "JPEG", quality=90)[:-2])


def _fifo(tmp):
    p = tmp / "pipe.png"
    os.mkfifo(p)
    return p


def _broken_link(tmp):
    p = tmp / "link.png"
    p.symlink_to(tmp / "gone.png")
    return p


def _bomb(tmp):
    return write(tmp, "bomb.png", raw_png(100_000, 100_000, 8, 2))


BAD_FILES = [
    # id, make the path, load_image kwargs, the words the message must contain
    ("missing", lambda t: t / "missing.png", {}, ["missing.png", "does not exist"]),
    ("broken-symlink", _broken_link, {}, ["does not exist"]),
    ("directory", lambda t: (t / "photos.png").mkdir() or t / "photos.png", {}, ["is a folder", "PNG"]),
    ("fifo", _fifo, {}, ["not a regular file"]),
    ("nul-in-path", lambda t: str(t / "a\0b.png"), {}, ["cannot read"]),
    ("empty", lambda t: write(t, "empty.png", b""), {}, ["empty", "0 bytes"]),
    ("text-named-png", lambda t: write(t, "notes.png", b"these are my notes\n" * 20), {}, ["not an image"]),
    ("text-named-jpg", lambda t: write(t, "notes.jpg", b"\xff\xd8 not really"), {}, ["not an image", "damaged"]),
    ("truncated-png", _truncated_png, {}, ["truncated or corrupt", "re-export"]),
    ("png-without-iend", _png_without_end, {}, ["truncated"]),
    ("png-bad-checksum", _png_bad_checksum, {}, ["corrupt"]),
    ("truncated-jpeg", _truncated_jpeg, {}, ["truncated"]),
    ("jpeg-without-eoi", _jpeg_without_end, {}, ["truncated"]),
    ("tiny-5x5", lambda t: (noise_rgb(5, 5).save(t / "tiny.png"), t / "tiny.png")[1], {},
     ["5 x 5", "smaller than one latent cell", "at least 8"]),
    ("thin-7x100", lambda t: (noise_rgb(7, 100).save(t / "thin.png"), t / "thin.png")[1], {},
     ["7 x 100", "smaller than one latent cell"]),
    ("min-side-16", lambda t: (noise_rgb(12, 40).save(t / "s.png"), t / "s.png")[1], {"min_side": 16},
     ["12 x 40", "16 x 16"]),
    ("over-pixel-limit", lambda t: (noise_rgb(40, 40).save(t / "big.png"), t / "big.png")[1],
     {"max_pixels": 32 * 32}, ["40 x 40", "limit", "32 x 32", "1,024 pixels", "max_pixels"]),
    ("over-limit-jpeg", lambda t: (noise_rgb(64, 48).save(t / "big.jpg"), t / "big.jpg")[1],
     {"max_pixels": 1000}, ["64 x 48", "1,000 pixels"]),
    ("decompression-bomb", _bomb, {}, ["decompression-bomb", "pixels"]),
    # the header alone says 20 MP: refused before decoding (the pixel data is missing altogether)
    ("huge-declared", lambda t: write(t, "huge.png", raw_png(5000, 4000, 8, 2)), {},
     ["5000 x 4000 = 20.0 MP", "4096 x 4096 = 16.8 MP", "max_pixels"]),
]


@pytest.mark.parametrize("make, kwargs, words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files_refused_with_one_sentence(tmp_path, make, kwargs, words):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ImageInputError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert message.endswith(".") and "\n" not in message and message.count("; ") == 1, message
    assert info.value.__cause__ is None                   # no chained traceback for a user error
    assert snapshot(tmp_path) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pillow_warning_level_bomb_is_an_error(tmp_path, monkeypatch):
    """Above MAX_IMAGE_PIXELS Pillow only warns (below twice that); we refuse."""
    noise_rgb(40, 40).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression-bomb limit of 1,000 pixels"):
        load_image(tmp_path / "a.png")


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    noise_rgb(16, 16).save(path)
    real_open = open

    def no_permission(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    with pytest.raises(ImageInputError, match="permission denied"):
        load_image(path)


BAD_OBJECTS = [
    ("int", 3, ["type int"]),
    ("list", [[1, 2], [3, 4]], ["type list"]),
    ("array-chw", np.zeros((3, 16, 16), np.uint8), ["(3, 16, 16)", "channels go last"]),
    ("array-5d", np.zeros((2, 16, 16, 3, 1), np.uint8), ["shape"]),
    ("array-int64", np.zeros((16, 16), np.int64), ["int64", "uint8"]),
    ("array-float-255", np.full((16, 16, 3), 200.0), ["outside [0, 1]", "divide by 255"]),
    ("array-nan", np.full((16, 16), np.nan, np.float32), ["NaN"]),
    ("array-tiny", np.zeros((4, 30), np.uint8), ["30 x 4", "smaller"]),
    ("tensor-batch", torch.zeros(2, 3, 16, 16), ["(2, 3, 16, 16)", "tensor[i]"]),
    ("tensor-hwc", torch.zeros(16, 16, 3), ["(16, 16, 3)"]),
    ("tensor-255", torch.full((3, 16, 16), 128.0), ["outside [0, 1]"]),
    ("tensor-below-minus-one", torch.full((3, 16, 16), -3.0), ["outside [-1, 1]"]),
    ("tensor-int32", torch.zeros(3, 16, 16, dtype=torch.int32), ["torch.int32"]),
    ("tensor-inf", torch.full((3, 16, 16), float("inf")), ["NaN or infinite"]),
    ("pil-huge-for-limit", Image.new("RGB", (5000, 4000)), ["5000 x 4000", "4096 x 4096 = 16.8 MP"]),
]


@pytest.mark.parametrize("obj, words", [b[1:] for b in BAD_OBJECTS], ids=[b[0] for b in BAD_OBJECTS])
def test_bad_objects_refused(obj, words):
    with pytest.raises(ImageInputError) as info:
        as_pil(obj)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_lazily_opened_truncated_pil_image(tmp_path):
    path = _truncated_png(tmp_path)
    lazy = Image.open(path)                    # Pillow reads only the header here
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        as_pil(lazy)
    lazy.close()


@pytest.mark.parametrize("kwargs", [{"min_side": 0}, {"max_pixels": -1}, {"min_side": 2.5}, {"max_pixels": True}])
def test_limit_parameters_checked(tmp_path, kwargs):
    noise_rgb(16, 16).save(tmp_path / "a.png")
    with pytest.raises(ParameterError, match="positive integer"):
        load_image(tmp_path / "a.png", **kwargs)


# ---------------------------------------------------------------------- odd but valid inputs


def _gray16_png(tmp):
    values = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp / "g16.png")
    return tmp / "g16.png", np.rint(values / 257.0)


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    path, expected = _gray16_png(tmp_path)
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path)).astype(np.int64)
    assert out.shape == (16, 16, 3) and (out == out[..., :1]).all()
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200   # a full ramp, not all 255


def test_16_bit_rgb_png(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(12))
    path = write(tmp_path, "rgb16.png", raw_png(10, 12, 16, 2, rows))
    out = np.asarray(load_image(path)).astype(np.int64)
    assert out.shape == (12, 10, 3)
    assert np.abs(out - values / 257.0).max() <= 1.0          # Pillow keeps the high byte


@pytest.mark.parametrize("mode, data, expected", [
    ("I", np.array([[0, 100, 255]] * 8, np.int32), [0, 100, 255]),                   # 8-bit range: as is
    ("I", np.array([[0, 1000, 65535]] * 8, np.int32), [0, 4, 255]),                  # 16-bit range: / 257
    ("I", np.array([[-10, 0, 10]] * 8, np.int32), [0, 128, 255]),                    # otherwise min..max
    ("F", np.array([[0.0, 0.5, 1.0]] * 8, np.float32), [0, 128, 255]),               # [0, 1]: x 255
    ("F", np.array([[0.0, 64.0, 255.0]] * 8, np.float32), [0, 64, 255]),             # [0, 255]: as is
    ("F", np.array([[-2.0, 0.0, 2.0]] * 8, np.float32), [0, 128, 255]),              # otherwise min..max
])
def test_wide_gray_modes_scaled(mode, data, expected):
    data = np.repeat(data, 3, axis=1)                                                 # 8 x 9
    image = Image.fromarray(data, mode)
    out = np.asarray(as_pil(image))[0, ::3, 0]
    np.testing.assert_array_equal(out, expected)


def test_float_image_with_nan_refused():
    with pytest.raises(ImageInputError, match="NaN"):
        as_pil(Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"))


def test_alpha_flattened_on_white_and_said_once(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :6, 3] = 255                      # left half opaque red-ish, right half transparent
    rgba[:, 6:, 3] = 0
    rgba[0, 0, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = np.asarray(load_image(tmp_path / "a.png")).astype(int)
        load_image(tmp_path / "a.png")
        as_pil(Image.fromarray(rgba, "RGBA").convert("LA"))
    said = [w for w in caught if issubclass(w.category, ImageWarning)]
    assert len(said) == 1 and "white" in str(said[0].message)
    np.testing.assert_array_equal(first[1, 1], [200, 0, 0])
    np.testing.assert_array_equal(first[1, 8], [255, 255, 255])
    np.testing.assert_allclose(first[0, 0], [200 * 128 / 255 + 255 * 127 / 255, 255 * 127 / 255,
                                             255 * 127 / 255], atol=1)


def test_opaque_alpha_is_not_mentioned():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageWarning)
        out = as_pil(Image.new("RGBA", (9, 9), (1, 2, 3, 255)))
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (1, 2, 3)


def test_gray_with_alpha(tmp_path):
    Image.fromarray(np.stack([np.full((9, 9), 40, np.uint8), np.zeros((9, 9), np.uint8)], -1), "LA").save(
        tmp_path / "la.png")
    with pytest.warns(ImageWarning):
        out = load_image(tmp_path / "la.png")
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    indices = np.zeros((10, 10), np.uint8)
    indices[:, 5:] = 1
    palette = [10, 20, 30, 200, 100, 50] + [0] * 762
    p = Image.fromarray(indices, "P")
    p.putpalette(palette)
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "pt.png", transparency=1)
    p.save(tmp_path / "pt.gif", transparency=1)
    plain = load_image(tmp_path / "p.png")
    assert plain.getpixel((0, 0)) == (10, 20, 30) and plain.getpixel((9, 0)) == (200, 100, 50)
    with pytest.warns(ImageWarning):
        for name in ("pt.png", "pt.gif"):
            clear = load_image(tmp_path / name)
            assert clear.getpixel((0, 0)) == (10, 20, 30) and clear.getpixel((9, 0)) == (255, 255, 255), name


def test_cmyk_and_other_modes(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (0, 0, 8, 16))                  # no cyan, full magenta + yellow: red
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tiff")
    for name in ("c.jpg", "c.tiff"):
        out = load_image(tmp_path / name)
        r, g, b = out.getpixel((3, 8))
        assert r > 240 and g < 15 and b < 15, (name, out.getpixel((3, 8)))
        assert min(out.getpixel((12, 8))) > 240, name
    bilevel = Image.new("1", (9, 9), 1)
    assert as_pil(bilevel).getpixel((0, 0)) == (255, 255, 255)
    ycc = Image.new("RGB", (9, 9), (10, 200, 30)).convert("YCbCr")
    assert np.abs(np.subtract(as_pil(ycc).getpixel((1, 1)), (10, 200, 30))).max() <= 3


def test_unconvertible_mode_refused():
    lab = Image.new("LAB", (9, 9))
    try:
        lab.convert("RGB")
    except ValueError:                      # this Pillow cannot convert it: we must say so
        with pytest.raises(ImageInputError, match="colour mode 'LAB'"):
            as_pil(lab)
    else:
        assert as_pil(lab).mode == "RGB"


@pytest.mark.parametrize("orientation, corner", [(1, (2, 2)), (3, (17, 37)), (6, (17, 2)), (8, (2, 37))])
def test_exif_orientation_respected(tmp_path, orientation, corner):
    """The stored image is 40 x 20 with a red block at its top-left; the tag says how to display it."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "photo.jpg")
    assert out.size == ((40, 20) if orientation in (1, 3) else (20, 40))
    x, y = corner if orientation != 3 else (37, 17)
    r, g, b = out.getpixel((x, y))
    assert r > 200 and b < 60, (orientation, out.getpixel((x, y)))
    assert out.getpixel((out.width // 2, out.height // 2))[2] > 200


def test_webp_and_gif_files(tmp_path):
    image = Image.new("RGB", (24, 16), (30, 160, 90))
    image.save(tmp_path / "a.webp", lossless=True)
    image.save(tmp_path / "a.gif")
    assert load_image(tmp_path / "a.webp").getpixel((5, 5)) == (30, 160, 90)
    assert load_image(tmp_path / "a.gif").size == (24, 16)


def test_path_forms(tmp_path, monkeypatch):
    noise_rgb(16, 16).save(tmp_path / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_image("~/a.png").size == (16, 16)
    assert load_image(str(tmp_path / "a.png")).size == (16, 16)
    assert as_pil(tmp_path / "a.png").size == (16, 16)


ARRAYS = [
    ("gray-uint8", np.full((9, 10), 77, np.uint8), (77, 77, 77)),
    ("gray-1-channel", np.full((9, 10, 1), 77, np.uint8), (77, 77, 77)),
    ("rgb-uint8", np.full((9, 10, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
    ("rgb-uint16", np.full((9, 10, 3), (0, 257 * 100, 65535), np.uint16), (0, 100, 255)),
    ("rgb-float64", np.full((9, 10, 3), (0.0, 0.5, 1.0)), (0, 128, 255)),
    ("rgb-float16-overshoot", np.full((9, 10, 3), (0.0, 0.5, 1.0004), np.float16), (0, 128, 255)),
    ("rgba-float", np.concatenate([np.zeros((9, 10, 3)), np.ones((9, 10, 1))], -1), (0, 0, 0)),
    ("bool", np.ones((9, 10), bool), (255, 255, 255)),
    ("tensor-minus-one-one", torch.tensor([-1.0, 0.0, 1.0])[:, None, None].expand(3, 9, 10), (0, 128, 255)),
    ("tensor-zero-one", torch.tensor([0.0, 0.5, 1.0])[:, None, None].expand(3, 9, 10), (0, 128, 255)),
    ("tensor-batch-of-one", torch.full((1, 3, 9, 10), -1.0), (0, 0, 0)),
    ("tensor-uint8", torch.full((3, 9, 10), 200, dtype=torch.uint8), (200, 200, 200)),
    ("tensor-bf16", torch.zeros(3, 9, 10, dtype=torch.bfloat16), (0, 0, 0)),
    ("tensor-gray", torch.full((1, 9, 10), 0.25), (64, 64, 64)),
    ("tensor-requires-grad", torch.zeros(3, 9, 10, requires_grad=True), (0, 0, 0)),
]


@pytest.mark.parametrize("obj, pixel", [a[1:] for a in ARRAYS], ids=[a[0] for a in ARRAYS])
def test_arrays_and_tensors(obj, pixel):
    out = as_pil(obj)
    assert out.mode == "RGB" and out.size == (10, 9)
    assert out.getpixel((4, 4)) == pixel


def test_tensor_range_rule_can_be_stated():
    bright = torch.full((3, 8, 8), 0.5)                  # auto: [0, 1] -> 128; stated [-1, 1] -> 191
    assert as_pil(bright).getpixel((0, 0)) == (128,) * 3
    assert as_pil(bright, value_range=(-1, 1)).getpixel((0, 0)) == (191,) * 3
    assert tensor_to_pil(bright).getpixel((0, 0)) == (191,) * 3     # outputs: [-1, 1] by default


def test_pil_input_kept_and_not_mutated():
    image = noise_rgb(20, 12)
    before = image.tobytes()
    out = as_pil(image)
    assert out.tobytes() == before and image.tobytes() == before


# ---------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size, kwargs, expected", [
    ((512, 512), {}, (512, 512)),
    ((500, 333), {}, (504, 336)),
    ((20, 12), {}, (24, 16)),                                  # halves round up
    ((1000, 600), {"resolution": 512}, (512, 304)),
    ((600, 1000), {"resolution": 512}, (304, 512)),
    ((64, 48), {"resolution": 512}, (512, 384)),               # resolution also upscales
    ((100, 50), {"max_side": 64}, (64, 32)),
    ((30, 20), {"max_side": 64}, (32, 24)),                    # max_side never upscales
    ((61, 61), {"max_side": 60}, (56, 56)),                    # never above max_side
    ((8, 4000), {"resolution": 512}, (8, 512)),                # never below one multiple
    ((3000, 2000), {"multiple": 64}, (3008, 1984)),
])
def test_working_size(size, kwargs, expected):
    assert working_size(size, **kwargs) == expected


@pytest.mark.parametrize("kwargs", [{"multiple": 0}, {"resolution": -5}, {"max_side": "512"}, {"resolution": 1.5}])
def test_geometry_parameters_checked(kwargs):
    with pytest.raises(ParameterError, match="positive integer"):
        fit_to_model(noise_rgb(16, 16), **kwargs)


def test_fit_and_restore_exact_at_aligned_size():
    image = noise_rgb(40, 24)
    pixels, geometry = fit_to_model(image)
    assert geometry == Geometry(original_size=(40, 24), working_size=(40, 24))
    assert pixels.shape == (1, 3, 24, 40) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), np.asarray(image) / 127.5 - 1, atol=1e-6)
    assert restore(pixels[0], geometry).tobytes() == image.tobytes()
    assert restore(pixels, geometry).tobytes() == image.tobytes()
    assert tensor_to_pil(pil_to_tensor(image)).tobytes() == image.tobytes()


def test_fit_and_restore_resampled():
    image = Image.new("RGB", (500, 333), (200, 40, 90))
    pixels, geometry = fit_to_model(image, resolution=64)
    assert pixels.shape == (1, 3, 40, 64) and geometry.working_size == (64, 40)
    assert pixels.min() >= -1 and pixels.max() <= 1
    back = restore(pixels, geometry)
    assert back.size == (500, 333) and back.mode == "RGB"
    assert np.abs(np.asarray(back).astype(int) - (200, 40, 90)).max() <= 1    # flat colour survives
    assert restore(tensor_to_pil(pixels), geometry).size == (500, 333)


# ---------------------------------------------------------------------- masks and panels


def test_binary_mask_nearest():
    mask = torch.tensor([[True, False], [False, True]])
    out = np.asarray(mask_to_pil(mask, (4, 4)))
    np.testing.assert_array_equal(out, np.kron([[255, 0], [0, 255]], np.ones((2, 2), int)))
    assert mask_to_pil(mask.float()[None, None], (4, 4)).tobytes() == out.tobytes()
    assert mask_to_pil(np.array([[255, 0], [0, 255]], np.uint8), (4, 4)).tobytes() == out.tobytes()


def test_soft_map_bilinear_then_threshold():
    soft = torch.tensor([[0.0, 0.2], [0.6, 1.0]])
    geometry = Geometry(original_size=(30, 20), working_size=(16, 16))
    smooth = mask_to_pil(soft, geometry)
    assert smooth.mode == "L" and smooth.size == (30, 20)
    values = np.asarray(smooth)
    assert len(np.unique(values)) > 10 and values.min() == 0 and values.max() == 255
    hard = np.asarray(mask_to_pil(soft, geometry, threshold=0.5))
    assert set(np.unique(hard)) == {0, 255}
    disagree = (hard == 255) != (values > 127.5)
    assert (np.abs(values[disagree].astype(int) - 127.5) <= 1).all()          # only rounding ties


@pytest.mark.parametrize("mask, words", [
    (torch.tensor([[0.0, 2.0]]), "lie in [0, 1]"),
    (torch.tensor([[float("nan"), 0.0]]), "lie in [0, 1]"),
    (torch.zeros(2, 3, 3), "(2, 3, 3)"),
    (torch.zeros(0, 0), "(0, 0)"),
])
def test_bad_masks(mask, words):
    with pytest.raises(ParameterError) as info:
        mask_to_pil(mask, (8, 8))
    assert words in str(info.value)


def test_overlay_mask():
    image = Image.new("RGB", (8, 8), (0, 100, 200))
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    out = overlay_mask(image, mask, colour=(255, 0, 0), alpha=0.5)
    assert out.getpixel((1, 1)) == (128, 50, 100) and out.getpixel((6, 6)) == (0, 100, 200)
    with pytest.raises(ParameterError):
        overlay_mask(image, mask, alpha=1.5)
    with pytest.raises(ParameterError):
        overlay_mask(image, mask, colour=(300, 0, 0))


def test_side_by_side():
    a, b, c = Image.new("RGB", (10, 12), "red"), Image.new("L", (6, 8), 255), Image.new("RGB", (10, 12), "blue")
    panel = side_by_side([a, b, c], gap=4)
    assert panel.size == (10 + 4 + 6 + 4 + 10, 12)
    assert panel.getpixel((0, 0)) == (255, 0, 0) and panel.getpixel((14, 6)) == (255, 255, 255)
    assert panel.getpixel((12, 6)) == (255, 255, 255) and panel.getpixel((29, 11)) == (0, 0, 255)
    labelled = side_by_side([a, b, c], ["input", "mask", "edit"], gap=4)
    assert labelled.width == panel.width and labelled.height > panel.height
    assert np.asarray(labelled)[12:].min() < 100                   # some dark label text was drawn
    big = side_by_side([a, b, c], ["input", "mask", "edit"], gap=4, min_side=30, title="a -> b")
    assert big.width == 3 * 10 + 4 + 5 * 6 + 4 + 3 * 10              # whole factors: 3, 5 (ceil(30 / 6)), 3
    assert np.asarray(big)[:, :30].reshape(-1, 3).tolist().count([255, 0, 0]) == 30 * 36   # every pixel a 3x3 block
    assert big.height > 5 * 8 and np.asarray(big)[:8].min() < 100    # the title line, dark text on top
    strip = side_by_side([Image.new("RGB", (3000, 2)), Image.new("RGB", (300, 8))], gap=0, min_side=256)
    assert strip.size == (3000 + 300 * 6, 6 * 8)   # never enlarged past MAX_ENLARGED_SIDE (2048 // 300 = 6)
    with pytest.raises(ParameterError, match="2 labels for 3 images"):
        side_by_side([a, b, c], ["x", "y"])
    with pytest.raises(ParameterError, match="at least one"):
        side_by_side([])


# ---------------------------------------------------------------------- atomic outputs


@pytest.mark.parametrize("name, fmt", [("o.png", "PNG"), ("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")])
def test_save_image_formats(tmp_path, name, fmt):
    image = Image.new("RGB", (16, 8), (10, 120, 240))
    assert save_image(image, tmp_path / name) == tmp_path / name
    with Image.open(tmp_path / name) as saved:
        assert saved.format == fmt and saved.size == (16, 8)
        assert np.abs(np.asarray(saved.convert("RGB")).astype(int) - (10, 120, 240)).max() <= 6
    assert sorted(os.listdir(tmp_path)) == [name]


def test_save_image_keeps_masks_gray_and_flattens_for_jpeg(tmp_path):
    save_image(Image.new("L", (8, 8), 255), tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "L"
    save_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").convert("RGB").getpixel((4, 4)) >= (250, 250, 250)
    save_image(torch.zeros(3, 8, 8), tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").getpixel((1, 1)) == (0, 0, 0)


def _link_to_input(tmp):
    (tmp / "view.png").symlink_to(tmp / "input.png")
    return tmp / "view.png"


def _hardlink_to_input(tmp):
    os.link(tmp / "input.png", tmp / "hard.png")
    return tmp / "hard.png"


def _unwritable(tmp, monkeypatch):
    monkeypatch.setattr(image_io.os, "access", lambda *a, **k: False)
    return tmp / "out.png"


def _temp_not_creatable(tmp, monkeypatch):
    real_open = os.open

    def refuse_temps(path, *args, **kwargs):
        if ".tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image_io.os, "open", refuse_temps)
    return tmp / "out.png"


BAD_OUTPUTS = [
    # id, make the target, save kwargs, the words the message must contain
    ("exists", lambda t, m: t / "existing.png", {}, ["already exists", "overwrite"]),
    ("is-input", lambda t, m: t / "input.png", {"overwrite": True}, ["is one of the inputs"]),
    ("is-input-relative", lambda t, m: t / "sub" / ".." / "input.png", {"overwrite": True}, ["inputs"]),
    ("symlink-to-input", lambda t, m: _link_to_input(t), {"overwrite": True}, ["inputs"]),
    ("hardlink-to-input", lambda t, m: _hardlink_to_input(t), {"overwrite": True}, ["inputs"]),
    ("missing-folder", lambda t, m: t / "nowhere" / "out.png", {}, ["nowhere", "does not exist", "create it"]),
    ("folder-is-a-file", lambda t, m: t / "existing.png" / "out.png", {}, ["is not a folder"]),
    ("target-is-folder", lambda t, m: t / "sub.png", {"overwrite": True}, ["is a folder"]),
    ("unknown-suffix", lambda t, m: t / "out.bmp", {}, ["'.bmp'", ".png, .jpg"]),
    ("no-suffix", lambda t, m: t / "out", {}, ["(none)"]),
    ("not-writable", _unwritable, {}, ["not writable"]),
    ("temp-not-creatable", _temp_not_creatable, {}, ["cannot create a file", "Permission denied"]),
]


@pytest.mark.parametrize("make, kwargs, words", [b[1:] for b in BAD_OUTPUTS], ids=[b[0] for b in BAD_OUTPUTS])
def test_bad_outputs_refused(tmp_path, monkeypatch, make, kwargs, words):
    noise_rgb(16, 16, seed=1).save(tmp_path / "input.png")
    noise_rgb(16, 16, seed=2).save(tmp_path / "existing.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub.png").mkdir()
    target = make(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    with pytest.raises(OutputFileError) as info:
        save_image(noise_rgb(16, 16, seed=3), target, protected=[tmp_path / "input.png"], **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert message.endswith(".") and "\n" not in message
    assert snapshot(tmp_path) == before


def test_overwrite_allowed(tmp_path):
    noise_rgb(16, 16, seed=2).save(tmp_path / "existing.png")
    new = noise_rgb(16, 16, seed=3)
    save_image(new, tmp_path / "existing.png", overwrite=True, protected=[tmp_path / "other.png"])
    assert Image.open(tmp_path / "existing.png").tobytes() == new.tobytes()
    assert os.listdir(tmp_path) == ["existing.png"]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error, expected", [
    (Boom("midway"), Boom),
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), OutputFileError),
])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_nothing(tmp_path, error, expected, existing):
    target = tmp_path / "table.csv"
    if existing:
        target.write_text("old,content\n")
    before = snapshot(tmp_path)

    def write_then_fail(f):
        f.write(b"x" * 100_000)
        raise error

    with pytest.raises(expected) as info:
        atomic_write(target, write_then_fail, overwrite=True)
    if expected is OutputFileError:
        assert "No space left on device" in str(info.value)
    assert snapshot(tmp_path) == before


def test_file_created_meanwhile_is_not_clobbered(tmp_path):
    target = tmp_path / "out.json"

    def racing_writer(f):
        target.write_text("someone else's")
        f.write(b"mine")

    with pytest.raises(OutputFileError, match="created by someone else"):
        atomic_write(target, racing_writer)
    assert target.read_text() == "someone else's" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "r.json", '{"é": 1}\n')
    assert (tmp_path / "r.json").read_bytes() == '{"é": 1}\n'.encode()
    with pytest.raises(OutputFileError, match="already exists"):
        atomic_write_text(tmp_path / "r.json", "{}")
    atomic_write_text(tmp_path / "r.json", "{}", overwrite=True)
    assert (tmp_path / "r.json").read_text() == "{}" and os.listdir(tmp_path) == ["r.json"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_processes_cleaned(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.csv.tmp-{dead}-0123abcd"
    busy = tmp_path / f".out.csv.tmp-{alive}-0123abcd"          # a writer that still runs: kept
    other = tmp_path / f".other.csv.tmp-{dead}-0123abcd"        # another target's temp: not ours to judge
    lookalike = tmp_path / ".out.csv.tmp-notes"
    for p in (stale, busy, other, lookalike):
        p.write_text("partial")
    atomic_write_text(tmp_path / "out.csv", "a,b\n")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.csv", busy.name, other.name, lookalike.name])


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from diffedit.io.images import atomic_write

    def write(f):
        chunk = b"x" * (1 << 20)
        for i in range(10_000):
            f.write(chunk)
            f.flush()
            if i == 8:
                print("writing", flush=True)
            time.sleep(0.005)

    atomic_write(sys.argv[1], write, overwrite=True)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_midway_leaves_no_partial_output(tmp_path, existing):
    target = tmp_path / "big.bin"
    if existing:
        target.write_bytes(b"previous result")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()
    if existing:
        assert target.read_bytes() == b"previous result"
    else:
        assert not target.exists()
    leftovers = [n for n in os.listdir(tmp_path) if n != "big.bin"]
    assert len(leftovers) == 1
    match = TEMP_NAME.match(leftovers[0])
    assert match and match["name"] == "big.bin" and int(match["pid"]) == writer.pid
    assert (tmp_path / leftovers[0]).stat().st_size >= 9 << 20          # it really was killed mid-write
    atomic_write(target, lambda f: f.write(b"next run"), overwrite=True)
    assert target.read_bytes() == b"next run" and os.listdir(tmp_path) == ["big.bin"]


# ---------------------------------------------------------------------- properties


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 70000, (h, w)).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.normal(0, 3, (h, w)).astype(np.float32), "F")
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(16)
    return rgba.convert(mode)


FILE_FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "TIFF": tuple(MODES),   # what Pillow writes
                "JPEG": ("1", "L", "RGB", "CMYK", "YCbCr"), "WEBP": ("L", "P", "RGB", "RGBA")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), w=st.integers(1, 70), h=st.integers(1, 70), seed=st.integers(0, 2**16),
       fmt=st.sampled_from([None, "PNG", "TIFF", "JPEG", "WEBP"]),
       resolution=st.one_of(st.none(), st.integers(1, 96)), max_side=st.one_of(st.none(), st.integers(8, 96)))
def test_property_load_fit_restore(tmp_path, mode, w, h, seed, fmt, resolution, max_side):
    image = make_image(mode, w, h, seed)
    source = image
    if fmt is not None and mode in FILE_FORMATS[fmt]:
        source = tmp_path / f"x.{fmt.lower()}"
        image.save(source, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        try:
            loaded = load_image(source)
        except ImageInputError as e:
            assert min(w, h) < 8 and "smaller than one latent cell" in str(e)
            return
    assert min(w, h) >= 8 and loaded.mode == "RGB" and loaded.size == (w, h)
    pixels, geometry = fit_to_model(loaded, resolution=resolution, max_side=max_side)
    H, W = pixels.shape[-2:]
    assert pixels.shape[:2] == (1, 3) and H % 8 == 0 and W % 8 == 0 and H >= 8 and W >= 8
    assert geometry.working_size == (W, H) and geometry.original_size == (w, h)
    assert pixels.min() >= -1 and pixels.max() <= 1 and torch.isfinite(pixels).all()
    if max_side is not None and resolution is None:
        assert max(H, W) <= max(8, max_side // 8 * 8)
    edited = torch.tanh(pixels * 3)                                  # any model output in [-1, 1]
    assert restore(edited, geometry).size == (w, h)
    assert mask_to_pil(torch.rand(H // 8, W // 8), geometry, threshold=0.5).size == (w, h)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 10_000), h=st.integers(1, 10_000), resolution=st.integers(8, 2048),
       multiple=st.sampled_from([8, 16, 64]))
def test_property_working_size(w, h, resolution, multiple):
    W, H = working_size((w, h), multiple=multiple, resolution=resolution)
    assert W % multiple == 0 and H % multiple == 0 and W >= multiple and H >= multiple
    longer = W if w >= h else H
    assert abs(longer - resolution) <= multiple / 2 or longer == multiple
    if min(W, H) > 4 * multiple:                                     # aspect kept up to rounding
        assert abs(W / H - w / h) <= (w / h) * 0.5 * (multiple / min(W, H)) * 2.5


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(["uint8", "uint16", "float32", "float64", "bool"]),
       channels=st.sampled_from([0, 1, 3, 4]), h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 99))
def test_property_arrays(dtype, channels, h, w, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 0 else (h, w, channels)
    if dtype == "bool":
        a = rng.random(shape) > 0.5
    elif dtype.startswith("float"):
        a = rng.random(shape).astype(dtype)
    else:
        a = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        try:
            out = as_pil(a)
        except ImageInputError as e:
            assert min(h, w) < 8 and "smaller" in str(e)
            return
    assert out.mode == "RGB" and out.size == (w, h)


SEED_FILES = {"png": encoded(noise_rgb(24, 16, seed=5), "PNG"),
              "jpeg": encoded(noise_rgb(24, 16, seed=5), "JPEG", quality=90),
              "gif": encoded(noise_rgb(24, 16, seed=5).quantize(8), "GIF"),
              "webp": encoded(noise_rgb(24, 16, seed=5), "WEBP")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(SEED_FILES)), data=st.data())
def test_property_damaged_files_only_raise_our_error(tmp_path, kind, data):
    """Cut or scribble over a valid file anywhere: the load works or says so with ImageInputError."""
    raw = bytearray(SEED_FILES[kind])
    if data.draw(st.booleans(), "truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), "cut at")]
    else:
        for _ in range(data.draw(st.integers(1, 4), "flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), "at")] = data.draw(st.integers(0, 255), "byte")
    path = write(tmp_path, f"d.{kind}", bytes(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = load_image(path)
        except ImageInputError as e:
            assert str(e).endswith(".") and "\n" not in str(e)
            return
    assert out.mode == "RGB" and min(out.size) >= 8


def test_every_error_is_a_diffedit_error():
    assert issubclass(ImageInputError, DiffEditError) and issubclass(OutputFileError, DiffEditError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
