"""Per-edit scores through the libraries: LPIPS and L1 (FlexIT's 256 crops), CLIPScore.

    LPIPS x100   torchmetrics' LPIPS (backbone alex / vgg / squeeze), edited against input, both
                 resized (shorter side, bilinear) and centre-cropped to 256 as FlexIT's eval.py,
                 inputs in [0, 1] (normalize=True); 0 = identical, x100 as FlexIT reports it
    L1           torchmetrics' mean absolute error on the same crops, pixels in [0, 1] (not x100)
    CLIPScore    torchmetrics' CLIPScore: max(100 cos(image, text), 0) with the user's CLIP model,
                 the whole edited image (the processor resizes and crops to the model's size)

LPIPS and L1 checked against FlexIT's own evaluation (facebookresearch/SemanticImageTranslation,
eval.py: `resize`, and the lpips / l1 blocks of evaluate()): lpips.LPIPS(net='alex') with
normalize=True, x100; L1 the mean of |input - edit| over the 256 crops, unscaled; the input is
the ImageNet file itself (our images/ITEM/input.png), the edit restored to its size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffedit.research.scores.networks import device_of

FLEXIT_CROP = 256


def flexit_crop(image: Image.Image, size: int = FLEXIT_CROP) -> torch.Tensor:
    """(1, 3, size, size) float in [0, 1]: torchvision's Resize(size) (shorter side, bilinear,
    antialiased) then CenterCrop(size), as FlexIT prepares both images."""
    from torchvision import transforms
    crop = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    return crop(image.convert("RGB"))[None]


def as_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 of a PIL image."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


class LPIPS:
    """LPIPS x100 of an edit against its input, FlexIT's crops."""

    def __init__(self, module: torch.nn.Module, net: str):
        self.module, self.net = module, net
        self.name = "lpips" if net == "alex" else f"lpips_{net}"

    @torch.no_grad()
    def tensors(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """x100 LPIPS of two (N, 3, H, W) tensors in [0, 1] (mean over N), torchmetrics' update."""
        from torchmetrics.functional.image.lpips import _lpips_update
        device = device_of(self.module)
        return 100.0 * float(_lpips_update(a.to(device), b.to(device), net=self.module, normalize=True).mean())

    def __call__(self, edited: Image.Image, original: Image.Image) -> float:
        return self.tensors(flexit_crop(edited), flexit_crop(original))

    def info(self) -> dict:
        return {"backbone": f"torchmetrics LPIPS, {self.net} (torchvision ImageNet weights)",
                "resolution": f"shorter side resized to {FLEXIT_CROP}, centre crop {FLEXIT_CROP}",
                "range": "x100 of LPIPS; 0 = identical, lower = closer to the input"}


def l1(edited: Image.Image, original: Image.Image) -> float:
    """Mean absolute pixel difference on FlexIT's 256 crops, pixels in [0, 1] (torchmetrics)."""
    from torchmetrics.functional import mean_absolute_error
    return float(mean_absolute_error(flexit_crop(edited), flexit_crop(original)))


L1_INFO = {"backbone": "none (pixels)", "resolution": f"shorter side {FLEXIT_CROP}, centre crop {FLEXIT_CROP}",
           "range": "[0, 1], mean absolute difference of pixels in [0, 1]; lower = closer to the input"}


class CLIPScorer:
    """torchmetrics' CLIPScore of an image and a text with the model handed in (CLIPAdapter,
    processor): max(100 cos, 0). It runs where the model is: the library moves the model to the
    image's device, so the image is sent to the model's (and the metric's state follows it)."""

    def __init__(self, model, processor, model_name: str):
        from torchmetrics.multimodal.clip_score import CLIPScore
        self.metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        self.model, self.model_name = model, model_name

    @torch.no_grad()
    def __call__(self, image: Image.Image | torch.Tensor, text: str) -> float:
        device = device_of(self.model)
        if self.metric.device != device:
            self.metric.to(device)
        pixels = (image if isinstance(image, torch.Tensor) else as_uint8(image)).to(device)
        self.metric.reset()
        self.metric.update(pixels, text)
        return float(self.metric.compute())

    def info(self) -> dict:
        return {"backbone": f"CLIP {self.model_name} (transformers), torchmetrics CLIPScore",
                "resolution": "the model's processor: shorter side resized, centre crop (224 for ViT-L/14)",
                "range": "[0, 100]: max(100 x cosine(image, target text), 0); higher = closer to the target text"}
