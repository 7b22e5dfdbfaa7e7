"""The results table of a sweep folder: results.jsonl (one complete JSON line per run, appended
and fsynced, so a crash loses at most the line being written), results.csv rebuilt from it, and
sweep.json, the config that made it (a folder holds one sweep)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import atomic_write_text
from diffedit.research.plan import IDENTITY_KEYS, SweepConfig

RESULTS, CSV_NAME, CONFIG_NAME, ITEMS_NAME = "results.jsonl", "results.csv", "sweep.json", "items.json"


# ---------------------------------------------------------------------- results files

def read_rows(out_dir: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The rows of results.jsonl. A torn last line (no newline, or not JSON) is ignored, and
    removed from the file when `repair`."""
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, torn = [], False
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        last = n == len(lines) - 1   # a complete line is followed by "\n", so the last piece is torn
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if row is None or last:
            if not last:
                raise ParameterError(f"line {n + 1} of {path} is not JSON; delete that line and resume.")
            torn = True
            continue
        rows.append(row)
    if torn and repair:
        atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows), overwrite=True)
    return rows


def append_row(out_dir: Path, row: dict) -> None:
    """Append one complete line (a single write, flushed and fsynced)."""
    line = json.dumps(row, allow_nan=False) + "\n"
    with open(out_dir / RESULTS, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_csv(out_dir: Path) -> Path:
    """results.csv rebuilt from results.jsonl (columns: union of keys in order of appearance)."""
    rows = read_rows(out_dir)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(out_dir / CSV_NAME, buffer.getvalue(), overwrite=True)


def check_config(out_dir: Path, cfg: SweepConfig) -> None:
    """A folder holds one sweep: resuming with another model or item set would mix tables."""
    path = out_dir / CONFIG_NAME
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        differs = [k for k in IDENTITY_KEYS if json.dumps(stored.get(k), sort_keys=True, default=str)
                  != json.dumps(cfg.identity()[k], sort_keys=True, default=str)]
        if differs and (out_dir / RESULTS).is_file():
            raise OutputFileError(f"{out_dir} holds a sweep with another {', '.join(differs)}; choose another output "
                                  "folder (only the grid may change when resuming).")
    atomic_write_text(path, json.dumps(cfg.as_dict(), indent=2, default=str) + "\n", overwrite=True)
