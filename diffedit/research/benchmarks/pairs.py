"""A pairs file: the user's own edits (COCO-style sets, generated images, anything), one per row.

    FILE.csv    a header with image, source, target and optionally mask, id
    FILE.jsonl  one JSON object per line with the same keys

`image` and `mask` are paths relative to the file's folder and must stay inside it (no absolute
path, no '..' or symbolic link out of it: plan.inside). `mask`, when given, is a picture of the
ground-truth edit region (white = may change), resized to the image; it enables the background
metrics against ground truth and the IoU of DiffEdit's mask. `id` names the item's results
(default: the row number and the image's name).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.research.benchmarks.common import Benchmark, subset
from diffedit.research.plan import Item, check_item_id, check_prompts, folder_files, too_deep

COLUMNS = ("image", "source", "target", "mask", "id")


def read_rows(path: Path) -> list[dict]:
    """The rows of a pairs file (.csv or .jsonl) as dicts, before any check."""
    if path.is_dir():
        raise ParameterError(f"{path} is a folder, not a pairs file; give the CSV or JSONL file of image, source, "
                             "target [, mask] rows.")
    if not path.is_file():
        raise ParameterError(f"the pairs file {path} does not exist; write a CSV or JSONL of image, source, target "
                             "[, mask] rows (paths relative to its folder).")
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise ParameterError(f"the pairs file {path} must end in .csv or .jsonl.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:   # newline="": the csv module reads line ends
            text = f.read()
    except UnicodeDecodeError:
        raise ParameterError(f"the pairs file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise ParameterError(f"cannot read the pairs file {path} ({e.strerror}); check its permissions.") from None
    if kind == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
        except csv.Error as e:
            raise ParameterError(f"{path} is not a valid CSV file ({e}); fix it.") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):   # JSON Lines ends lines with \n (or \r\n) only
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ParameterError(f"line {number} of {path} is not valid JSON ({e.msg}); write one object per "
                                     "line.") from None
            except RecursionError:
                raise ParameterError(f"line {number} of {too_deep(path)}") from None
    return rows


def read_pairs(file: str | Path, limit: int | None = None, seed: int = 0) -> Benchmark:
    """The rows of a pairs file as items (or `limit` of them, common.subset), in file order."""
    path = user_path(file, ParameterError)
    folder = path.parent
    rows = read_rows(path)
    if not rows:
        raise ParameterError(f"the pairs file {path} has no rows; give one edit (image, source, target) per row.")
    items, info = [], []
    for number, row in subset(list(enumerate(rows, start=1)), limit, seed):
        where = f"row {number} of {path.name}"
        if isinstance(row, dict) and None in row:   # csv.DictReader's key for fields past the header
            raise ParameterError(f"{where} has more fields than the header has columns; quote the fields that hold "
                                 "commas.")
        if not isinstance(row, dict) or not row.get("image") or not row.get("target") or row.get("source") is None:
            raise ParameterError(f"{where} needs 'image', 'source' and a non-empty 'target'.")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ParameterError(f"{where} has unknown columns {unknown}; use {', '.join(COLUMNS)}.")
        if not all(isinstance(row.get(k), (str, type(None))) for k in COLUMNS):
            raise ParameterError(f"{where}: image, source, target, mask and id must be text.")
        check_prompts(row["source"], row["target"], f"{where} ({path})")
        picture, truth = folder_files(folder, row["image"], row.get("mask"), where, "mask")
        item_id = check_item_id(row.get("id") or f"{number:04d}-{Path(row['image']).stem}", where)
        items.append(Item(item_id, picture, row["source"], row["target"], truth))
        info.append({"row": number, "file": row["image"], "mask_file": row.get("mask") or None})
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ParameterError(f"the pairs file {path} repeats item ids; give each row a distinct 'id'.")
    return Benchmark("pairs", items, info, {"protocol": "pairs file", "file": path.name})
