"""PIE-Bench's structure distance on a tiny DINO-style ViT (timm's vit_base_patch8_224.dino
layout, one block of width 32): the keys are the library's own, read at its qkv projection, and
the input follows PIE-Bench's evaluation (cure-lab/PnPInversion evaluation/matrics_calculator.py):
pixel values 0..255 resized with the aspect kept, then ImageNet's Normalize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import picture
from safetensors.torch import save_file

from diffedit.errors import ModelLoadError
from diffedit.research.scores import structure, weights

TINY = dict(depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    import timm
    folder = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    model = timm.create_model(structure.DINO_NAME, pretrained=False, num_classes=0, **TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights.FILES["dino"][0][0]))
    return folder, model


def keys_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity of the first block's keys of `model` on the 224 x 224 input `x`."""
    with torch.no_grad():
        tokens = model.eval()._pos_embed(model.patch_embed(x))
        tokens = model.blocks[0].norm1(model.norm_pre(tokens))
        keys = F.linear(tokens, model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias)[0, :, 32:64]
    keys = F.normalize(keys, dim=-1)
    return keys @ keys.T


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(structure.MEAN).view(1, 3, 1, 1)) / torch.tensor(structure.STD).view(1, 3, 1, 1)


def test_keys_self_similarity_of_pixel_values_0_to_255_as_pie_bench(dino_folder):
    """PIE-Bench normalises pixel values 0..255 (never divided by 255): the self-similarity equals
    the keys computed by hand on that input, and differs from the one of pixels in [0, 1]."""
    folder, model = dino_folder
    score = structure.StructureDistance(structure.dino(folder, **TINY))
    image = picture(0, (64, 64))
    sim = score.self_similarity(image)
    assert sim.shape == (1 + (224 // 8) ** 2,) * 2
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.allclose(sim, keys_by_hand(model, normalised(resized)), atol=1e-5)
    unit_range = keys_by_hand(model, normalised(resized / 255))
    assert (sim - unit_range).abs().max() > 1e-2


@pytest.mark.parametrize("size, resized, grid", [((96, 64), (224, 336), (28, 42)), ((300, 60), (96, 480), (12, 60)),
                                                 ((96, 80), (224, 268), (28, 33))])
def test_the_shorter_side_goes_to_224_the_longer_at_most_480(dino_folder, size, resized, grid):
    """torchvision's Resize(224, max_size=480) keeps the aspect: a 96 x 64 picture becomes 336 x
    224 (28 x 42 patches of 8), a 300 x 60 one 480 x 96, not a 224 x 224 square; a side that is
    not a multiple of 8 loses its last pixels, as DINO's patch convolution does."""
    folder, _ = dino_folder
    score = structure.StructureDistance(structure.dino(folder, **TINY))
    assert structure.dino_input(picture(1, size)).shape == (1, 3, *resized)
    assert score.self_similarity(picture(1, size)).shape == (1 + grid[0] * grid[1],) * 2


def test_structure_distance_is_zero_for_the_same_image_and_grows(dino_folder):
    folder, _ = dino_folder
    score = structure.StructureDistance(structure.dino(folder, **TINY))
    a, b = picture(1, (64, 64)), picture(2, (64, 64))
    assert score(a, a) == 0.0 and score(a, b) > 0


def test_the_original_runs_once_for_the_edits_of_one_item(dino_folder):
    """Consecutive edits of one original: the network sees the original once, and every distance
    equals the one a fresh scorer gives; another original is computed anew."""
    folder, _ = dino_folder
    module = structure.dino(folder, **TINY)
    score = structure.StructureDistance(module)
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(1))
    original, other = picture(1, (64, 64)), picture(5, (64, 64))
    edits = [picture(2 + k, (64, 64)) for k in range(3)]
    distances = [score(e, original) for e in edits]
    assert len(calls) == 1 + len(edits)
    assert distances == [structure.StructureDistance(module)(e, original) for e in edits]
    calls.clear()
    assert score(edits[0], other) == structure.StructureDistance(module)(edits[0], other) and len(calls) == 4


def test_missing_dino_weights_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="dino_vitb8.safetensors"):
        structure.dino(tmp_path)
