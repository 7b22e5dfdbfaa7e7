"""PIE-Bench's structure distance (after Splice, Tumanyan et al. 2022): the keys of the last
block of DINO ViT-B/8 (timm's vit_base_patch8_224.dino), the cosine self-similarity of the tokens'
keys (the heads concatenated, the class token included), and the mean squared difference of the
two images' self-similarity matrices. Images resized to 224 x 224 (bilinear), ImageNet
normalisation. 0 = the same structure; PIE-Bench reports it x1e3.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.research.scores.masked import as_tensor

DINO_NAME = "vit_base_patch8_224.dino"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dino(folder: str | os.PathLike | None = None, state: dict | None = None, **overrides) -> torch.nn.Module:
    """timm's DINO ViT-B/8 without a head, weights from the user's file (overrides: tests)."""
    import timm

    from diffedit.research.scores.networks import _state
    from diffedit.research.scores.weights import load_into
    state, path = _state("dino", folder, state)
    module = timm.create_model(DINO_NAME, pretrained=False, num_classes=0, **overrides)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return load_into(module, state, path, "DINO ViT-B/8")


class StructureDistance:
    def __init__(self, module: torch.nn.Module, size: int = 224):
        self.module, self.size = module.eval(), size

    @torch.no_grad()
    def self_similarity(self, image: Image.Image) -> torch.Tensor:
        """(tokens, tokens) cosine similarity of the last block's keys."""
        x = F.interpolate(as_tensor(image), size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        found = []
        attn = self.module.blocks[-1].attn
        hook = attn.qkv.register_forward_hook(lambda m, i, o: found.append(o))
        try:
            self.module(x)
        finally:
            hook.remove()
        qkv = found[0]                                   # (1, tokens, 3 x dim): q, k, v, each heads x head_dim
        keys = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1)[:, :, 1][0]
        keys = F.normalize(keys, dim=-1)
        return keys @ keys.T

    def __call__(self, edited: Image.Image, original: Image.Image) -> float:
        return float(F.mse_loss(self.self_similarity(edited), self.self_similarity(original)))

    @staticmethod
    def info() -> dict:
        return {"backbone": "timm vit_base_patch8_224.dino, keys of the last block, cosine self-similarity",
                "resolution": "224 x 224 (bilinear resize), ImageNet normalisation",
                "range": ">= 0, mean squared difference of the self-similarity matrices; PIE-Bench reports x1e3"}
