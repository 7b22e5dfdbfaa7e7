"""Gaps a mutation audit of diffedit/mask_maps.py found in the suite: each test here fails on a
small wrong change of the mask's arithmetic (named in its docstring) that every other fast test
let pass. Stated in the terms of the maths: a Gaussian blur keeps constants and has variance
sigma^2, a dilation by c grows a cell into a (2c + 1)^2 square, the threshold reads the map the
blur made, the paper clamps outliers before rescaling."""

from __future__ import annotations

import torch

from diffedit.mask_maps import blur, dilate, maps_of_difference, normalize_difference


def impulse(size: int = 41) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, size // 2, size // 2] = 1.0
    return m


def test_blur_keeps_a_constant_map():
    """A normalised kernel: a constant map stays that constant (mutant: unnormalised kernel)."""
    flat = torch.full((2, 9, 13), 0.375)
    assert (blur(flat, 1.5) - flat).abs().max() < 1e-6


def test_blur_is_a_gaussian_of_variance_sigma_squared_along_both_axes():
    """The blurred impulse sums to 1 and has variance sigma^2 along each axis (a kernel cut at
    3 sigma: 0.97 sigma^2) (mutants: exp(-x^2 / sigma^2), a blur along one axis only)."""
    sigma = 2.0
    out = blur(impulse(), sigma)[0]
    assert abs(float(out.sum()) - 1) < 1e-5
    x = torch.arange(out.shape[0], dtype=torch.float32) - out.shape[0] // 2
    for profile in (out.sum(dim=0), out.sum(dim=1)):
        variance = float((profile * x ** 2).sum())
        assert 0.95 * sigma ** 2 < variance <= sigma ** 2
    assert torch.allclose(out, out.T, atol=1e-7)


def test_dilation_by_c_grows_one_cell_into_a_square_of_side_2c_plus_1():
    for c in (1, 2, 3):
        grown = dilate(impulse(15) > 0, c)[0]
        rows, cols = grown.nonzero().T
        assert int(grown.sum()) == (2 * c + 1) ** 2
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7 - c, 7 + c, 7 - c, 7 + c)


def test_blurred_mask_is_the_blurred_map_thresholded():
    """With a blur the mask is blur(soft) > threshold (mutant: the mask of the unblurred map kept),
    and a dilation grows that mask."""
    difference = torch.zeros(1, 16, 16)
    difference[0, 4:12, 4:12] = 1.0
    difference[0, 8, 8] = 0.0   # a hole the blur fills
    difference[0, 0, 15] = 1.0  # a speck the blur removes
    maps = maps_of_difference(difference, "mean_ratio", 0.5, blur_sigma=1.0)
    assert torch.equal(maps.mask, maps.soft > 0.5)
    assert maps.mask[0, 8, 8] and not maps.mask[0, 0, 15]
    grown = maps_of_difference(difference, "mean_ratio", 0.5, blur_sigma=1.0, dilate_cells=1)
    assert torch.equal(grown.mask, dilate(maps.mask, 1))


def test_paper_normalisation_clamps_one_outlier_before_rescaling():
    """Sec. 3.2: extreme values are removed, then the map is rescaled to [0, 1]. One cell
    ten times the region on a 64 x 64 map: clamped at mean + 3 std (about 1.9), it leaves
    the region near 0.48 instead of 0.09 (mutant: no clamp)."""
    difference = torch.full((1, 64, 64), 0.1)
    difference[0, :, 32:] = 1.0  # the region that changes
    difference[0, 0, 63] = 10.0  # one outlier
    soft = normalize_difference(difference, "paper", clamp_std=3.0)
    assert float(soft.max()) == 1.0 and float(soft.min()) == 0.0
    assert (soft[0, 1:, 32:] > 0.45).all() and (soft[0, :, :32] == 0).all()
