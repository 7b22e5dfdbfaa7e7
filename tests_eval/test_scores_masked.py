"""Background scores under the two definitions, and CLIP of the edited region, against the
library called directly on the same tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import picture, save_backbone

from diffedit.research.scores import networks
from diffedit.research.scores.masked import as_tensor, background_scores, keep_of


@pytest.fixture(scope="module")
def lpips_squeeze(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    save_backbone(folder, "squeeze")
    return networks.lpips("squeeze", folder)


def test_background_scores_equal_the_library(lpips_squeeze):
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )
    from torchmetrics.functional.image.lpips import _lpips_update
    original, edited = picture(0, (64, 48)), picture(1, (64, 48))
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:50] = True
    scores = background_scores(edited, original, mask, lpips_squeeze)
    x, y = as_tensor(edited), as_tensor(original)
    keep = torch.from_numpy(~mask).float()[None, None]
    assert scores["bg_psnr_pie"] == pytest.approx(float(peak_signal_noise_ratio(x * keep, y * keep, data_range=1.0)))
    assert scores["bg_ssim_pie"] == pytest.approx(float(structural_similarity_index_measure(x * keep, y * keep,
                                                                                          data_range=1.0)))
    assert scores["bg_mse_pie"] == pytest.approx(float(((x - y) ** 2 * keep).mean()), rel=1e-5)
    assert scores["bg_mse_gt"] == pytest.approx(float(((x - y) ** 2)[keep.expand_as(x).bool()].mean()), rel=1e-5)
    assert scores["bg_lpips_pie"] == pytest.approx(100 * float(_lpips_update(x * keep, y * keep, lpips_squeeze, True)))
    assert scores["bg_mse_gt"] > scores["bg_mse_pie"]     # the mean over fewer pixels, not diluted by zeros
    assert not lpips_squeeze.spatial


def test_an_edit_inside_the_mask_leaves_the_background_scores_perfect(lpips_squeeze):
    original = picture(2, (64, 48))
    a = np.asarray(original).copy()
    a[10:30, 20:50] = 255 - a[10:30, 20:50]
    from PIL import Image
    edited = Image.fromarray(a)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:50] = True
    scores = background_scores(edited, original, mask, lpips_squeeze)
    assert scores["bg_mse_gt"] == 0.0 and scores["bg_mse_pie"] == 0.0 and scores["bg_lpips_pie"] == 0.0
    assert scores["bg_ssim_pie"] == pytest.approx(1.0)
    assert 0 < scores["bg_lpips_gt"]       # the spatial map near the edge still sees the edit (LPIPS' receptive field)
    assert keep_of(mask, (64, 48)).sum() == 64 * 48 - 20 * 30


def test_without_background_every_background_score_is_nan(lpips_squeeze):
    """PIE-Bench gives "nan" for the unedited part when the mask covers the whole picture."""
    original, edited = picture(3, (32, 24)), picture(4, (32, 24))
    scores = background_scores(edited, original, np.ones((24, 32), bool), lpips_squeeze)
    assert len(scores) == 6 and all(np.isnan(v) for v in scores.values())


def test_pictures_of_two_sizes_are_one_sentence(lpips_squeeze):
    from diffedit.errors import ParameterError
    with pytest.raises(ParameterError, match="one size") as e:
        background_scores(picture(0, (64, 48)), picture(1, (32, 24)), np.zeros((24, 32), bool), lpips_squeeze)
    assert "\n" not in str(e.value)


def test_clip_edited_is_clipscore_of_the_uint8_picture_times_the_mask(metric_weights):
    """PIE-Bench's clip_similarity_target_image_edit_part: uint8(picture x mask), the edited
    region (mask 1) kept and the background black, through torchmetrics' CLIPScore."""
    from torchmetrics.functional.multimodal.clip_score import clip_score

    from diffedit.research.scores.masked import clip_edited
    from diffedit.research.scores.perceptual import CLIPScorer
    model, processor = networks.clip("openai/clip-vit-large-patch14", metric_weights)
    image = picture(5, (64, 48))
    mask = np.zeros((48, 64), bool)
    mask[5:30, 8:40] = True
    region = np.uint8(np.asarray(image) * mask[..., None])
    expected = float(clip_score(torch.from_numpy(region).permute(2, 0, 1), "a dog",
                                model_name_or_path=lambda: (model, processor)))
    ours = clip_edited(CLIPScorer(model, processor, "clip"), image, mask, "a dog")
    assert ours == pytest.approx(expected, rel=1e-6)
    background = np.uint8(np.asarray(image) * ~mask[..., None])
    other = float(clip_score(torch.from_numpy(background).permute(2, 0, 1), "a dog",
                             model_name_or_path=lambda: (model, processor)))
    assert ours != pytest.approx(other, rel=1e-4)
    assert np.isnan(clip_edited(CLIPScorer(model, processor, "clip"), image, np.zeros((48, 64), bool), "a dog"))
