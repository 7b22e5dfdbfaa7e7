"""The results table of a sweep folder: results.jsonl (one complete JSON line per run, appended
and fsynced, so a crash loses at most the line being written), results.csv rebuilt from it, and
sweep.json, the config that made it (a folder holds one sweep). A shard of a sweep run by many
processes has the same files in its own folder, SWEEP/shards/K-of-N/ (research/merge.py)."""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import suppress
from pathlib import Path

from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import atomic_write_text
from diffedit.research.plan import IDENTITY_KEYS, SweepConfig, inside

RESULTS, CSV_NAME, CONFIG_NAME, ITEMS_NAME = "results.jsonl", "results.csv", "sweep.json", "items.json"
TABLE_FILES = (RESULTS, CSV_NAME, CONFIG_NAME, ITEMS_NAME)


# ---------------------------------------------------------------------- results files

def read_rows(out_dir: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The rows of results.jsonl, each key once (a repeated key, e.g. a line copied by hand,
    counts once: the first line wins; the same key with other values is refused). A torn last
    line (no newline, or not JSON) is ignored, and removed from the file when `repair`; any other
    line that is not a JSON object with a text "key" and finite numbers is refused."""
    path = Path(out_dir) / RESULTS
    if os.path.lexists(path) and not path.is_file():
        raise OutputFileError(f"{path} is not a file; move it away so that the sweep can write its results there.")
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParameterError(f"{path} is not UTF-8 text, so not a results table; move it away and resume.") from None
    lines = text.split("\n")
    rows, by_key = [], {}
    for n, line in enumerate(lines[:-1]):   # a complete line is followed by "\n", so the last piece is torn
        if not line.strip():
            continue
        row = parse_row(line, f"line {n + 1} of {path}")
        key = row.get("key")
        if key in by_key:
            if by_key[key] != row:
                raise ParameterError(f"line {n + 1} of {path} repeats the key of an earlier row with other values; "
                                     "delete the wrong line and resume.")
            continue
        if key is not None:
            by_key[key] = row
        rows.append(row)
    if lines[-1].strip() and repair:
        write_rows(path.parent, rows)
    return rows


def parse_row(line: str, where: str) -> dict:
    """One complete line of results.jsonl as a row, or ParameterError naming `where`."""
    def not_finite(constant: str):
        raise ParameterError(f"{where} holds {constant}, which a results table never does; delete that line and "
                             "resume.")
    try:
        row = json.loads(line, parse_constant=not_finite)
    except (json.JSONDecodeError, RecursionError):
        raise ParameterError(f"{where} is not JSON; delete that line and resume.") from None
    if not isinstance(row, dict):
        raise ParameterError(f"{where} is not a JSON object (a row); delete that line and resume.")
    if row.get("key") is not None and not isinstance(row["key"], str):
        raise ParameterError(f"{where} has a \"key\" that is not text; delete that line and resume.")
    return row


def write_rows(out_dir: Path, rows: list[dict]) -> Path:
    """Replace results.jsonl by `rows`, atomically."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    return atomic_write_text(Path(out_dir) / RESULTS, text, overwrite=True)


def check_table_files(folder: Path) -> None:
    """Refuse, before any work, a sweep folder whose table files cannot be written."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFileError(f"the sweep folder {folder} is not writable; choose another --out or fix its permissions.")
    for name in TABLE_FILES:
        path = folder / name
        if os.path.lexists(path) and not path.is_file():
            raise OutputFileError(f"{path} is not a file; move it away so that the sweep can write there.")


def append_row(out_dir: Path, row: dict) -> None:
    """Append one complete line (a single write, flushed and fsynced)."""
    line = json.dumps(row, allow_nan=False) + "\n"
    with open(out_dir / RESULTS, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_csv(out_dir: Path, rows: list[dict] | None = None) -> Path:
    """results.csv rebuilt from results.jsonl (or from `rows`)."""
    return atomic_write_text(out_dir / CSV_NAME, csv_text(read_rows(out_dir) if rows is None else rows),
                             overwrite=True)


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV; the columns are the union of the rows' keys in order of appearance."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_config(out_dir: Path, cfg: SweepConfig) -> None:
    """A folder holds one sweep: resuming with another model or item set would mix tables."""
    path = out_dir / CONFIG_NAME
    if path.is_file():
        stored = read_json(path, "sweep config")
        stored = stored if isinstance(stored, dict) else {}
        differs = [k for k in IDENTITY_KEYS if json.dumps(stored.get(k), sort_keys=True, default=str)
                  != json.dumps(cfg.identity()[k], sort_keys=True, default=str)]
        if differs and (out_dir / RESULTS).is_file():
            raise OutputFileError(f"{out_dir} holds a sweep with another {', '.join(differs)}; choose another output "
                                  "folder (only the grid may change when resuming).")


def write_config(out_dir: Path, cfg: SweepConfig) -> None:
    """sweep.json: the config of the runs the folder is about to hold."""
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(cfg.as_dict(), indent=2, default=str) + "\n", overwrite=True)


def table_path(folder: Path, relative, what: str) -> Path:
    """FOLDER/RELATIVE for a path read from a results file (a row's image, an item's input),
    refused unless it is text that stays inside FOLDER (plan.inside)."""
    if not isinstance(relative, str) or "\0" in relative:
        raise ParameterError(f"{what} ({relative!r:.60}) is not a file path; run the sweep again to rewrite it.")
    return inside(folder, relative, what)


def read_json(path: Path, what: str):
    """A JSON file this package wrote (sweep.json, items.json, a shard's done.json)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise OutputFileError(f"the {what} {path} cannot be read as JSON; delete it and run again.") from None


def write_together(files: dict[Path, str]) -> list[Path]:
    """Write several text files all or none: each goes to a temporary file first (any failure
    removes them all and publishes nothing), then they are renamed into place one after another."""
    temps: dict[Path, Path] = {}
    try:
        for path, text in files.items():
            temp = path.with_name(f".{path.name}.together-{os.getpid()}")
            atomic_write_text(temp, text, overwrite=True)
            temps[path] = temp
        for path, temp in temps.items():
            os.replace(temp, path)
    except BaseException:
        for temp in temps.values():
            with suppress(OSError):
                os.unlink(temp)
        raise
    return list(files)
