"""PIE-Bench's structure distance (after Splice, Tumanyan et al. 2022), computed as its evaluation
does (cure-lab/PnPInversion, evaluation/matrics_calculator.py: MetricsCalculator.
calculate_structure_distance, LossG.calculate_global_ssim_loss, VitExtractor.
get_keys_self_sim_from_input):

  - the picture's pixel values 0..255, *not* divided by 255, resized by torchvision's
    Resize(224, max_size=480) (shorter side 224, aspect kept, the longer side at most 480;
    bilinear without antialiasing, as torchvision 0.13 -- the version its README installs --
    resizes tensors), then ImageNet's Normalize applied to those 0..255 values: a quirk of the
    benchmark, kept because its published numbers use it;
  - DINO ViT-B/8 (timm's vit_base_patch8_224.dino, the weights of facebookresearch/dino's
    dino_vitb8), the keys of the last block (its qkv projection; heads concatenated, the class
    token included), their cosine self-similarity;
  - the mean squared difference of the two pictures' self-similarity matrices. 0 = the same
    structure; PIE-Bench reports it x1e3.

A picture that is not square gets timm's resampling of the position embeddings (DINO's own code
interpolates them slightly differently), and its last rows or columns that do not fill a patch
of 8 are left out, as DINO's strided patch convolution leaves them; PIE-Bench's pictures are all
512 x 512.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.research.scores.networks import device_of

DINO_NAME = "vit_base_patch8_224.dino"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, MAX_SIZE = 224, 480


def dino(folder: str | os.PathLike | None = None, state: dict | None = None, **overrides) -> torch.nn.Module:
    """timm's DINO ViT-B/8 without a head, taking any picture size, weights from the user's file
    (overrides: a smaller configuration, for tests)."""
    import timm

    from diffedit.research.scores.networks import _state
    from diffedit.research.scores.weights import load_into
    state, path = _state("dino", folder, state)
    module = timm.create_model(DINO_NAME, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return load_into(module, state, path, "DINO ViT-B/8")


def dino_input(image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w): PIE-Bench's input to DINO, from pixel values 0..255 (see the module docstring)."""
    from torchvision import transforms
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    resized = transforms.Resize(SIZE, max_size=MAX_SIZE, antialias=False)(pixels)
    return transforms.Normalize(MEAN, STD)(resized)[None]


class StructureDistance:
    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()
        self._original: tuple[Image.Image, torch.Tensor] | None = None  # the last original and its self-similarity

    @torch.no_grad()
    def self_similarity(self, image: Image.Image) -> torch.Tensor:
        """(tokens, tokens) cosine similarity of the last block's keys, computed on the module's
        device, returned on the CPU."""
        x = dino_input(image).to(device_of(self.module))
        patch = self.module.patch_embed.patch_size
        x = x[..., :x.shape[-2] // patch[0] * patch[0], :x.shape[-1] // patch[1] * patch[1]]   # as DINO's strided conv
        found = []
        hook = self.module.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: found.append(o))
        try:
            self.module(x)
        finally:
            hook.remove()
        qkv = found[0]                                   # (1, tokens, 3 x dim): q, k, v, each heads x head_dim
        keys = F.normalize(qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1)[0, :, 1], dim=-1)
        return (keys @ keys.T).cpu()

    def __call__(self, edited: Image.Image, original: Image.Image) -> float:
        """The distance of `edited` from `original`. A bench item's edits (every method and r) come
        one after the other with the same original picture: its self-similarity is computed once."""
        if self._original is None or self._original[0] is not original:
            self._original = (original, self.self_similarity(original))
        return float(F.mse_loss(self.self_similarity(edited), self._original[1]))

    @staticmethod
    def info() -> dict:
        return {"backbone": "timm vit_base_patch8_224.dino, keys of the last block, cosine self-similarity "
                            "(PIE-Bench's evaluation)",
                "resolution": "shorter side 224 (longer at most 480, aspect kept; bilinear, no antialiasing), "
                              "ImageNet normalisation applied to pixel values 0..255 as PIE-Bench does",
                "range": ">= 0, mean squared difference of the self-similarity matrices; PIE-Bench reports x1e3"}
