"""CLIPScore through torchmetrics with a CLIP model read by the project from a local folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import picture, save_tiny_clip

from diffedit.errors import ModelLoadError
from diffedit.research.scores import networks
from diffedit.research.scores.perceptual import CLIPScorer, as_uint8


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip-weights"))


def test_clipscore_equals_the_library_on_the_same_tensors(clip_weights):
    from torchmetrics.functional.multimodal.clip_score import clip_score
    model, processor = networks.clip("openai/clip-vit-large-patch14", clip_weights)
    ours = CLIPScorer(model, processor, "openai/clip-vit-large-patch14")
    image, text = picture(1, (64, 48)), "a red circle"
    expected = float(clip_score(as_uint8(image), text, model_name_or_path=lambda: (model, processor)))
    assert ours(image, text) == pytest.approx(expected, rel=1e-6)


def test_clipscore_is_100_times_the_cosine_clipped_at_zero(clip_weights):
    model, processor = networks.clip("openai/clip-vit-large-patch14", clip_weights)
    scorer = CLIPScorer(model, processor, "openai/clip-vit-large-patch14")
    values = []
    for seed, text in [(0, "a red circle"), (1, "a blue square"), (2, "a green triangle"), (3, "a gray background")]:
        image = picture(seed, (64, 48))
        with torch.no_grad():
            pixels = processor(images=[as_uint8(image)], return_tensors="pt")["pixel_values"]
            tokens = processor(text=[text], return_tensors="pt", padding=True)
            i = model.get_image_features(pixels)
            t = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        cosine = float(torch.nn.functional.cosine_similarity(i, t))
        values.append(scorer(image, text))
        assert values[-1] == pytest.approx(max(100 * cosine, 0.0), abs=1e-4)
    assert len(set(values)) > 1
    assert "clip-vit-large-patch14" in scorer.info()["backbone"]


def test_a_local_folder_can_be_named_directly(clip_weights):
    model, _ = networks.clip(str(clip_weights / "clip-vit-large-patch14"))
    assert model.config.projection_dim == 16


def test_missing_clip_files_are_one_sentence(clip_weights, tmp_path):
    with pytest.raises(ModelLoadError) as e:
        networks.clip("openai/clip-vit-base-patch32", clip_weights)
    assert str(clip_weights / "clip-vit-base-patch32") in str(e.value) and "\n" not in str(e.value)
    bare = tmp_path / "clip-vit-large-patch14"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        networks.clip("openai/clip-vit-large-patch14", tmp_path)
