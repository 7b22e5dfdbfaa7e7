"""What `diffedit bench` writes once its table is complete: the copy baseline, the means per
(method, r) and the benchmark's own listing.

    OUT/results.jsonl, results.csv   one row per (item, method, r): the sweep's rows (sweep.py)
    OUT/copy.jsonl                   one row per item for the copy baseline (output = input, no
                                     model call; its picture is images/ITEM/input.png)
    OUT/summary.json, summary.csv    per (method, r): the number of items and the mean of every
                                     metric column; the copy baseline as method "copy"; for
                                     PIE-Bench, summary.json also per edit type (by_edit_type)
    OUT/benchmark.json               the reader's spec and protocol (split, template, border
                                     quirk...), and per item its prompts and protocol fields
                                     (ImageNet class ids, PIE-Bench edit type, files)

Metrics today are research/metrics.py's (no network weights): bg_psnr_gt / bg_ssim_gt (the
edit against the input outside the ground-truth mask), mask_iou (DiffEdit's mask against it),
bg_psnr_mask / bg_ssim_mask (outside DiffEdit's own mask), mask_area, gt_mask_area, plus
unet_samples (the cost). Where the library metrics plug in (next step of issue 15):
  - per edit (LPIPS, CLIPScore, DeiT accuracy, L1): a function of metrics.MetricInputs registered
    with metrics.register_metric before the run; the sweep adds its column to every row and
    copy_rows to every copy row, and `summarise` averages it like the others;
  - per set (FID, FlexIT's SFID / CSFID): computed from the pictures the rows name (`image`,
    images/ITEM/input.png for copy), grouped by method and r, and per target class with
    benchmark.json's `target_id`; they become further columns of `summarise`'s rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from diffedit.research import metrics as M
from diffedit.research.benchmarks.common import Benchmark
from diffedit.research.plan import AXES
from diffedit.research.table import write_together

METHODS = {"diffedit": "none", "diffedit-no-encoding": "no_encode", "sdedit": "sdedit",
           "encode-decode": "no_mask", "copy": None}   # method -> the sweep's ablation (copy: no model)
METHOD_OF = {ablation: method for method, ablation in METHODS.items() if ablation}
NOT_METRICS = {"key", "item", "mask_timestep", "mask_file", "image", *AXES}
SUMMARY_FILES = ("summary.json", "summary.csv", "copy.jsonl", "benchmark.json")


def copy_rows(bench: Benchmark) -> list[dict]:
    """The copy baseline (output = input): each item's metrics of the input against itself,
    with the registered metrics too. No model runs; it is the anchor point of the curves."""
    rows = []
    for item in bench.items:
        metrics = M.edit_metrics(item.image, item.image, item.gt_mask, None, None, item.source, item.target)
        rows.append({"item": item.id, "method": "copy", "image": f"images/{item.id}/input.png", **metrics})
    return rows


def metric_columns(rows: list[dict]) -> list[str]:
    """The numeric columns of the rows that are measurements, in first-seen order."""
    columns = dict.fromkeys(k for r in rows for k, v in r.items()
                            if k not in NOT_METRICS and not k.startswith(("time_", "cache_"))
                            and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(columns)


def summarise(rows: list[dict], copies: list[dict]) -> list[dict]:
    """One row per (method, r), in the order the runs came, then the copy baseline: the number
    of items and the mean of every metric column over the items that define it (NaN if none)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((METHOD_OF.get(r["ablation"], r["ablation"]), r["strength"]), []).append(r)
    if copies:
        groups[("copy", None)] = copies
    columns = metric_columns(rows + copies)
    out = []
    for (method, strength), members in groups.items():
        entry = {"method": method, "strength": strength, "items": len(members)}
        for c in columns:
            values = [float(m[c]) for m in members if isinstance(m.get(c), (int, float))]
            entry[c] = statistics.fmean(values) if values else math.nan
        out.append(entry)
    return out


def write_summary(out: Path, bench: Benchmark, spec: dict, methods: list[str], rows: list[dict]) -> list[Path]:
    """summary.json, summary.csv, copy.jsonl (when the copy baseline is asked for) and
    benchmark.json in `out`, all or none."""
    copies = copy_rows(bench) if "copy" in methods else []
    summary = summarise(rows, copies)
    payload = {"benchmark": bench.name, "methods": methods, "summary": summary}
    edit_types = {it.id: info["edit_type"] for it, info in zip(bench.items, bench.info) if "edit_type" in info}
    if edit_types:   # PIE-Bench: the same means within each edit type
        payload["by_edit_type"] = {kind: summarise([r for r in rows if edit_types.get(r["item"]) == kind],
                                                   [r for r in copies if edit_types.get(r["item"]) == kind])
                                   for kind in dict.fromkeys(edit_types.values())}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for s in summary for k in s)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    files = {out / "summary.json": json.dumps(payload, indent=1) + "\n",
             out / "summary.csv": buffer.getvalue(),
             out / "benchmark.json": json.dumps({"spec": spec, "protocol": bench.protocol, "items": bench.listing()},
                                                indent=1) + "\n"}
    if copies:
        files[out / "copy.jsonl"] = "".join(json.dumps(r) + "\n" for r in copies)
    return write_together(files)
