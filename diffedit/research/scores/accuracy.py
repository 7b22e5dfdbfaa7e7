"""FlexIT's classifier accuracy (facebookresearch/SemanticImageTranslation, eval.py, the `deit`
block of evaluate()): DeiT-B distilled 384 (timm's deit_base_distilled_patch16_384, the mean of
its two heads in eval mode, as the torch.hub model FlexIT loads) on the edited image, its argmax
restricted to FlexIT's 273 target classes (every target class of the query list, both splits);
an edit is "correct" when that class is the target, "unedited" when it is the source, "wrong"
otherwise. Each edit gets 1 / 0 in the three columns, so their means x100 are FlexIT's
percentages.

The input is FlexIT's `resize(384)`: torchvision's Resize(384) of the PIL picture (shorter side,
bilinear) and CenterCrop(384), in [0, 1], then ImageNet's mean / std (eval.py's `in_norm`; the
function that applies it, utils/torch_utils.py's batch_forward, is not in the published
repository, so that step is inferred). timm's own eval transform of this model resizes bicubic
instead, which changes the predictions.
"""

from __future__ import annotations

import torch
from PIL import Image

from diffedit.research.benchmarks.imagenet import QUERIES, read_queries
from diffedit.research.scores.networks import device_of

DEIT_SIZE = 384
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def target_classes(queries=QUERIES) -> list[int]:
    """The ImageNet indices of FlexIT's target classes (273, the same in both splits)."""
    return sorted({r["target_id"] for split in ("test", "dev") for r in read_queries(split, queries)})


def flexit_transform(size: int = DEIT_SIZE):
    """PIL picture -> (3, size, size) float: FlexIT's classifier input (module docstring)."""
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class DeiTAccuracy:
    """Classify edits with the module handed in (timm's DeiT), restricted to the target classes."""

    def __init__(self, module: torch.nn.Module, transform=None, classes: list[int] | None = None):
        self.module = module.eval()
        self.transform = transform if transform is not None else flexit_transform()
        self.classes = torch.tensor(classes if classes is not None else target_classes())

    @torch.no_grad()
    def predict(self, image: Image.Image) -> int:
        """The ImageNet index of the most likely of the allowed classes."""
        x = self.transform(image.convert("RGB"))[None].to(device_of(self.module))
        logits = self.module(x)[0].cpu()
        return int(self.classes[logits[self.classes].argmax()])

    def __call__(self, image: Image.Image, source_id: int, target_id: int) -> dict[str, float]:
        c = self.predict(image)
        return {"deit_class": c, "deit_correct": float(c == target_id), "deit_unedited": float(c == source_id),
                "deit_wrong": float(c not in (target_id, source_id))}

    @staticmethod
    def info() -> dict:
        return {"backbone": "timm deit_base_distilled_patch16_384 (mean of its two heads, timm's eval output)",
                "resolution": "FlexIT's: shorter side resized to 384 (bilinear), centre crop 384, ImageNet "
                              "normalisation",
                "range": "per edit 1 or 0; the mean x100 is % correct (= target) / unedited (= source) / wrong, "
                         "argmax over FlexIT's 273 target classes"}
