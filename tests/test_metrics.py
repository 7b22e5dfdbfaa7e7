"""Edit metrics (diffedit/metrics.py): known values of PSNR, SSIM, IoU and area, the masking of
the background metrics, and the hook for user metrics (no network is ever invented)."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.research import metrics as M
from diffedit.errors import ParameterError


def _image(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 236, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- PSNR

def test_psnr_identical_is_the_documented_cap_or_inf():
    x = _image(0)
    assert M.psnr(x, x) == M.PSNR_CAP == 100.0
    assert M.psnr(x, x, cap=None) == math.inf


def test_psnr_of_a_constant_offset_is_exact():
    x = _image(1)
    y = x + np.uint8(10)                               # every pixel 10 levels brighter: MSE = (10/255)^2
    assert M.psnr(y, x) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)   # 28.1308 dB
    assert M.psnr(Image.fromarray(y), Image.fromarray(x)) == pytest.approx(28.130803608679102, abs=1e-9)


def test_background_psnr_ignores_the_masked_region():
    x = _image(2)
    y = x.copy()
    mask = np.zeros(x.shape[:2], dtype=bool)
    mask[5:20, 8:30] = True
    y[mask] = 255 - y[mask]                            # garbage inside the edit region
    y[~mask] = x[~mask] + np.uint8(5)                  # 5 levels outside
    assert M.psnr(y, x, mask) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)
    assert M.psnr(y, x) < M.psnr(y, x, mask) - 5
    assert M.psnr(y, x, np.ones_like(mask)) is None    # nothing left to compare


def test_psnr_takes_model_tensors_and_a_mask_of_another_size():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    y = (x + 0.1).clamp(-1, 1)
    expected = 10 * math.log10(1 / float((((y - x) / 2) ** 2).mean()))
    assert M.psnr(y, x) == pytest.approx(expected, rel=1e-9)
    small = np.zeros((4, 4), dtype=bool)
    small[:2] = True                                   # upper half, nearest-upsampled to 16 x 16
    upper = ((((y - x) / 2) ** 2)[0, :, 8:]).mean()
    assert M.psnr(y, x, small) == pytest.approx(10 * math.log10(1 / float(upper)), rel=1e-9)


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ParameterError, match="differ in size"):
        M.psnr(_image(0, 32, 40), _image(0, 40, 32))
    with pytest.raises(ParameterError, match=r"\[0, 1\]"):
        M.psnr(np.full((8, 8, 3), 2.0), np.zeros((8, 8, 3)))


# ---------------------------------------------------------------------- SSIM

def _ssim_brute_force(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM at every pixel with an explicit 11 x 11 Gaussian window (sigma 1.5) over the image
    padded by whole-sample reflection: the definition, one pixel at a time."""
    k = np.arange(11) - 5
    g = np.exp(-k ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    px = np.pad(x, ((5, 5), (5, 5), (0, 0)), mode="reflect")
    py = np.pad(y, ((5, 5), (5, 5), (0, 0)), mode="reflect")
    out = np.zeros(x.shape)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            a, b = px[i:i + 11, j:j + 11], py[i:i + 11, j:j + 11]
            for c in range(x.shape[2]):
                mx, my = (w * a[..., c]).sum(), (w * b[..., c]).sum()
                vx, vy = (w * (a[..., c] - mx) ** 2).sum(), (w * (b[..., c] - my) ** 2).sum()
                cov = (w * (a[..., c] - mx) * (b[..., c] - my)).sum()
                out[i, j, c] = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return out.mean(axis=2)


def test_ssim_map_matches_the_definition_pixel_by_pixel():
    x = _image(3, 12, 14)
    y = np.clip(x.astype(int) + np.random.default_rng(4).integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    reference = _ssim_brute_force(x / 255.0, y / 255.0)
    np.testing.assert_allclose(M.ssim_map(y, x), reference, rtol=0, atol=1e-10)


def test_ssim_of_identical_images_is_one():
    x = _image(5)
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert float(M.ssim_map(x, x).min()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a, b = 0.3, 0.7
    x, y = np.full((16, 16, 3), a), np.full((16, 16, 3), b)
    c1 = 0.01 ** 2
    assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)


def test_ssim_is_symmetric_and_falls_with_noise():
    x = _image(6)
    rng = np.random.default_rng(7)
    noisy = [np.clip(x + rng.normal(0, s, x.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    values = [M.ssim(n, x) for n in noisy]
    assert values[0] > values[1] > values[2] > -1
    assert M.ssim(noisy[1], x) == pytest.approx(M.ssim(x, noisy[1]), abs=1e-12)


def test_masked_ssim_sees_edited_pixels_only_through_the_11x11_window():
    x = _image(8, 32, 48)
    y = x.copy()
    y[:, :20] = 255 - y[:, :20]                        # edit the left 20 columns
    edit = np.zeros((32, 48), dtype=bool)
    edit[:, :20] = True
    grown = np.zeros_like(edit)
    grown[:, :25] = True                               # + the 5-pixel window radius
    assert M.ssim(y, x, grown) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(y, x, edit) < 0.99                   # columns 20-24 see edited pixels
    assert M.ssim(y, x, np.ones_like(edit)) is None


# ---------------------------------------------------------------------- masks

def test_iou_and_area_examples():
    a = np.zeros((8, 8), dtype=bool)
    b = np.zeros((8, 8), dtype=bool)
    a[0:4, 0:4] = True                                 # 16 pixels
    b[2:6, 0:4] = True                                 # 16 pixels, 8 shared
    assert M.mask_iou(a, b) == pytest.approx(8 / 24)
    assert M.mask_iou(a, a) == 1.0
    assert M.mask_iou(a, ~a) == 0.0
    empty = np.zeros((8, 8), dtype=bool)
    assert M.mask_iou(empty, empty) == 1.0             # two empty masks agree
    assert M.mask_iou(empty, a) == 0.0
    assert M.mask_area(a) == 16 / 64
    assert M.mask_area(empty) == 0.0


def test_iou_across_sizes_and_types():
    gt = np.zeros((64, 64), dtype=bool)
    gt[16:48, 32:] = True
    latent = np.zeros((8, 8), dtype=bool)
    latent[2:6, 4:] = True                             # the same region at 1/8 resolution
    assert M.mask_iou(latent, gt) == 1.0
    assert M.mask_iou(torch.from_numpy(latent), Image.fromarray(gt.astype(np.uint8) * 255)) == 1.0
    assert M.mask_iou(latent.astype(np.float32)[None], gt) == 1.0


# ---------------------------------------------------------------------- user metrics

def test_registered_metric_appears_and_unregistered_is_absent():
    x, y = _image(9), _image(10)
    gt = np.zeros(x.shape[:2], dtype=bool)
    gt[4:10, 4:10] = True
    before = M.edit_metrics(Image.fromarray(y), Image.fromarray(x), gt_mask=gt)
    assert set(before) == {"bg_psnr_gt", "bg_ssim_gt", "gt_mask_area"}
    assert "lpips" not in before
    seen = []
    M.register_metric("lpips", lambda inputs: seen.append(inputs) or 0.25)
    M.register_metric("undefined", lambda inputs: None)
    try:
        after = M.edit_metrics(Image.fromarray(y), Image.fromarray(x), gt_mask=gt, mask=gt,
                               target_prompt="a red circle")
        with pytest.raises(ParameterError, match="already registered"):
            M.register_metric("lpips", lambda inputs: 0.0)
    finally:
        M.unregister_metric("lpips")
        M.unregister_metric("undefined")
    assert after["lpips"] == 0.25 and "undefined" not in after
    assert after["mask_iou"] == 1.0 and after["bg_psnr_mask"] == after["bg_psnr_gt"]
    assert seen[0].target_prompt == "a red circle" and seen[0].gt_mask is gt
    assert "lpips" not in M.registered_metrics()
    with pytest.raises(ParameterError, match="built-in"):
        M.register_metric("mask_iou", lambda inputs: 0.0)


def test_load_metric_needs_the_users_weights(tmp_path, monkeypatch):
    module = tmp_path / "my_lpips.py"
    module.write_text("def make(path):\n"
                      "    size = len(open(path, 'rb').read())\n"
                      "    return lambda inputs: float(size)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ParameterError, match="do not exist"):
        M.load_metric("lpips", "my_lpips:make", tmp_path / "missing.pth")
    weights = tmp_path / "lpips.pth"
    weights.write_bytes(b"12345")
    fn = M.load_metric("lpips", "my_lpips:make", weights)
    assert fn(None) == 5.0
    with pytest.raises(ParameterError, match="cannot import"):
        M.load_metric("lpips", "my_lpips:nothing", weights)
    with pytest.raises(ParameterError, match="module:function"):
        M.load_metric("lpips", "my_lpips", weights)
    sys.modules.pop("my_lpips", None)
