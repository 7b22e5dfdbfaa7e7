"""PIE-Bench's structure distance on a tiny DINO-style ViT (timm's vit_base_patch8_224.dino
layout, one block of width 32): the keys are the library's own, read at its qkv projection."""

from __future__ import annotations

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


def test_keys_self_similarity_equals_the_attention_keys_by_hand(dino_folder):
    folder, model = dino_folder
    score = structure.StructureDistance(structure.dino(folder, **TINY))
    image = picture(0, (64, 64))
    sim = score.self_similarity(image)
    assert sim.shape == (1 + (224 // 8) ** 2,) * 2
    x = F.interpolate(structure.as_tensor(image), size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(structure.MEAN).view(1, 3, 1, 1)) / torch.tensor(structure.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.eval()._pos_embed(model.patch_embed(x))
        tokens = model.blocks[0].norm1(model.norm_pre(tokens))
        keys = F.linear(tokens, model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias)[0, :, 32:64]
    keys = F.normalize(keys, dim=-1)
    assert torch.allclose(sim, keys @ keys.T, atol=1e-5)


def test_structure_distance_is_zero_for_the_same_image_and_grows(dino_folder):
    folder, _ = dino_folder
    score = structure.StructureDistance(structure.dino(folder, **TINY))
    a, b = picture(1, (64, 64)), picture(2, (64, 64))
    assert score(a, a) == 0.0 and score(a, b) > 0


def test_missing_dino_weights_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="dino_vitb8.safetensors"):
        structure.dino(tmp_path)
