"""What the figures read from a sweep folder: its rows and items, the cells of a grid, and the
pictures and saved masks its tables point at (paths refused if they leave the folder, pictures
through the guarded loader, masks without pickles)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.io.images import load_image
from diffedit.research.plan import AXES
from diffedit.research.table import ITEMS_NAME, read_json, read_rows, table_path


def load_sweep(sweep_dir: str | os.PathLike) -> tuple[Path, list[dict], list[dict]]:
    folder = user_path(sweep_dir, ParameterError)
    rows = read_rows(folder)
    if not rows:
        raise ParameterError(f"{folder} holds no sweep results (results.jsonl); run `diffedit sweep` there first.")
    items = read_json(folder / ITEMS_NAME, "item list") if (folder / ITEMS_NAME).is_file() else []
    if not isinstance(items, list) or not all(isinstance(i, dict) and "id" in i for i in items):
        raise ParameterError(f"{folder / ITEMS_NAME} is not a list of items; run the sweep again to rewrite it.")
    return folder, rows, items


def select(rows: list[dict], where: dict | None) -> list[dict]:
    if not where:
        return rows
    unknown = [k for k in where if not any(k in r for r in rows)]
    if unknown:
        raise ParameterError(f"`where` names {unknown}, which are not columns of the sweep; use axes like "
                             f"{', '.join(AXES)}.")
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def varying_axes(rows: list[dict]) -> dict[str, list]:
    """Grid axes taking more than one value in `rows`, with their values in order of appearance."""
    values = {axis: list(dict.fromkeys(r[axis] for r in rows if axis in r)) for axis in AXES}
    return {axis: v for axis, v in values.items() if len(v) > 1}


def unique_row(rows: list[dict], field: str, what: str) -> dict:
    """The one row of a cell (all rows of the cell must agree on `field`)."""
    distinct = {json.dumps(r.get(field)) for r in rows}
    if len(distinct) > 1:
        axes = ", ".join(varying_axes(rows)) or "nothing"
        raise ParameterError(f"{len(distinct)} different results fall in the cell of {what} ({axes} vary); "
                             "fix those axes with where={axis: value}.")
    return rows[0]


def sorted_values(values) -> list:
    values = list(dict.fromkeys(values))
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def item_ids(rows: list[dict], items: list[dict], max_items: int | None) -> list[str]:
    present = dict.fromkeys(r["item"] for r in rows)
    order = [it["id"] for it in items if it["id"] in present] or list(present)
    return order[:max_items] if max_items else order


def open_picture(folder: Path, relative: str | None, what: str) -> Image.Image | None:
    """The picture at a path read from the sweep's files (refused if it leaves `folder`), None if absent."""
    if not relative:
        return None
    path = table_path(folder, relative, what)
    return load_image(path) if path.is_file() else None


def saved_mask_maps(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a saved mask (.npz: soft, difference and maybe per_sample), without pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            maps = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        maps = {}
    if not {"soft", "difference"} <= set(maps):
        raise ParameterError(f"{path} is not a saved mask (.npz with soft and difference maps); run the sweep again "
                             "to rewrite it.")
    return maps


def default_out(folder: Path, name: str) -> Path:
    return folder / "figures" / name
