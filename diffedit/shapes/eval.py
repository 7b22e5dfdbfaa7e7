"""`diffedit eval shapes`: DiffEdit on held-out scenes of the synthetic world, scored against
ground truth that no photograph has. It is a built-in sweep (research/sweep.py: the same engine,
caches, rows and resuming) plus a summary table.

For each held-out edit (world.heldout_edits: colour and shape edits, alternating):
  - mask IoU         the predicted mask (pixel resolution) against the edited object's true pixels
                     (old | new object)
  - background PSNR  the edit against the input, over the pixels outside every object
                     (`bg_psnr_scene` in the sweep's rows)
  - success          check.check_edit: the edited object has the target colour and shape
  - others kept      check.others_kept: every other object of the scene keeps its colour and
                     shape at its place (an edit that also repaints or moves them does not); its
                     mean is over the edits whose scene has other objects (`edits_with_others`)
  - strict success   success and others kept, over every edit (a one-object scene's edit: success)

Runs, the union of four grids around the paper's defaults (one mask and one inversion per image
serve them all):
  - "diffedit"          the default settings
  - the paper's trade-off: r in `strengths` (Fig. 4 of the paper) and the mask threshold
  - ablations at the default r: "no_mask" (encode-decode), "no_encode" (noised latents instead
    of DDIM-encoded ones, "DiffEdit w/o encoding"), "sdedit" (neither)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import user_path
from diffedit.research.plan import SweepConfig
from diffedit.research.shards import FolderLock
from diffedit.research.sweep import run_sweep
from diffedit.research.table import CONFIG_NAME, TABLE_FILES, read_json, write_together
from diffedit.settings import CURVE_STRENGTHS, DEFAULT, add_argument
from diffedit.shapes.world import heldout_edits

ABLATION_RUNS = ("no_mask", "no_encode", "sdedit")
REPORT_FILES = ("summary.csv", "summary.json")


@dataclass(frozen=True)
class EvalSettings:
    count: int = 50                                         # held-out edits (alternating colour / shape)
    strength: float = DEFAULT["strength"]                   # encoding ratio r of the default run
    num_inference_steps: int = DEFAULT["num_inference_steps"]
    guidance_scale: float = DEFAULT["guidance_scale"]       # classifier-free guidance while decoding
    num_mask_samples: int = DEFAULT["mask_samples"]         # noise samples n of the mask
    mask_noise_strength: float = DEFAULT["mask_noise_strength"]
    threshold: float = DEFAULT["threshold"]                 # mask threshold of the default run
    strengths: tuple[float, ...] = CURVE_STRENGTHS             # the r table
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # the threshold table
    ablations: bool = True                                  # also run no_mask, no_encode, sdedit
    seed: int = DEFAULT["seed"]                             # seed of every item's mask noise


@dataclass
class EvalReport:
    settings: EvalSettings
    rows: list[dict]                    # one per (edit, run): the sweep's row plus run and kind
    summary: list[dict]                 # one per run: means over edits
    seconds: float                      # compute time of the whole evaluation (sum over rows)
    default_seconds: float              # compute time of the default runs alone (mask + inversion + one decode)

    def table(self) -> str:
        lines = [f"{'run':<22}{'r':>5}{'thr':>6}{'IoU':>7}{'bgPSNR':>8}{'success':>9}{'colour':>8}{'shape':>7}"
                 f"{'others':>8}{'strict':>8}"]
        for s in self.summary:
            lines.append(f"{s['run']:<22}{s['strength']:>5.1f}{s['threshold']:>6.2f}{s['mask_iou']:>7.3f}"
                         f"{s['bg_psnr']:>8.2f}{s['success']:>9.2f}{s['colour_success']:>8.2f}{s['shape_success']:>7.2f}"
                         f"{s['others_kept']:>8.2f}{s['success_strict']:>8.2f}")
        return "\n".join(lines)


def sweep_config(s: EvalSettings, model: str | None = None) -> dict:
    """The evaluation as a sweep config: a default grid point and three one-axis grids around it."""
    base = {"num_inference_steps": s.num_inference_steps, "seed": s.seed, "mask_samples": s.num_mask_samples,
            "mask_noise_strength": s.mask_noise_strength, "threshold": s.threshold, "strength": s.strength,
            "guidance_scale": s.guidance_scale, "blend": DEFAULT["blend"], "ablation": "none"}
    grids = [base] + [{**base, axis: list(values)} for axis, values in (("strength", s.strengths),
                                                                          ("threshold", s.thresholds)) if values]
    if s.ablations:
        grids.append({**base, "ablation": list(ABLATION_RUNS)})
    return {"model": model, "items": {"benchmark": "shapes", "count": s.count}, "grid": grids, "save_images": False}


def run_name(row: dict, s: EvalSettings) -> str:
    """The name of a row's run in the summary: diffedit, r=..., threshold=... or the ablation."""
    if row["ablation"] != "none":
        return row["ablation"]
    if row["strength"] != s.strength:
        return f"r={row['strength']:g}"
    if row["threshold"] != s.threshold:
        return f"threshold={row['threshold']:g}"
    return "diffedit"


def evaluate(pipe, settings: EvalSettings = EvalSettings(), out_dir: str | Path | None = None,
             bar: bool = False, model: str | None = None) -> EvalReport:
    """Run (or resume, in `out_dir`) the evaluation sweep and summarise it per run. `model` names
    the pipe's weights in the sweep's config, so that a folder never mixes two models' rows."""
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="diffedit-eval-") as tmp:
            return evaluate(pipe, settings, tmp, bar, model)
    result = run_sweep(sweep_config(settings, model), out_dir, pipe=pipe, bar=bar)
    edits = {f"shapes-{i:03d}": e for i, e in enumerate(heldout_edits(settings.count))}
    rows = [{**r, "run": run_name(r, settings), "kind": edits[r["item"]].kind,
             "objects": len(edits[r["item"]].source.objects)} for r in result.rows if r["item"] in edits]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    seconds = sum(r["time_mask_s"] + r["time_inversion_s"] + r["time_edit_s"] for r in rows)
    default_seconds = sum(r["time_mask_s"] + r["time_inversion_s"] + r["time_edit_s"]
                          for r in rows if r["run"] == "diffedit")
    return EvalReport(settings, rows, [summarise(rows, run) for run in runs], seconds, default_seconds)


def summarise(rows: list[dict], run: str) -> dict:
    """Means over the edits of one run (NaN where the run defines no such number, e.g. no mask IoU
    without a mask). others_kept is over the edits of scenes with other objects; it and
    success_strict are NaN when a row lacks others_kept (written before it was measured)."""
    mine = [r for r in rows if r["run"] == run]

    def mean(key: str, kind: str | None = None) -> float:
        values = [float(r[key]) for r in mine if r.get(key) is not None and kind in (None, r["kind"])]
        return statistics.fmean(values) if values else math.nan

    def mean_of_all(values: list) -> float:   # NaN unless every row has its value: no partial mean
        return statistics.fmean(values) if values and None not in values else math.nan
    kept = [r.get("others_kept") for r in mine]
    strict = [None if k is None else bool(r["success"]) and k for r, k in zip(mine, kept)]
    first = mine[0]
    return {"run": run, "strength": first["strength"], "threshold": first["threshold"],
            "ablation": first["ablation"], "edits": len(mine), "mask_iou": mean("mask_iou"),
            "bg_psnr": mean("bg_psnr_scene"), "success": mean("success"),
            "colour_success": mean("success", "colour"), "shape_success": mean("success", "shape"),
            "edits_with_others": sum(r["objects"] > 1 for r in mine),
            "others_kept": mean_of_all([k for r, k in zip(mine, kept) if r["objects"] > 1]),
            "success_strict": mean_of_all(strict)}


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """summary.csv (one row per run) and summary.json (settings, summary, timings) beside the
    sweep's results.jsonl and results.csv (one row per edit and run), both or neither."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.summary[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.summary)
    payload = {"settings": asdict(report.settings), "seconds": report.seconds,
               "default_seconds": report.default_seconds, "summary": report.summary}
    csv_path, json_path = out_dir / REPORT_FILES[0], out_dir / REPORT_FILES[1]
    write_together({csv_path: buffer.getvalue(), json_path: json.dumps(payload, indent=1) + "\n"})
    return csv_path, json_path


def prepare_output(out_dir: str | Path, settings: EvalSettings, model: str | None, overwrite: bool) -> Path:
    """Check the results folder before any work: it must be a writable folder (or creatable), and
    either new, empty, or holding this same evaluation (which then resumes). A folder holding
    anything else is refused unless `overwrite`, which removes only the evaluation's own files."""
    out = user_path(out_dir, OutputFileError)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputFileError(f"--out {out} is a file, not a folder; choose a folder for the results.")
    existing = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFileError(f"cannot write the results in {out}: {existing} is not writable; choose another --out.")
    ours = TABLE_FILES + REPORT_FILES
    lock = FolderLock(out).path.name   # alone, left by an evaluation killed before it wrote anything
    if out.is_dir() and any(p.name != lock for p in out.iterdir()) and not _same_evaluation(out, settings, model):
        if not overwrite:
            raise OutputFileError(f"{out} already holds other files or another evaluation; pass --overwrite to "
                                  "replace the evaluation's files there, or choose another --out.")
        for name in ours:
            if (out / name).is_file():
                (out / name).unlink()
    return out   # made by the sweep once the model has loaded: a model that fails leaves no empty folder


def _same_evaluation(out: Path, settings: EvalSettings, model: str | None) -> bool:
    if not (out / CONFIG_NAME).is_file():
        return False
    stored = read_json(out / CONFIG_NAME, "sweep config")
    wanted = SweepConfig.parse(sweep_config(settings, model)).as_dict()
    return isinstance(stored, dict) and all(json.dumps(stored.get(k), sort_keys=True, default=str)
                                            == json.dumps(wanted[k], sort_keys=True, default=str)
                                            for k in ("model", "items", "grid", "metrics"))


# ------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    parser.add_argument("benchmark", choices=["shapes"], help="the benchmark to run (the synthetic shapes world)")
    parser.add_argument("--model", default=None, help="model folder / hub id (default: the embedded model)")
    parser.add_argument("--count", type=int, default=EvalSettings.count, help="held-out edits (default 50)")
    parser.add_argument("--out", default="eval-shapes", help="folder of the results (a sweep folder: an "
                        "interrupted evaluation with the same settings resumes there)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of another evaluation (or "
                        "write among other files) in --out")
    group = parser.add_argument_group("settings of the default run (the tables vary r and the threshold around it)")
    for name in ("num_inference_steps", "strength", "guidance_scale", "mask_samples", "mask_noise_strength",
                 "threshold", "seed"):
        add_argument(group, name)
    parser.add_argument("--no-tables", action="store_true", help="only the default run and the ablations")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from diffedit.pipeline import DiffEditPipeline

    settings = EvalSettings(count=args.count, num_inference_steps=args.num_inference_steps, strength=args.strength,
                            guidance_scale=args.guidance_scale, num_mask_samples=args.mask_samples,
                            mask_noise_strength=args.mask_noise_strength, threshold=args.threshold, seed=args.seed)
    if args.no_tables:
        settings = replace(settings, strengths=(), thresholds=())
    if args.count < 1:
        raise ParameterError(f"--count must be at least 1 (the number of held-out edits), got {args.count}.")
    SweepConfig.parse(sweep_config(settings))   # every setting checked before the model loads
    prepare_output(args.out, settings, args.model, args.overwrite)
    pipe = DiffEditPipeline.from_pretrained(args.model)
    report = evaluate(pipe, settings, args.out, bar=not args.quiet, model=args.model)
    print(report.table())
    print(f"{len(report.rows) // max(len(report.summary), 1)} edits (others: over the "
          f"{report.summary[0]['edits_with_others']} whose scene has other objects), "
          f"{report.seconds:.1f} s of compute, {report.default_seconds:.1f} s for the default DiffEdit runs")
    if any("others_kept" not in r for r in report.rows):
        print(f"some rows in {args.out} predate the others_kept measure (others and strict are nan); "
              "run the evaluation into a new --out to measure them.")
    csv_path, json_path = write_report(report, args.out)
    print(f"wrote {csv_path} and {json_path} (per edit: {Path(args.out) / 'results.csv'})")
    return 0
