"""Image input: odd-but-valid inputs (16-bit, alpha, palettes, CMYK, EXIF rotation, arrays and tensors)
converted to the right RGB pixels, the multiple-of-8 geometry and its inverse, and property tests over
modes, sizes and formats.

Refusals are tested in test_image_refusals.py, outputs in test_image_output.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffedit.errors import ImageInputError, ParameterError
from diffedit.io.images import (
    Geometry,
    ImageWarning,
    as_pil,
    fit_to_model,
    load_image,
    pil_to_tensor,
    restore,
    tensor_to_pil,
    working_size,
)
from diffedit.io.pictures import mask_to_pil
from reference_models import noise_image, raw_png, write

pytestmark = pytest.mark.usefixtures("fresh_image_warnings")


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
    noise_image(16, 16).save(tmp_path / "a.png")
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
    image = noise_image(20, 12)
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
        fit_to_model(noise_image(16, 16), **kwargs)


def test_fit_and_restore_exact_at_aligned_size():
    image = noise_image(40, 24)
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


def load_or_too_small(load, source, w: int, h: int) -> Image.Image | None:
    """load(source) with the image warnings silenced, or None if it was refused for being smaller than
    one latent cell (8 px), the only refusal a valid w x h image may get."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        try:
            return load(source)
        except ImageInputError as e:
            assert min(w, h) < 8 and "smaller than one latent cell" in str(e)
            return None


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
    loaded = load_or_too_small(load_image, source, w, h)
    if loaded is None:
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
    out = load_or_too_small(as_pil, a, w, h)
    if out is None:
        return
    assert out.mode == "RGB" and out.size == (w, h)
