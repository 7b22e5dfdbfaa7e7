"""What a sweep runs: its config (grid axes, their defaults and checks), its items (the shapes
benchmark or a folder with a manifest) and the list of runs, each with a stable key that
resuming matches on. No model is touched here; diffedit/sweep.py does the work."""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from diffedit.arguments import check_prompt_pairs
from diffedit.errors import ParameterError, PromptError
from diffedit.io.files import resolves_inside, user_path
from diffedit.io.images import load_image
from diffedit.research import metrics as M
from diffedit.settings import ABLATIONS, DEFAULT, check

AXES: dict[str, Any] = {name: DEFAULT[name] for name in (   # canonical run order: the first axes vary slowest
    "num_inference_steps", "seed", "mask_samples", "mask_noise_strength", "threshold", "strength",
    "guidance_scale", "blend", "ablation")}
MASK_AXES = ("mask_samples", "mask_noise_strength", "threshold", "blend")   # ignored without a mask
CONFIG_KEYS = ("model", "device", "dtype", "resolution", "items", "grid", "metrics", "save_images")
IDENTITY_KEYS = ("model", "dtype", "resolution", "items", "metrics")        # must match to resume
RUN_DEPENDENT = ("time_", "cache_")                                        # columns that depend on run order
ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")                  # an item id is one safe file name


# ---------------------------------------------------------------------- config

@dataclass
class SweepConfig:
    items: dict
    grid: dict[str, list] | list[dict[str, list]]   # axis -> values; a list of such grids runs their union
    model: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    resolution: int | None = None
    metrics: dict = field(default_factory=dict)
    save_images: bool = True

    @classmethod
    def parse(cls, config: "dict | str | os.PathLike | SweepConfig") -> "SweepConfig":
        if isinstance(config, SweepConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = user_path(config, ParameterError)
            try:
                config = json.loads(path.read_text(encoding="utf-8-sig"))
            except OSError as e:
                raise ParameterError(f"cannot read the sweep config {path} ({e.strerror}); check the path.") from None
            except json.JSONDecodeError as e:
                raise ParameterError(f"the sweep config {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                                     "fix it.") from None
            except UnicodeDecodeError:
                raise ParameterError(f"the sweep config {path} is not UTF-8 text; save it as UTF-8.") from None
            except RecursionError:
                raise ParameterError(too_deep(path)) from None
        if not isinstance(config, dict):
            raise ParameterError("a sweep config must be a JSON object with at least an 'items' entry.")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ParameterError(f"unknown sweep config keys {unknown}; use only {', '.join(CONFIG_KEYS)}.")
        if "items" not in config:
            raise ParameterError('the sweep config needs "items": {"benchmark": "shapes", "count": N} or '
                                 '{"folder": DIR}.')
        if not isinstance(config.get("save_images", True), bool):
            raise ParameterError(f'"save_images" must be true or false, got {config["save_images"]!r}.')
        grid = config.get("grid") or {}
        grids = [_grid(g) for g in grid] if isinstance(grid, list) and grid else _grid(grid)
        cfg = cls(items=config["items"], grid=grids, model=config.get("model"),
                  device=config.get("device", "cpu"), dtype=config.get("dtype", "fp32"),
                  resolution=config.get("resolution"), metrics=config.get("metrics") or {},
                  save_images=config.get("save_images", True))
        cfg.validate()
        return cfg

    @property
    def grids(self) -> list[dict[str, list]]:
        """The grid as a list of grids (one, unless the config gave a list)."""
        return self.grid if isinstance(self.grid, list) else [self.grid]

    def validate(self) -> None:
        for g in self.grids:
            for axis, values in g.items():
                for v in values:
                    check(axis, v, f"the grid axis {axis!r}")
            for steps, r in itertools.product(g["num_inference_steps"], g["strength"]):
                if int(steps * r + 1e-9) < 1:   # as DDIM.num_steps counts them
                    raise ParameterError(f"strength {r} leaves no step out of {steps} (floor(steps * r) = 0); "
                                         "raise the strength or the number of steps.")
        if not isinstance(self.metrics, dict) or not all(isinstance(v, dict) and {"factory", "weights"} <= set(v)
                                                         for v in self.metrics.values()):
            raise ParameterError('"metrics" must map names to {"factory": "module:function", "weights": PATH}.')
        if self.model is not None and not isinstance(self.model, str):
            raise ParameterError(f'"model" must be a path or hub id (text) or null, got {self.model!r}.')
        if not isinstance(self.device, str) or not isinstance(self.dtype, str):
            raise ParameterError('"device" and "dtype" must be text, e.g. "cpu" or "cuda" and "fp32".')
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 8):
            raise ParameterError(f'"resolution" must be a whole number of pixels (at least 8) or null, '
                                 f'got {self.resolution!r}.')
        folder = self.items.get("folder") if isinstance(self.items, dict) else None
        if folder is not None and not isinstance(folder, str):
            raise ParameterError(f'"items": {{"folder": DIR}} needs DIR as text, got {folder!r}.')

    def identity(self) -> dict:
        return {k: self.items_identity if k == "items" else getattr(self, k) for k in IDENTITY_KEYS}

    def as_dict(self) -> dict:
        return {k: self.items_identity if k == "items" else getattr(self, k) for k in CONFIG_KEYS}

    @functools.cached_property
    def items_identity(self) -> dict:
        """The items spec as resuming compares it: a folder's spec with the digest of what its
        items are now (items_digest), so that changed prompts or pictures are another sweep. A
        benchmark's spec carries the digest its reader gave (benchmarks/command.py); the shapes
        benchmark is made by code. A caller that has loaded the items sets it with `identify`."""
        return self.identify(load_items(self.items)) if self._digested else self.items

    def identify(self, items: list[Item]) -> dict:
        """Set (and return) `items_identity` from `items`, the items this config's spec gave, so
        that they are not read and decoded a second time for their digest."""
        self.items_identity = {**self.items, "digest": items_digest(items)} if self._digested else self.items
        return self.items_identity

    @property
    def _digested(self) -> bool:
        """A folder of items: its identity holds the digest of their files."""
        return isinstance(self.items, dict) and self.items.get("folder") is not None


def _grid(grid) -> dict[str, list]:
    """One grid of a config: every axis of AXES with its list of values (the default if absent)."""
    if not isinstance(grid, dict):
        raise ParameterError('"grid" must be an object mapping axis names to a value or a list of values '
                             '(or a list of such objects, whose union is run).')
    bad = sorted(set(grid) - set(AXES))
    if bad:
        raise ParameterError(f"unknown grid axes {bad}; use {', '.join(AXES)}.")
    return {a: _as_list(grid.get(a, default), a) for a, default in AXES.items()}


def _as_list(value, axis: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ParameterError(f"the grid axis {axis!r} has no values; give at least one.")
    if len(set(map(json.dumps, values))) != len(values):
        raise ParameterError(f"the grid axis {axis!r} repeats a value ({values}); list each value once.")
    return values


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------- items

@dataclass
class Item:
    """One edit of a sweep. Its picture may be held as the file it is read from, and its
    ground-truth mask as the function that makes it: `image` and `gt_mask` then read them each
    time they are asked for, so that the items of a large benchmark hold no pixels."""
    id: str
    picture: Image.Image | Path | None    # the input image, or its file
    source: str
    target: str
    truth: np.ndarray | Callable[[], np.ndarray] | None = None   # (H, W) bool, the region the edit may change
    edit: Any = None                      # a shapes.world.Edit (ground truth for check_edit)

    @property
    def image(self) -> Image.Image | None:
        return load_image(self.picture) if isinstance(self.picture, Path) else self.picture

    @property
    def gt_mask(self) -> np.ndarray | None:
        return self.truth() if callable(self.truth) else self.truth


def items_digest(items: list[Item]) -> str:
    """A fingerprint of what the items are: ids, prompts, pictures (a file by its bytes) and
    ground-truth masks. Resuming compares it, so a folder never mixes two versions of the data."""
    h = hashlib.sha1()
    for item in items:
        h.update(json.dumps([item.id, item.source, item.target]).encode())
        picture = item.picture
        h.update(picture.read_bytes() if isinstance(picture, Path) else
                 b"" if picture is None else f"{picture.mode}{picture.size}".encode() + picture.tobytes())
        mask = item.gt_mask
        h.update(b"no mask" if mask is None else f"{mask.shape}".encode() + np.packbits(mask).tobytes())
    return h.hexdigest()[:16]


def load_items(spec: dict) -> list[Item]:
    """{"benchmark": "shapes", "count": N} or {"folder": DIR} (see the module docstring)."""
    if isinstance(spec, dict) and spec.get("benchmark") in ("imagenet", "pie-bench", "pairs"):
        raise ParameterError(f"the {spec['benchmark']} benchmark runs with `diffedit bench {spec['benchmark']}` "
                             "(research/benchmarks reads its items), not as a sweep config.")
    if isinstance(spec, dict) and spec.get("benchmark") is not None:
        if spec["benchmark"] != "shapes" or not _is_int(spec.get("count")) or spec["count"] < 1:
            raise ParameterError('benchmark items read {"benchmark": "shapes", "count": N} with N >= 1.')
        from diffedit.shapes.world import heldout_edits
        return [Item(f"shapes-{i:03d}", Image.fromarray(e.source_image), e.source_caption, e.target_caption,
                     e.edit_mask, e) for i, e in enumerate(heldout_edits(spec["count"]))]
    if isinstance(spec, dict) and spec.get("folder") is not None:
        return _folder_items(user_path(spec["folder"], ParameterError))
    raise ParameterError('"items" must be {"benchmark": "shapes", "count": N} or {"folder": DIR}.')


def _folder_items(folder: Path) -> list[Item]:
    entries = _read_manifest(folder)
    if not isinstance(entries, list) or not entries:
        raise ParameterError(f"the manifest in {folder} lists no items; give a list of objects with image, source "
                             "and target.")
    items = []
    for i, e in enumerate(entries):
        where = f"manifest entry {i} in {folder}"
        if not isinstance(e, dict) or not e.get("image") or e.get("target") in (None, "") or e.get("source") is None:
            raise ParameterError(f"{where} needs 'image', 'source' and a non-empty 'target'.")
        if not all(isinstance(e[k], str) for k in ("image", "source", "target")) or \
                not isinstance(e.get("gt_mask"), (str, type(None))):
            raise ParameterError(f"{where}: image, gt_mask, source and target must be text.")
        check_prompts(e["source"], e["target"], where)
        picture, truth = folder_files(folder, e["image"], e.get("gt_mask"), f"manifest entry {i}", "gt_mask")
        item_id = check_item_id(str(e.get("id") or f"{i:03d}-{Path(e['image']).stem}"), f"manifest entry {i}")
        items.append(Item(item_id, picture, e["source"], e["target"], truth))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ParameterError(f"the manifest in {folder} repeats item ids; give each item a distinct 'id'.")
    return items


def _read_manifest(folder: Path):
    """The entries of FOLDER/manifest.json (a list, or {"items": [...]}) or FOLDER/manifest.csv."""
    json_path, csv_path = folder / "manifest.json", folder / "manifest.csv"
    try:
        if json_path.is_file():
            entries = json.loads(json_path.read_text(encoding="utf-8-sig"))
            return entries.get("items") if isinstance(entries, dict) else entries
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f, strict=True))
    except UnicodeDecodeError:
        raise ParameterError(f"the manifest in {folder} is not UTF-8 text; save it as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise ParameterError(f"{json_path} is not valid JSON ({e.msg}, line {e.lineno}); fix it.") from None
    except RecursionError:
        raise ParameterError(too_deep(json_path)) from None
    except csv.Error as e:
        raise ParameterError(f"{csv_path} is not a valid CSV file ({e}); fix it.") from None
    except OSError as e:
        raise ParameterError(f"cannot read the manifest in {folder} ({e.strerror}); check its permissions.") from None
    raise ParameterError(f"{folder} has no manifest.json or manifest.csv; write one listing image, source, target "
                         "(and optionally gt_mask, id) per item.")


def too_deep(path: Path) -> str:
    """The sentence for a JSON file nested deeper than the parser goes."""
    return f"{path} nests JSON arrays or objects too deeply to be read; fix it."


def check_prompts(source: str, target: str, where: str) -> None:
    """Refuse, when the items are read, a target the pipeline would refuse when the run reaches it."""
    try:
        check_prompt_pairs([source], [target])
    except PromptError as e:
        raise PromptError(f"{where}: {e}") from None


def folder_files(folder: Path, image: str, mask: str | None, where: str, mask_name: str) -> tuple[Path, Any]:
    """An item's picture FOLDER/IMAGE and its optional ground-truth mask FOLDER/MASK, both checked
    now (inside FOLDER, decodable) and read again when the run asks for them: (the picture's path,
    None or the function that gives the mask at the picture's size)."""
    path = inside(folder, image, f"the image of {where}")
    size = load_image(path).size
    if not mask:
        return path, None
    truth = functools.partial(read_mask, inside(folder, mask, f"the {mask_name} of {where}"), size)
    truth()
    return path, truth


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask picture as (H, W) bool at `size` (white = may change)."""
    return M.as_bool_mask(load_image(path).convert("L"), size)


def inside(folder: Path, relative: str, what: str) -> Path:
    """FOLDER/RELATIVE, refused unless it stays inside FOLDER (no absolute path, no '..' out of
    it, no symbolic link pointing out of it)."""
    path = folder / relative
    if Path(relative).is_absolute() or not resolves_inside(path, folder):
        raise ParameterError(f"{what} ({relative!r}) points outside {folder}; give a path relative to that folder "
                             "and inside it.")
    return path



def check_item_id(item_id: str, where: str) -> str:
    """An item id names files and folders of the results (images/ID/...), so it must be one plain
    file name: letters, digits, '.', '_' and '-', starting with a letter or a digit."""
    if not ITEM_ID.fullmatch(item_id):
        raise ParameterError(f"the item id {item_id!r} of {where} is not a plain name; use up to 128 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit.")
    return item_id


# ---------------------------------------------------------------------- runs and keys

@dataclass(frozen=True)
class Run:
    item: int            # index into the item list
    item_id: str
    settings: tuple      # (axis, value) pairs in AXES order

    @property
    def s(self) -> dict:
        return dict(self.settings)

    @functools.cached_property
    def key(self) -> str:
        """The run's identity in the results table (computed once: a big plan asks for it often)."""
        return json.dumps({"item": self.item_id, **self.s}, sort_keys=True)


def plan_runs(cfg: SweepConfig, items: list[Item]) -> list[Run]:
    """Every (item, grid point), items outermost, then the grids in order, then the axes in AXES
    order; a point that two grids share is run once."""
    names = list(AXES)
    points = list(dict.fromkeys(combo for g in cfg.grids for combo in itertools.product(*(g[a] for a in names))))
    return [Run(i, item.id, tuple(zip(names, combo))) for i, item in enumerate(items) for combo in points]


def plan_digest(cfg: SweepConfig, runs: list[Run]) -> str:
    """A fingerprint of what a sweep runs (its identity and every run key, in order): the shards
    of one sweep share it, and the same digest gives the same shard assignment."""
    text = json.dumps({"identity": cfg.identity(), "runs": [r.key for r in runs]}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def runs_per_item(runs: list[Run], count: int) -> list[int]:
    """The number of runs of each item (the weights the shard assignment balances)."""
    weights = [0] * count
    for r in runs:
        weights[r.item] += 1
    return weights


def effective_settings(s: dict) -> dict:
    """The settings that can change the output of a run: the ablation drops the axes it ignores
    (no mask: the mask axes; encoding without a mask: also the seed, as DDIM with eta = 0 draws
    no noise)."""
    encode, use_mask = ABLATIONS[s["ablation"]]
    drop = set() if use_mask else set(MASK_AXES) | ({"seed"} if encode else set())
    return {k: v for k, v in s.items() if k not in drop}


def comparable(row: dict) -> dict:
    """A row without the columns that depend on run order (timings, cache hits)."""
    return {k: v for k, v in row.items() if not k.startswith(RUN_DEPENDENT)}
