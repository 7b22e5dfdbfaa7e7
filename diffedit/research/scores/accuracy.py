"""FlexIT's classifier accuracy: timm's DeiT-B distilled 384 on the edited image, its argmax
restricted to the 273 target classes of FlexIT's query list; an edit is "correct" when that class
is the target, "unedited" when it is the source, "wrong" otherwise. Each edit gets 1 / 0 in the
three columns, so their means x100 are FlexIT's percentages.
"""

from __future__ import annotations

import torch
from PIL import Image

from diffedit.research.benchmarks.imagenet import QUERIES, read_queries


def target_classes(queries=QUERIES) -> list[int]:
    """The ImageNet indices of FlexIT's target classes (273, the same in both splits)."""
    return sorted({r["target_id"] for split in ("test", "dev") for r in read_queries(split, queries)})


class DeiTAccuracy:
    """Classify edits with the module handed in (timm's DeiT; its eval transform), restricted."""

    def __init__(self, module: torch.nn.Module, transform, classes: list[int] | None = None):
        self.module, self.transform = module.eval(), transform
        self.classes = torch.tensor(classes if classes is not None else target_classes())

    @torch.no_grad()
    def predict(self, image: Image.Image) -> int:
        """The ImageNet index of the most likely of the allowed classes."""
        logits = self.module(self.transform(image.convert("RGB"))[None])[0]
        return int(self.classes[logits[self.classes].argmax()])

    def __call__(self, image: Image.Image, source_id: int, target_id: int) -> dict[str, float]:
        c = self.predict(image)
        return {"deit_class": c, "deit_correct": float(c == target_id), "deit_unedited": float(c == source_id),
                "deit_wrong": float(c not in (target_id, source_id))}

    @staticmethod
    def info() -> dict:
        return {"backbone": "timm deit_base_distilled_patch16_384 (mean of its two heads, timm's eval output)",
                "resolution": "timm's eval transform: bicubic resize to 384, centre crop 384, ImageNet normalisation",
                "range": "per edit 1 or 0; the mean x100 is % correct (= target) / unedited (= source) / wrong, "
                         "argmax over FlexIT's 273 target classes"}
