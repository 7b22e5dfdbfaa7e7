"""Image input refused: every bad file, object or limit gives our exception with one useful sentence
and touches no file; damaged bytes anywhere in a valid file only ever raise that exception.

Valid inputs are tested in test_image_input.py, outputs in test_image_output.py."""

from __future__ import annotations

import errno
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from diffedit.errors import DiffEditError, ImageInputError, OutputFileError, ParameterError
from diffedit.io.images import as_pil, load_image
from reference_models import encoded, noise_image, raw_png, snapshot, write

pytestmark = pytest.mark.usefixtures("fresh_image_warnings")


# ---------------------------------------------------------------------- bad inputs (table)


def _truncated_png(tmp):
    data = encoded(noise_image(64, 64), "PNG")
    return write(tmp, "cut.png", data[: len(data) // 2])


def _png_without_end(tmp):
    return write(tmp, "noend.png", encoded(noise_image(64, 64), "PNG")[:-12])


def _png_bad_checksum(tmp):
    data = bytearray(encoded(noise_image(64, 64), "PNG"))
    data[len(data) // 2] ^= 0xFF
    return write(tmp, "flipped.png", bytes(data))


def _truncated_jpeg(tmp):
    data = encoded(noise_image(64, 64), "JPEG", quality=90)
    return write(tmp, "cut.jpg", data[: len(data) // 2])


def _jpeg_without_end(tmp):
    return write(tmp, "noend.jpg", encoded(noise_image(64, 64), "JPEG", quality=90)[:-2])


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
    ("tiny-5x5", lambda t: (noise_image(5, 5).save(t / "tiny.png"), t / "tiny.png")[1], {},
     ["5 x 5", "smaller than one latent cell", "at least 8"]),
    ("thin-7x100", lambda t: (noise_image(7, 100).save(t / "thin.png"), t / "thin.png")[1], {},
     ["7 x 100", "smaller than one latent cell"]),
    ("min-side-16", lambda t: (noise_image(12, 40).save(t / "s.png"), t / "s.png")[1], {"min_side": 16},
     ["12 x 40", "16 x 16"]),
    ("over-pixel-limit", lambda t: (noise_image(40, 40).save(t / "big.png"), t / "big.png")[1],
     {"max_pixels": 32 * 32}, ["40 x 40", "limit", "32 x 32", "1,024 pixels", "downscale it first, e.g. to 32 x 32"]),
    ("over-limit-jpeg", lambda t: (noise_image(64, 48).save(t / "big.jpg"), t / "big.jpg")[1],
     {"max_pixels": 1000}, ["64 x 48", "1,000 pixels"]),
    ("decompression-bomb", _bomb, {}, ["decompression-bomb", "pixels"]),
    # the header alone says 20 MP: refused before decoding (the pixel data is missing altogether)
    ("huge-declared", lambda t: write(t, "huge.png", raw_png(5000, 4000, 8, 2)), {},
     ["5000 x 4000 = 20.0 MP", "4096 x 4096 = 16.8 MP", "e.g. to 4578 x 3663"]),
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
    noise_image(40, 40).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression-bomb limit of 1,000 pixels"):
        load_image(tmp_path / "a.png")


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    noise_image(16, 16).save(path)
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
    noise_image(16, 16).save(tmp_path / "a.png")
    with pytest.raises(ParameterError, match="positive integer"):
        load_image(tmp_path / "a.png", **kwargs)


# ---------------------------------------------------------------------- properties


SEED_FILES = {"png": encoded(noise_image(24, 16, seed=5), "PNG"),
              "jpeg": encoded(noise_image(24, 16, seed=5), "JPEG", quality=90),
              "gif": encoded(noise_image(24, 16, seed=5).quantize(8), "GIF"),
              "webp": encoded(noise_image(24, 16, seed=5), "WEBP")}


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
