"""PIE-Bench (Ju et al., "Direct Inversion", ICLR 2024), read from the user's copy (its authors
distribute it through a request form; it is never shipped or downloaded here).

    DATA/mapping_file.json     per image id: image_path, original_prompt, editing_prompt,
                               editing_instruction, editing_type_id, blended_word, mask
    DATA/annotation_images/    the 700 images, at the mapping's image_path

Each row gives one item, in the mapping's order:
  - prompts: original_prompt -> editing_prompt with the "[" and "]" markers of the edited words
    removed (the benchmark's evaluation does the same: `.replace("[", "").replace("]", "")`);
  - the ground-truth mask (1 = the region the edit may change), decoded from `mask`, run-length
    pairs (start, length) over the row-major flattened 512 x 512 image, exactly as the
    benchmark's own `mask_decode` does: a run is cut at the end of the image, and then the first
    and last rows and columns are set to 1 ("to avoid annotation errors in boundary"). That border
    quirk counts the image's 4 edges as edited region, so background metrics ignore them; it is
    on by default (the published numbers use it) and switchable (`border_quirk=False`,
    `--no-border-quirk`) for the mask as annotated;
  - the edit type: editing_type_id and its name (EDIT_TYPES).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.io.images import load_image
from diffedit.research.benchmarks.common import Benchmark, subset
from diffedit.research.plan import Item, check_item_id, inside, too_deep

MASK_SHAPE = (512, 512)
EDIT_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
              "4": "change attribute (content)", "5": "change attribute (pose)", "6": "change attribute (color)",
              "7": "change attribute (material)", "8": "change background", "9": "change style"}
WHERE = "PIE-Bench comes from its authors (github.com/cure-lab/PnPInversion, through their request form)"


def strip_markers(prompt: str) -> str:
    """A PIE-Bench prompt without the [ ] that mark its edited words."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(runs: list[int], shape: tuple[int, int] = MASK_SHAPE, border_quirk: bool = True) -> np.ndarray:
    """(H, W) bool: 1 on every run (start, length) of the row-major flattened image, a run cut at
    the image's end; with `border_quirk`, also the first and last rows and columns, as PIE-Bench's
    mask_decode does (cure-lab/PnPInversion, evaluation/evaluate.py; pinned by
    tests/test_bench_readers.py)."""
    if not isinstance(runs, list) or len(runs) % 2 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in runs):
        raise ParameterError("a PIE-Bench mask must be a list of (start, length) pairs of whole numbers >= 0.")
    length = shape[0] * shape[1]
    flat = np.zeros(length, dtype=bool)
    for start, count in zip(runs[0::2], runs[1::2]):
        flat[start:start + min(count, max(length - start, 0))] = True
    mask = flat.reshape(shape)
    if border_quirk:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def read_pie_bench(data: str | Path, border_quirk: bool = True, limit: int | None = None, seed: int = 0) -> Benchmark:
    """Every edit of the mapping file (or `limit` of them, common.subset), with its image, prompts,
    ground-truth mask and edit type. Item ids are `pie-<image id>`."""
    data = user_path(data, ParameterError)
    mapping_path, images = data / "mapping_file.json", data / "annotation_images"
    for path in (mapping_path, images):
        if not path.exists():
            raise ParameterError(f"{path} is missing: a PIE-Bench folder holds mapping_file.json and "
                                 f"annotation_images/; {WHERE}.")
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParameterError(f"cannot read {mapping_path} as JSON ({e}); use the file PIE-Bench ships.") from None
    except RecursionError:
        raise ParameterError(too_deep(mapping_path)) from None
    if not isinstance(mapping, dict) or not mapping:
        raise ParameterError(f"{mapping_path} holds no edits; PIE-Bench's mapping file maps image ids to edits.")
    items, info = [], []
    for key, row in subset(list(mapping.items()), limit, seed):
        needed = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")
        if not isinstance(row, dict) or any(k not in row for k in needed):
            raise ParameterError(f"the edit {key!r} of {mapping_path} lacks one of {', '.join(needed)}; use the "
                                 "mapping file PIE-Bench ships.")
        texts = ("image_path", "original_prompt", "editing_prompt")
        if not all(isinstance(row[k], str) for k in texts):
            raise ParameterError(f"the edit {key!r} of {mapping_path}: {', '.join(texts)} must be text; use the "
                                 "mapping file PIE-Bench ships.")
        path = inside(images, row["image_path"], f"the image of PIE-Bench edit {key!r}")
        size = load_image(path).size   # checked now, read again when the run reaches the edit
        if size != MASK_SHAPE[::-1]:
            raise ParameterError(f"the PIE-Bench image {row['image_path']} is {size[0]}x{size[1]}, not "
                                 "512x512, so its run-length mask does not fit; use the benchmark's own images.")
        try:
            decode_mask(row["mask"], MASK_SHAPE, border_quirk)
        except ParameterError as e:
            raise ParameterError(f"the mask of PIE-Bench edit {key!r} in {mapping_path}: {e}") from None
        truth = functools.partial(decode_mask, row["mask"], MASK_SHAPE, border_quirk)
        edit_type = str(row["editing_type_id"])
        items.append(Item(check_item_id(f"pie-{key}", f"PIE-Bench edit {key!r}"), path,
                          strip_markers(row["original_prompt"]), strip_markers(row["editing_prompt"]), truth))
        info.append({"image_id": key, "file": row["image_path"], "edit_type_id": edit_type,
                     "edit_type": EDIT_TYPES.get(edit_type, "unknown"), "blended_word": row.get("blended_word", ""),
                     "instruction": row.get("editing_instruction", "")})
    protocol = {"protocol": "PIE-Bench (Ju et al. 2024)", "border_quirk": border_quirk,
                "mask": "run-length (start, length) over the row-major 512x512 image; 1 = edited region"}
    return Benchmark("pie-bench", items, info, protocol)
