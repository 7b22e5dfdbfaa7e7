"""A sweep run by N processes: each shard's folder, its completion marker, and the merge of the
shards into the one table a single process would have written.

    SWEEP/shards/K-of-N/results.jsonl   the rows of shard K (only that process writes here)
    SWEEP/shards/K-of-N/sweep.json      the config it ran
    SWEEP/shards/K-of-N/items.json      its items
    SWEEP/shards/K-of-N/done.json       written last, when every run of the shard is in its table:
                                        {"shard": K, "count": N, "plan": digest, "rows": R}
    SWEEP/images/ITEM/, SWEEP/masks/ITEM/   pictures, per item (an item belongs to one shard)

`merge_shards(SWEEP)` checks that the N shards ran one plan (same config, same grid, same N),
that every one has finished and holds exactly the runs the plan gives it (as many rows as its
marker counts, none of another shard's items, none outside the plan), and writes
SWEEP/results.jsonl, results.csv, sweep.json and items.json (all or none): the rows in the order
of the plan, each (item, settings) once.

A folder is split one way for its whole life: a run with another number of processes is refused
while its shards are there (delete SWEEP/shards to re-plan from scratch).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from diffedit.errors import OutputFileError
from diffedit.io.files import user_path
from diffedit.research.plan import Item, SweepConfig, plan_digest, plan_runs, runs_per_item
from diffedit.research.shards import FolderLock, Shard, assign
from diffedit.research.table import (
    CONFIG_NAME,
    CSV_NAME,
    ITEMS_NAME,
    RESULTS,
    csv_text,
    read_json,
    read_rows,
    write_together,
)

SHARDS, DONE = "shards", "done.json"
SHARD_FOLDER = re.compile(r"^(\d+)-of-(\d+)$")


def shard_folder(out: Path, shard: Shard) -> Path:
    return out / SHARDS / shard.name


def existing_shards(out: Path) -> dict[int, list[int]]:
    """{N: [K, ...]} of the shard folders in SWEEP/shards."""
    found: dict[int, list[int]] = {}
    folder = out / SHARDS
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            match = SHARD_FOLDER.match(entry.name)
            if match and entry.is_dir():
                found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return found


def check_layout(out: Path, shard: Shard) -> None:
    """Refuse a run whose number of processes differs from the one the folder was split for (or a
    sharded run over a single-process table): the two plans would assign items differently."""
    counts = sorted(existing_shards(out))
    if shard.count == 1:
        if counts:
            raise OutputFileError(f"{out} holds a sweep split into {counts[0]} shards; run the missing ones with "
                                  f"--shard K/{counts[0]} and `diffedit sweep merge {out}`, or choose another --out.")
        return
    if counts and counts != [shard.count]:
        raise OutputFileError(f"{out} holds a sweep split into {counts[0]} shards, not {shard.count}; run it with "
                              f"{counts[0]} processes, or delete {out / SHARDS} to re-plan, or choose another --out.")
    if not counts and (out / RESULTS).is_file():
        raise OutputFileError(f"{out} holds a single-process sweep; resume it without sharding or choose another "
                              "--out.")


def mark_done(folder: Path, shard: Shard, plan: str, item_ids: list[str], rows: int) -> None:
    """The shard's completion marker (written last, atomically): the plan it ran, every item id of
    the sweep in order (the merge's row order without loading any image) and its row count."""
    from diffedit.io.files import atomic_write_text
    payload = {"shard": shard.index, "count": shard.count, "plan": plan, "items": item_ids, "rows": rows}
    atomic_write_text(folder / DONE, json.dumps(payload) + "\n", overwrite=True)


def clear_done(folder: Path) -> None:
    if (folder / DONE).is_file():
        os.unlink(folder / DONE)


@dataclass
class MergeResult:
    out_dir: Path
    rows: list[dict]
    shards: int
    seconds: float


def _markers(out: Path, count: int) -> dict[int, dict]:
    markers = {}
    for k in range(count):
        path = out / SHARDS / f"{k}-of-{count}" / DONE
        if path.is_file():
            markers[k] = read_json(path, "completion marker")
    return markers


def all_done(out: Path, count: int, plan: str | None = None) -> bool:
    """Whether every shard of N has its completion marker (for `plan`, when given)."""
    markers = _markers(out, count)
    return len(markers) == count and (plan is None or all(isinstance(m, dict) and m.get("plan") == plan
                                                          for m in markers.values()))


def merge_shards(out_dir: str | os.PathLike) -> MergeResult:
    """One table from the shards of SWEEP (see the module docstring)."""
    t0 = time.perf_counter()
    out = user_path(out_dir, OutputFileError)
    if not out.is_dir():
        raise OutputFileError(f"{out} is not a folder; give the sweep folder to merge." if os.path.lexists(out) else
                              f"the sweep folder {out} does not exist; check the path.")
    counts = sorted(existing_shards(out))
    if not counts:
        raise OutputFileError(f"{out} holds no shards (no {SHARDS}/K-of-N folders); run the sweep with --shard "
                              "or torchrun first.")
    if len(counts) > 1:
        raise OutputFileError(f"{out / SHARDS} holds shards of different numbers of processes "
                              f"({', '.join(map(str, counts))}); keep the folders of one run and merge again.")
    count = counts[0]
    markers = _markers(out, count)
    missing = [k for k in range(count) if k not in markers]
    if missing:
        names = ", ".join(map(str, missing))
        raise OutputFileError(f"shard{'s' if len(missing) > 1 else ''} {names} of {count} "
                              f"{'have' if len(missing) > 1 else 'has'} not finished (no {DONE}); run "
                              f"{'them' if len(missing) > 1 else 'it'} with --shard K/{count} and merge again.")
    plans = {m.get("plan") for m in markers.values()} if all(isinstance(m, dict) for m in markers.values()) else {None}
    if len(plans) != 1 or None in plans:
        raise OutputFileError(f"the {count} shards in {out / SHARDS} ran different configs or grids; re-run the "
                              "shards of the old config with the new one, then merge.")
    first = shard_folder(out, Shard(0, count))
    cfg = SweepConfig.parse(read_json(first / CONFIG_NAME, "sweep config"))
    ids = markers[0].get("items")
    items = [Item(i, None, "", "") for i in ids] if isinstance(ids, list) else []
    runs = plan_runs(cfg, items)
    if plan_digest(cfg, runs) not in plans:
        raise OutputFileError(f"the completion markers in {out / SHARDS} do not match the config they ran; "
                              "delete the shards' done.json files and run the shards again.")
    owner = assign(runs_per_item(runs, len(items)), count)
    shard_of = {r.key: owner[r.item] for r in runs}
    planned = Counter(shard_of.values())
    with FolderLock(out):
        rows = [row for k in range(count)
                for row in shard_rows(out, Shard(k, count), markers[k], shard_of, planned[k])]
        rows = canonical_order(rows, [r.key for r in runs])
        listing = _merged_items(out, count, ids)
        texts = {out / RESULTS: "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows),
                 out / CONFIG_NAME: (first / CONFIG_NAME).read_text(encoding="utf-8"),
                 out / ITEMS_NAME: json.dumps(listing, indent=2) + "\n", out / CSV_NAME: csv_text(rows)}
        write_together(texts)
    return MergeResult(out, rows, count, time.perf_counter() - t0)


def shard_rows(out: Path, shard: Shard, marker: dict, shard_of: dict[str, int], planned: int) -> list[dict]:
    """The rows of one finished shard, refused unless they are exactly the `planned` runs the plan
    gives it (`shard_of`: run key -> shard) and as many as its completion marker counts."""
    path = shard_folder(out, shard) / RESULTS
    rows = read_rows(path.parent)
    again = f"run it again with --shard {shard.index}/{shard.count} and merge again"
    for row in rows:
        owner = shard_of.get(row.get("key"))
        if owner is None:
            raise OutputFileError(f"shard {shard.index} of {shard.count} holds a row of item {row.get('item')!r} whose "
                                  f"key is not a run of the plan (an older grid, or an edit); delete it from {path}, "
                                  f"{again}.")
        if owner != shard.index:
            raise OutputFileError(f"shard {shard.index} of {shard.count} holds a row of item {row.get('item')!r}, "
                                  f"which the plan gives to shard {owner}; delete it from {path}, {again}.")
    if len(rows) != marker.get("rows") or len(rows) != planned:
        noun = "row" if len(rows) == 1 else "rows"
        raise OutputFileError(f"shard {shard.index} of {shard.count} has {len(rows)} {noun} in {path}, but its {DONE} "
                              f"counts {marker.get('rows')} and the plan gives it {planned}; {again}.")
    return rows


def canonical_order(rows: list[dict], order: list[str]) -> list[dict]:
    """The rows with each key once, in plan order (rows of keys no longer planned last, as found)."""
    by_key: dict[str, dict] = {}
    for row in rows:
        by_key.setdefault(row.get("key"), row)
    planned = [by_key.pop(key) for key in order if key in by_key]
    return planned + list(by_key.values())


def _merged_items(out: Path, count: int, order: list[str]) -> list[dict]:
    entries: dict[str, dict] = {}
    for k in range(count):
        path = out / SHARDS / f"{k}-of-{count}" / ITEMS_NAME
        if path.is_file():
            listing = read_json(path, "item list")
            if not isinstance(listing, list) or not all(isinstance(e, dict) and isinstance(e.get("id"), str)
                                                        for e in listing):
                raise OutputFileError(f"the item list {path} is not a list of items with an \"id\"; run shard {k} "
                                      f"again with --shard {k}/{count} to rewrite it, and merge again.")
            for entry in listing:
                entries.setdefault(entry["id"], entry)
    return [entries[i] for i in order if i in entries]


def wait_and_merge(out: Path, count: int, plan: str, poll: float = 0.5) -> MergeResult:
    """Under torchrun: rank 0 waits until every shard has marked the plan `plan` done (a marker
    left by an earlier run of another plan does not count), then merges. torchrun stops every
    rank when one fails, so the wait ends either way."""
    while not all_done(out, count, plan):
        time.sleep(poll)
    return merge_shards(out)
