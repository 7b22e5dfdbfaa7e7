"""What mask IoU a DiffEdit mask can reach on the shapes benchmark (README, "Where it falls short").

    .venv/bin/python scripts/mask_iou_bounds.py [--edits 50] [--cells 16] [--model weights/shapes-64]

`diffedit eval shapes` scores a predicted mask against the edited object's old | new pixels. A
colour edit changes all of them; a shape edit only those where the two shapes differ. This prints,
on the held-out edits, the IoU against that ground truth of three reference masks:
  - the pixels the edit changes, at pixel resolution;
  - the same carried through a `cells` x `cells` latent map as DiffEdit's mask is (area-averaged,
    upsampled bilinearly, cut at 0.5: the pipeline's own route from latent map to pixel mask);
  - the ground truth itself through the same map (what the latent resolution alone costs).
With --model it also runs the model's mask (paper defaults, mask seed 0) and says where its false
positives lie: within 2 px of the ground truth, on other objects, or elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffedit.io.pictures import mask_to_pil  # noqa: E402
from diffedit.research.metrics import mask_iou  # noqa: E402
from diffedit.settings import DEFAULT  # noqa: E402
from diffedit.shapes.check import _grow  # noqa: E402
from diffedit.shapes.scene import object_masks  # noqa: E402
from diffedit.shapes.world import Edit, heldout_edits  # noqa: E402


def changed_pixels(edit: Edit) -> np.ndarray:
    """(H, W) bool: where the ideal edit differs from the input."""
    return (edit.source_image != edit.target_image).any(axis=-1)


def through_latent_map(mask: np.ndarray, cells: int) -> np.ndarray:
    """`mask` as the best `cells` x `cells` soft map sees it (area mean), brought back to pixels by
    the pipeline's own `mask_to_pil` at the default threshold."""
    soft = F.interpolate(torch.tensor(mask, dtype=torch.float32)[None, None], size=(cells, cells), mode="area")
    height, width = mask.shape
    return np.asarray(mask_to_pil(soft[0, 0], (width, height), threshold=DEFAULT["threshold"])) >= 128


def bounds(edits: list[Edit], cells: int) -> dict[str, dict[str, float]]:
    """Mean IoU per reference mask and edit kind ("colour", "shape", "all")."""
    scores: dict[str, dict[str, list[float]]] = {}
    for edit in edits:
        changed = changed_pixels(edit)
        references = {"changed pixels": changed, f"changed pixels, {cells}x{cells} map": through_latent_map(changed, cells),
                      f"ground truth, {cells}x{cells} map": through_latent_map(edit.edit_mask, cells)}
        for name, mask in references.items():
            kinds = scores.setdefault(name, {"colour": [], "shape": [], "all": []})
            iou = mask_iou(mask, edit.edit_mask)
            kinds[edit.kind].append(iou)
            kinds["all"].append(iou)
    return {name: {kind: float(np.mean(v)) if v else float("nan") for kind, v in kinds.items()}
            for name, kinds in scores.items()}


def false_positives(edits: list[Edit], model: str) -> dict[str, np.ndarray]:
    """Per kind: predicted pixels outside the ground truth [all, within 2 px, on other objects, elsewhere], predicted."""
    from PIL import Image
    from diffedit.pipeline import DiffEditPipeline
    pipe = DiffEditPipeline.from_pretrained(model)
    counts = {"colour": np.zeros(5, dtype=np.int64), "shape": np.zeros(5, dtype=np.int64)}
    for edit in edits:
        mask = pipe.generate_mask(Image.fromarray(edit.source_image), edit.source_caption, edit.target_caption,
                                  generator=torch.Generator().manual_seed(0))
        predicted = np.asarray(mask.mask_images[0]) >= 128
        objects = object_masks(edit.source)
        others = np.delete(objects, edit.object_index, axis=0).any(axis=0)
        outside = predicted & ~edit.edit_mask
        near = _grow(edit.edit_mask, 2)
        counts[edit.kind] += [outside.sum(), (outside & near).sum(), (outside & others & ~near).sum(),
                              (outside & ~near & ~others).sum(), predicted.sum()]
    return counts


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=positive, default=50, help="held-out edits (the first N; eval's default: 50)")
    parser.add_argument("--cells", type=positive, default=16, help="side of the latent map (the embedded model: 16)")
    parser.add_argument("--model", help="also analyse this model's masks (e.g. weights/shapes-64)")
    args = parser.parse_args(argv)
    edits = heldout_edits(args.edits)
    print(f"{args.edits} held-out edits: IoU against old | new of the reference masks")
    print("| reference mask | colour edits | shape edits | all |\n|---|---|---|---|")
    for name, kinds in bounds(edits, args.cells).items():
        print(f"| {name} | {kinds['colour']:.3f} | {kinds['shape']:.3f} | {kinds['all']:.3f} |")
    share = [changed_pixels(e).sum() / e.edit_mask.sum() for e in edits if e.kind == "shape"]
    if share:
        print(f"shape edits: the changed pixels are {np.mean(share):.1%} of old | new "
              f"({min(share):.1%} to {max(share):.1%})")
    if args.model:
        for kind, c in false_positives(edits, args.model).items():
            print(f"{kind} edits, model {args.model}: {c[0]} of {c[4]} predicted pixels outside the ground truth; of "
                  f"those {c[1] / max(c[0], 1):.0%} within 2 px of it, {c[2] / max(c[0], 1):.0%} on other objects, "
                  f"{c[3] / max(c[0], 1):.0%} elsewhere")


if __name__ == "__main__":
    main()
