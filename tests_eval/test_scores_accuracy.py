"""FlexIT's DeiT accuracy: timm's deit_base_distilled_patch16_384 (a tiny configuration of it
here: one block, width 32; the full network takes ~2 s an image on this CPU), its argmax
restricted to the 273 target classes, on FlexIT's input (facebookresearch/SemanticImageTranslation
eval.py: `resize(384)` then ImageNet normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import picture
from PIL import Image
from safetensors.torch import save_file

from diffedit.errors import ModelLoadError
from diffedit.research.scores import networks, weights
from diffedit.research.scores.accuracy import (
    DeiTAccuracy,
    flexit_transform,
    target_classes,
)

TINY = dict(depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def deit_folder(tmp_path_factory):
    import timm
    folder = tmp_path_factory.mktemp("metric-weights")
    torch.manual_seed(0)
    model = timm.create_model(networks.DEIT_NAME, pretrained=False, **TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights.FILES["deit"][0][0]))
    return folder, model


def test_the_273_target_classes_of_the_query_list():
    classes = target_classes()
    assert len(classes) == 273 and all(0 <= c < 1000 for c in classes)


def test_the_restricted_argmax_equals_timm_on_the_same_tensor(deit_folder):
    folder, reference = deit_folder
    net = networks.deit(folder, **TINY)
    transform = flexit_transform()
    score = DeiTAccuracy(net)
    classes = torch.tensor(target_classes())
    for seed in range(3):
        image = picture(seed, (420, 400))
        x = transform(image)
        assert x.shape == (3, 384, 384)
        with torch.no_grad():
            logits = reference.eval()(x[None])[0]
        expected = int(classes[logits[classes].argmax()])
        assert score.predict(image) == expected
        assert expected in classes.tolist()


def test_the_input_is_flexits_bilinear_resize_and_centre_crop_not_timms_bicubic(deit_folder):
    """FlexIT's T.Resize(384) of a PIL picture is PIL's bilinear resize of the shorter side to 384
    (the longer side truncated), then the centre 384 x 384, in [0, 1], then ImageNet's mean / std.
    timm's eval transform of the same model (bicubic) gives other pixels."""
    from timm.data import create_transform, resolve_data_config
    _, model = deit_folder
    image = picture(4, (420, 400))
    resized = np.asarray(image.resize((int(384 * 420 / 400), 384), Image.BILINEAR), dtype=np.float32) / 255
    left = round((resized.shape[1] - 384) / 2)
    crop = torch.from_numpy(resized[:, left:left + 384]).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ours = flexit_transform()(image)
    assert torch.allclose(ours, (crop - mean) / std, atol=1e-5)
    timm_input = create_transform(**resolve_data_config({}, model=model))(image)
    assert timm_input.shape == ours.shape and (timm_input - ours).abs().max() > 0.05


def test_correct_unedited_wrong_are_exclusive(deit_folder):
    folder, _ = deit_folder
    net = networks.deit(folder, **TINY)
    score = DeiTAccuracy(net)
    image = picture(0)
    c = score.predict(image)
    other = next(k for k in target_classes() if k != c)
    assert score(image, source_id=other, target_id=c) == {"deit_class": c, "deit_correct": 1.0,
                                                           "deit_unedited": 0.0, "deit_wrong": 0.0}
    assert score(image, source_id=c, target_id=other)["deit_unedited"] == 1.0
    third = next(k for k in target_classes() if k not in (c, other))
    assert score(image, source_id=other, target_id=third)["deit_wrong"] == 1.0


def test_the_deit_file_is_named_when_missing_or_wrong(tmp_path, deit_folder):
    with pytest.raises(ModelLoadError, match="deit_base_distilled_patch16_384.safetensors"):
        networks.deit(tmp_path)
    folder, _ = deit_folder
    with pytest.raises(ModelLoadError, match="not the DeiT"):
        networks.deit(folder)     # the tiny file into the full-size network
