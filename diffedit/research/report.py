"""`diffedit bench report DIR`: the paper's trade-off figures and a Markdown table from a bench
folder's summary (benchmarks/summary.py: the means per method and r, the copy baseline included).

    DIR/figures/tradeoff-Y-vs-X.png   metric Y against metric X, one curve per method, points
                                      labelled r=..., the copy baseline as a star (640 x 480 px)
    DIR/figures/grid-METHOD.png       per model method: rows = items ("source -> target"),
                                      columns = the input and each r (figures.image_grid)
    DIR/report.md                     one row per method and r, the copy row first; the figures

The pairs drawn are those asked for (--pair X Y), else the paper's (LPIPS on x against CLIPScore,
CSFID and FID) whose columns the summary has, else the ones today's metrics give (background PSNR
against success or mask IoU). Axes and table headers come from figures.LABELS (name, unit,
direction); a column it does not know keeps its own name.
"""

from __future__ import annotations

import math
from pathlib import Path

from diffedit.errors import ParameterError
from diffedit.io.files import atomic_write_text, user_path
from diffedit.research import figures as F
from diffedit.research.benchmarks.summary import METHODS
from diffedit.research.table import RESULTS, read_json

PAPER_PAIRS = (("lpips", "clip_score"), ("lpips", "csfid"), ("lpips", "fid"))     # (x, y) as the paper
FALLBACK_PAIRS = (("success", "bg_psnr_gt"), ("mask_iou", "bg_psnr_gt"), ("mask_iou", "bg_psnr_mask"))
NAMES = {"diffedit": "DiffEdit", "diffedit-no-encoding": "DiffEdit w/o encoding", "sdedit": "SDEdit",
         "encode-decode": "encode-decode (no mask)", "copy": "copy (output = input)"}
NOT_COLUMNS = ("method", "strength", "items")


def read_summary(folder) -> tuple[Path, dict]:
    """The folder and its summary.json payload ({"benchmark", "methods", "summary": [rows]})."""
    folder = user_path(folder, ParameterError)
    path = folder / "summary.json"
    if not path.is_file():
        raise ParameterError(f"{folder} holds no bench summary (summary.json); run `diffedit bench BENCHMARK --out "
                             f"{folder}` first, or give the folder it wrote.")
    payload = read_json(path, "bench summary")
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), list) or \
            not all(isinstance(r, dict) and "method" in r for r in payload["summary"]):
        raise ParameterError(f"{path} is not a bench summary; run `diffedit bench` again to rewrite it.")
    _check_fields(path, payload)
    return folder, payload


def _check_fields(path: Path, payload: dict) -> None:
    """Refuse a summary whose methods are not names or whose rows lack a number r (copy: none)."""
    methods = payload.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise ParameterError(f"the \"methods\" of {path} are not a list of names; run `diffedit bench` again to "
                             "rewrite it.")
    for n, row in enumerate(payload["summary"], start=1):
        method, strength = row["method"], row.get("strength")
        if not isinstance(method, str) or not method:
            raise ParameterError(f"row {n} of the summary in {path} has a method that is not a name "
                                 f"({method!r:.40}); run `diffedit bench` again to rewrite it.")
        if not (_finite(strength) or strength is None and method == "copy"):
            raise ParameterError(f"row {n} of the summary in {path} ({method}) has no number as its strength r "
                                 f"({strength!r:.40}); run `diffedit bench` again to rewrite it.")


def columns(summary: list[dict]) -> list[str]:
    """The metric columns with at least one finite mean, in first-seen order."""
    return [c for c in dict.fromkeys(k for r in summary for k in r if k not in NOT_COLUMNS)
            if any(_finite(r.get(c)) for r in summary)]


def default_pairs(summary: list[dict]) -> list[tuple[str, str]]:
    """The paper's pairs whose columns exist, else today's (the first of FALLBACK_PAIRS that exist)."""
    have = set(columns(summary))
    paper = [p for p in PAPER_PAIRS if set(p) <= have]
    return paper or [p for p in FALLBACK_PAIRS if set(p) <= have][:1]


def curves(summary: list[dict], x: str, y: str) -> tuple[list[dict], tuple | None]:
    """tradeoff_table-style points of every model method (group = its name, along = r, sorted), and
    the copy baseline's (legend, x, y) anchor, or None where x or y is undefined."""
    rows = [r for r in summary if _finite(r.get(x)) and _finite(r.get(y))]
    table = [{"group": NAMES.get(r["method"], r["method"]), "along": r["strength"], "x": r[x], "y": r[y],
              "count": r.get("items")} for r in rows if r["method"] != "copy"]
    copy = next((r for r in rows if r["method"] == "copy"), None)
    order = list(dict.fromkeys(t["group"] for t in table))
    table.sort(key=lambda t: (order.index(t["group"]), t["along"]))
    return table, (NAMES["copy"], copy[x], copy[y]) if copy else None


def tradeoff_figure(folder: Path, payload: dict, x: str, y: str, size=(640, 480)) -> Path:
    """Metric y against metric x: one curve per method along r, the copy baseline as the anchor."""
    table, anchor = curves(payload["summary"], x, y)
    if not table and anchor is None:
        raise ParameterError(f"no method of {folder / 'summary.json'} has both {x!r} and {y!r}.")
    title = f"{F.short_label(y)} against {F.short_label(x)} along r ({payload.get('benchmark', 'bench')})"
    return F.draw_tradeoff(table, x, y, folder / "figures" / f"tradeoff-{y}-vs-{x}.png", title, "strength",
                           anchor, size)


def markdown(payload: dict, figures: list[Path], folder: Path) -> str:
    """report.md: the table (copy row first, then one row per method and r, by method then r), the
    meaning of every column, and the figures."""
    summary = payload["summary"]
    names = columns(summary)
    order = list(dict.fromkeys(r["method"] for r in summary if r["method"] != "copy"))
    rows = [r for r in summary if r["method"] == "copy"] + sorted(
        (r for r in summary if r["method"] != "copy"), key=lambda r: (order.index(r["method"]), r["strength"]))
    lines = [f"# {payload.get('benchmark', 'bench')}: every method along r", "",
             "| method | r | items | " + " | ".join(F.short_label(c) for c in names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for r in rows:
        r_text = "-" if r.get("strength") is None else f"{r['strength']:g}"
        cells = [NAMES.get(r["method"], r["method"]), r_text, str(r.get("items", ""))]
        lines.append("| " + " | ".join(cells + [_number(r.get(c)) for c in names]) + " |")
    lines += ["", "Columns (means over the items that define them; - where none does):", ""]
    lines += [f"- `{c}`: {F.axis_label(c)}" for c in names]
    lines += ["", *[f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in figures]]
    return "\n".join(lines) + "\n"


def write_report(folder, pairs: list[tuple[str, str]] | None = None) -> list[Path]:
    """Draw the trade-off figures (and image grids when the bench saved edits) and write report.md
    in `folder`, a `diffedit bench` output folder; returns the files written, report.md last."""
    folder, payload = read_summary(folder)
    have = columns(payload["summary"])
    unknown = sorted({c for pair in pairs or [] for c in pair} - set(have))
    if unknown:
        raise ParameterError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a metric of "
                             f"{folder / 'summary.json'}; its metrics are {', '.join(have) or 'none'}.")
    pairs = list(pairs or default_pairs(payload["summary"]))
    written = [tradeoff_figure(folder, payload, x, y) for x, y in pairs]
    if (folder / RESULTS).is_file():
        for method in payload.get("methods", []):
            if METHODS.get(method):
                written.append(F.image_grid(folder, "strength", where={"ablation": METHODS[method]},
                                            out=folder / "figures" / f"grid-{method}.png"))
    report = folder / "report.md"
    atomic_write_text(report, markdown(payload, written, folder), overwrite=True)
    return [*written, report]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value) -> str:
    return f"{value:.4g}" if _finite(value) else "-"
