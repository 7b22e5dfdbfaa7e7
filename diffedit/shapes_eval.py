"""`diffedit eval shapes`: DiffEdit on held-out scenes of the synthetic world, scored against
ground truth that no photograph has.

For each held-out edit (shapes_world.heldout_edits: colour and shape edits, alternating):
  - mask IoU       the predicted mask (pixel resolution) against the edited object's true pixels
                   (old | new object)
  - background PSNR  the edit against the input, over the pixels outside every object
  - success        shapes_check.check_edit: the edited object has the target colour and shape

Runs, all from one mask and one inversion per image (the inversion goes to the largest r and
serves every smaller r on the same grid; the mask's soft map serves every threshold):
  - "diffedit"          the default settings
  - the paper's trade-off: r in `strengths` (Fig. 4 of the paper) and the mask threshold
  - ablations at the default r: "no_mask" (encode-decode), "no_encode" (noised latents instead
    of DDIM-encoded ones, "DiffEdit w/o encoding"), "sdedit" (neither)
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_text
from .metrics import mask_iou, psnr
from .shapes_check import check_edit
from .shapes_world import Edit, heldout_edits


@dataclass(frozen=True)
class EvalSettings:
    count: int = 50                     # held-out edits (alternating colour / shape)
    strength: float = 0.8               # encoding ratio r of the default run
    num_inference_steps: int = 50       # DDIM grid
    guidance_scale: float = 7.5         # classifier-free guidance while decoding
    num_mask_samples: int = 10          # noise samples n of the mask
    mask_noise_strength: float = 0.5    # the mask's noise level
    threshold: float = 0.5              # mask threshold of the default run (paper normalisation)
    strengths: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)   # the r table
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # the threshold table
    ablations: bool = True              # also run no_mask, no_encode, sdedit
    batch_size: int = 10                # edits per pipeline batch
    seed: int = 0                       # generator seed (mask noises, no_encode noise)


@dataclass
class EvalReport:
    settings: EvalSettings
    rows: list[dict]                    # one per (edit, run)
    summary: list[dict]                 # one per run: means over edits
    seconds: float                      # wall time of the whole evaluation
    default_seconds: float              # wall time of the default runs alone (mask + inversion + one decode)

    def table(self) -> str:
        lines = [f"{'run':<22}{'r':>5}{'thr':>6}{'IoU':>7}{'bgPSNR':>8}{'success':>9}{'colour':>8}{'shape':>7}"]
        for s in self.summary:
            lines.append(f"{s['run']:<22}{s['strength']:>5.1f}{s['threshold']:>6.2f}{s['mask_iou']:>7.3f}"
                         f"{s['bg_psnr']:>8.2f}{s['success']:>9.2f}{s['colour_success']:>8.2f}{s['shape_success']:>7.2f}")
        return "\n".join(lines)


def _runs(s: EvalSettings) -> list[dict]:
    """Every decode of an image: name, strength, threshold, ablation switches."""
    runs = [dict(run="diffedit", strength=s.strength, threshold=s.threshold, use_mask=True, encode=True)]
    runs += [dict(run=f"r={r:g}", strength=r, threshold=s.threshold, use_mask=True, encode=True)
             for r in s.strengths if r != s.strength]
    runs += [dict(run=f"threshold={t:g}", strength=s.strength, threshold=t, use_mask=True, encode=True)
             for t in s.thresholds if t != s.threshold]
    if s.ablations:
        runs += [dict(run="no_mask", strength=s.strength, threshold=s.threshold, use_mask=False, encode=True),
                 dict(run="no_encode", strength=s.strength, threshold=s.threshold, use_mask=True, encode=False),
                 dict(run="sdedit", strength=s.strength, threshold=s.threshold, use_mask=False, encode=False)]
    return runs


def _pixel_masks(soft_images, threshold: float) -> list[np.ndarray]:
    return [np.asarray(img, dtype=np.float32) / 255.0 > threshold for img in soft_images]


def evaluate(pipe, settings: EvalSettings = EvalSettings(), progress=None) -> EvalReport:
    """Run every run of `_runs` on `settings.count` held-out edits."""
    from PIL import Image

    start = time.perf_counter()
    default_seconds = 0.0
    edits = heldout_edits(settings.count)
    runs = _runs(settings)
    r_max = max(run["strength"] for run in runs)
    rows: list[dict] = []
    for b in range(0, len(edits), settings.batch_size):
        batch = edits[b:b + settings.batch_size]
        images = [Image.fromarray(e.source_image) for e in batch]
        generator = torch.Generator().manual_seed(settings.seed + b)
        t0 = time.perf_counter()
        encoded = pipe.encode_image(images)
        mask = pipe.generate_mask(encoded, [e.source_caption for e in batch], [e.target_caption for e in batch],
                                  num_samples=settings.num_mask_samples, noise_strength=settings.mask_noise_strength,
                                  num_inference_steps=settings.num_inference_steps, threshold=settings.threshold,
                                  generator=generator)
        inversion = pipe.invert(encoded, strength=r_max, num_inference_steps=settings.num_inference_steps)
        default_seconds += time.perf_counter() - t0
        for run in runs:
            t1 = time.perf_counter()
            latent_mask = (mask.soft > run["threshold"]) if run["use_mask"] else None
            out = pipe.edit(inversion, latent_mask, [e.target_caption for e in batch], strength=run["strength"],
                            guidance_scale=settings.guidance_scale, use_mask=run["use_mask"], encode=run["encode"],
                            generator=torch.Generator().manual_seed(settings.seed + b + 1))
            if run["run"] == "diffedit":
                default_seconds += time.perf_counter() - t1
            pixel_masks = _pixel_masks(mask.soft_images, run["threshold"])
            for edit, edited, pmask in zip(batch, out.images, pixel_masks):
                rows.append(score(edit, edited, pmask, run))
        if progress is not None:
            progress(min(b + settings.batch_size, len(edits)), len(edits))
    summary = summarise(rows, runs)
    return EvalReport(settings, rows, summary, time.perf_counter() - start, default_seconds)


def score(edit: Edit, edited, pixel_mask: np.ndarray, run: dict) -> dict:
    """The three numbers of one edit."""
    check = check_edit(edited, edit)
    object_pixels = ~edit.background_mask
    return {"edit_seed": edit.seed, "kind": edit.kind, "source": edit.source_caption, "target": edit.target_caption,
            **run, "mask_iou": mask_iou(pixel_mask, edit.edit_mask), "mask_area": float(pixel_mask.mean()),
            "bg_psnr": psnr(edited, edit.source_image, object_pixels),
            "success": bool(check.success), "colour_ok": bool(check.colour_ok), "shape_ok": bool(check.shape_ok)}


def summarise(rows: list[dict], runs: list[dict]) -> list[dict]:
    summary = []
    for run in runs:
        mine = [r for r in rows if r["run"] == run["run"]]
        kinds = {k: [r for r in mine if r["kind"] == k] for k in ("colour", "shape")}
        summary.append({**run, "edits": len(mine),
                        "mask_iou": statistics.fmean(r["mask_iou"] for r in mine),
                        "bg_psnr": statistics.fmean(r["bg_psnr"] for r in mine),
                        "success": statistics.fmean(r["success"] for r in mine),
                        "colour_success": statistics.fmean(r["success"] for r in kinds["colour"]) if kinds["colour"] else float("nan"),
                        "shape_success": statistics.fmean(r["success"] for r in kinds["shape"]) if kinds["shape"] else float("nan")})
    return summary


def write_report(report: EvalReport, out_dir: str | Path, overwrite: bool = True) -> tuple[Path, Path]:
    """results.csv (one row per edit and run) and results.json (settings, summary, rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.rows[0]))
    writer.writeheader()
    writer.writerows(report.rows)
    csv_path = atomic_write_text(out_dir / "results.csv", buffer.getvalue(), overwrite=overwrite)
    payload = {"settings": asdict(report.settings), "seconds": report.seconds,
               "default_seconds": report.default_seconds, "summary": report.summary, "rows": report.rows}
    json_path = atomic_write_text(out_dir / "results.json", json.dumps(payload, indent=1) + "\n", overwrite=overwrite)
    return csv_path, json_path


# ------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    parser.add_argument("benchmark", choices=["shapes"], help="the benchmark to run (the synthetic shapes world)")
    parser.add_argument("--model", default=None, help="model folder / hub id (default: the embedded model)")
    parser.add_argument("--count", type=int, default=EvalSettings.count, help="held-out edits (default 50)")
    parser.add_argument("--out", default="eval-shapes", help="folder for results.csv and results.json")
    parser.add_argument("--steps", type=int, default=EvalSettings.num_inference_steps)
    parser.add_argument("--strength", type=float, default=EvalSettings.strength)
    parser.add_argument("--guidance", type=float, default=EvalSettings.guidance_scale)
    parser.add_argument("--mask-samples", type=int, default=EvalSettings.num_mask_samples)
    parser.add_argument("--threshold", type=float, default=EvalSettings.threshold)
    parser.add_argument("--no-tables", action="store_true", help="only the default run and the ablations")
    parser.add_argument("--seed", type=int, default=EvalSettings.seed)


def run(args) -> int:
    from .pipeline import DiffEditPipeline

    settings = EvalSettings(count=args.count, num_inference_steps=args.steps, strength=args.strength,
                            guidance_scale=args.guidance, num_mask_samples=args.mask_samples,
                            threshold=args.threshold, seed=args.seed)
    if args.no_tables:
        settings = replace(settings, strengths=(), thresholds=())
    pipe = DiffEditPipeline.from_pretrained(args.model)

    def progress(done: int, total: int) -> None:
        print(f"\r  edits {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = evaluate(pipe, settings, progress)
    print(report.table())
    print(f"{len(report.rows) // max(len(report.summary), 1)} edits, {report.seconds:.1f} s in all, "
          f"{report.default_seconds:.1f} s for the default DiffEdit runs")
    csv_path, json_path = write_report(report, args.out)
    print(f"wrote {csv_path} and {json_path}")
    return 0
