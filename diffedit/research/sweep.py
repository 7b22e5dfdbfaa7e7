"""Sweeps: DiffEdit over a grid of settings and a set of (image, source, target) items, one row
of settings, seeds, timings and metrics per run in results.jsonl (and results.csv).

    diffedit sweep CONFIG [--out DIR]        or        run_sweep(config, out_dir)

CONFIG (JSON; every key but "items" optional):

    {"model": null,                               # a model path / hub id; null: the embedded model
     "device": "cpu", "dtype": "fp32", "resolution": null,
     "items": {"benchmark": "shapes", "count": 8}  # held-out synthetic edits, with ground truth
           or {"folder": "DIR"},                   # DIR/manifest.json or .csv: image, source,
                                                   #   target, optional gt_mask and id
     "grid": {"strength": [0.5, 0.7, 0.9], "threshold": 0.5, ...},   # a list sweeps, a value fixes
     "metrics": {"lpips": {"factory": "my.module:make_lpips", "weights": "/path/lpips.pth"}},
     "save_images": true}

Axes and defaults: see AXES in plan.py (the config, items and run keys live there).
"ablation" is "none" (DiffEdit), "no_mask" (encode-decode),
"no_encode" (mask, noised latents instead of encoded ones) or "sdedit" (neither).

Work that does not change along an axis is done once:
  - the mask's noise predictions, per (item, mask timestep, n, seed): the threshold re-applies to
    the stored soft map, and the mask never depends on r, guidance, blend or the ablation;
  - the DDIM inversion, per (item, steps), to the largest r still to run: it serves every r;
  - the edit itself, for runs that differ only in axes their ablation ignores (a threshold with
    no mask, the seed of a deterministic run).
Every run is reproducible alone: the image of a row equals
pipe(image, source, target, strength=r, ..., generator=torch.Generator().manual_seed(seed)).

Outputs in the sweep folder: results.jsonl and results.csv (per run: the settings, item,
mask_timestep, unet_samples, the metrics of diffedit.research.metrics that are defined for it -- bg_psnr_gt,
bg_ssim_gt, gt_mask_area with a ground-truth mask; bg_psnr_mask, bg_ssim_mask, mask_area with a
predicted mask; mask_iou with both; success, colour_ok, shape_ok, others_kept on the shapes benchmark; user
metrics -- the image and mask_file paths, time_*_s and cache_*), sweep.json (the config),
items.json, images/ITEM/{input,gt_mask,DIGEST}.png and masks/ITEM/tT-nN-seedS.npz (soft,
difference, per_sample: what figures.py draws).

Resuming: rows whose key is in results.jsonl are skipped. Each row is appended as one complete
line; a torn last line (a crash mid-write) is dropped and redone. results.csv is rebuilt from the
JSONL whenever a sweep stops. Columns starting with time_ or cache_ depend on the order runs
happened in; every other column is a function of the settings alone. A finished sweep's rows are
in plan order (items, then grid points), each key once. One process writes a folder at a time
(a flock, shards.FolderLock); a second one is refused.

Many processes: with `shard` K/N each process runs the items shards.assign gives it (all the runs
of an item on one shard, so the caches above still serve) into SWEEP/shards/K-of-N/, and
merge.merge_shards makes the table one process would have written (research/merge.py). Seeds
come from the settings alone (the mask's and the no-encoding decode's generator are seeded with
the run's `seed`), never from the process, so the rows do not depend on N.

Safety: item ids are plain file names and manifest paths stay inside their folder (plan.py);
metric factories named by a config (code imports) need trust_config_code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from diffedit.checkpoints.loading import model_source
from diffedit.devices import PrecisionWarning, parse_device, parse_dtype
from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import atomic_write, atomic_write_text, user_path
from diffedit.io.saving import save_image
from diffedit.io.pictures import mask_to_pil
from diffedit.io.progress import progress_bar
from diffedit.research import metrics as M
from diffedit.research.merge import (
    canonical_order,
    check_layout,
    clear_done,
    mark_done,
    shard_folder,
)
from diffedit.research.plan import (
    Item,
    Run,
    SweepConfig,
    effective_settings,
    load_items,
    plan_digest,
    plan_runs,
    runs_per_item,
)
from diffedit.research.shards import FolderLock, Shard, assign
from diffedit.research.table import (
    ITEMS_NAME,
    RESULTS,
    append_row,
    check_config,
    check_table_files,
    read_rows,
    write_config,
    write_csv,
    write_rows,
)
from diffedit.results import Inversion
from diffedit.settings import ABLATIONS


def _digest(obj) -> str:
    """A short stable name for a JSON-able value (edit images are stored under it)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- the work

@dataclass
class _Mask:
    soft: torch.Tensor           # (1, h, w) normalised map
    timestep: int
    generator_state: torch.Tensor  # the generator after drawing the mask noise
    unet_samples: int
    seconds: float
    file: str                    # relative path of the saved maps (.npz), "" when not saved


@dataclass
class _ItemState:
    """What one item's runs share."""
    masks: dict = field(default_factory=dict)       # (t, n, seed) -> _Mask
    inversions: dict = field(default_factory=dict)  # steps -> (Inversion, seconds)
    edits: dict = field(default_factory=dict)       # effective-settings digest -> row fields
    r_max: dict = field(default_factory=dict)       # steps -> largest r to run with encoding


@dataclass
class SweepResult:
    out_dir: Path
    rows: list[dict]      # every row of results.jsonl, in file order
    ran: int              # runs done by this call
    skipped: int          # runs found finished already
    plan: str = ""        # the plan's digest (plan.plan_digest), the same for every shard of the sweep


def run_sweep(config, out_dir: str | os.PathLike, pipe=None, progress: Callable | None = None,
              bar: bool = True, shard: Shard | None = None, trust_config_code: bool = False,
              items: list[Item] | None = None) -> SweepResult:
    """Run every grid point of `config` not yet in `out_dir`/results.jsonl. `pipe` (a
    DiffEditPipeline) is loaded from the config when None; `progress(done, total, row)` is called
    after each row is written (raising from it stops the sweep, resumable). With `shard` K/N (N > 1)
    only the items assigned to shard K run, into `out_dir`/shards/K-of-N (research/merge.py).
    Metrics that import code named by the config need `trust_config_code`. `items` replaces the
    config's "items" reader (research/benchmarks reads its own; the spec stays the table's identity).
    The device, dtype, model path and shard count are checked before any file is written; a model
    that then fails to load leaves no sweep.json and removes the folders this call made."""
    cfg = SweepConfig.parse(config)
    check_trust(cfg, trust_config_code)
    shard = shard or Shard(0, 1, "single")
    if pipe is None:
        check_model_settings(cfg, shard)
    if items is None:
        items = load_items(cfg.items)
        cfg.identify(items)   # the digest of what was just read, not of a second reading
    check_shard_count(shard, len(items))
    runs = plan_runs(cfg, items)
    out = user_path(out_dir, OutputFileError)
    folder = shard_folder(out, shard) if shard.count > 1 else out
    if out.is_dir():
        check_layout(out, shard)
    read_rows(folder)   # a broken table is refused before anything is written
    owner = assign(runs_per_item(runs, len(items)), shard.count)
    runs = [r for r in runs if owner[r.item] == shard.index]
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFileError(f"cannot create the sweep folder {folder} ({e.strerror}); choose another --out.") from None
    check_table_files(folder)
    with FolderLock(folder):
        check_config(folder, cfg)
        with removed_on_failure(created, folder):   # a sweep that cannot start leaves no folder behind
            extra = M.registered_metrics()
            extra.update({n: M.load_metric(n, s["factory"], s["weights"]) for n, s in cfg.metrics.items()})
            finished = {r.get("key") for r in read_rows(folder)}
            todo = [r for r in runs if r.key not in finished]
            if pipe is None and todo:
                from diffedit.pipeline import DiffEditPipeline
                pipe = DiffEditPipeline.from_pretrained(cfg.model, device=shard.device(cfg.device), dtype=cfg.dtype)
        write_config(folder, cfg)
        clear_done(folder)
        read_rows(folder, repair=True)
        _write_items(out, folder, [items[i] for i in sorted({r.item for r in runs})], cfg.save_images)
        skipped = done = len(runs) - len(todo)
        meter = progress_bar(len(runs), "runs", initial=done, enabled=bar, description=f"sweep {shard.name}")
        try:
            for index, group in itertools.groupby(todo, key=lambda r: r.item):
                group = list(group)
                state = _ItemState()
                for r in group:
                    s = r.s
                    if ABLATIONS[s["ablation"]][0]:
                        steps = s["num_inference_steps"]
                        state.r_max[steps] = max(state.r_max.get(steps, 0.0), s["strength"])
                for r in group:
                    row = _execute(pipe, cfg, items[index], r, state, out, extra)
                    append_row(folder, row)
                    done += 1
                    meter.update(1)
                    if progress is not None:
                        progress(done, len(runs), row)
        finally:
            meter.close()
            if (folder / RESULTS).is_file() and shard.count == 1:
                write_csv(folder)
        rows = read_rows(folder)
        plan = plan_digest(cfg, plan_runs(cfg, items))
        if shard.count > 1:
            mark_done(folder, shard, plan, [it.id for it in items], len(rows))
        else:   # a single process is its own merge: the rows in plan order, as merge_shards writes them
            ordered = canonical_order(rows, [r.key for r in runs])
            if ordered != rows:
                write_rows(folder, ordered)
                write_csv(folder, ordered)
            rows = ordered
    return SweepResult(out, rows, done - skipped, skipped, plan)


def check_trust(cfg: SweepConfig, trust_config_code: bool) -> None:
    """A config names only built-in or registered metrics; a metric factory ("module:function")
    imports and runs code, so it needs the user's explicit --trust-config-code."""
    if cfg.metrics and not trust_config_code:
        raise ParameterError(f"the sweep config imports code for the metrics {', '.join(sorted(cfg.metrics))}; "
                             "pass --trust-config-code (trust_config_code=True) if you trust it.")


def check_model_settings(cfg: SweepConfig, shard: Shard) -> None:
    """Refuse, before anything is written, the device, dtype or model path that loading the
    pipeline would refuse (a hub id is checked for its spelling only)."""
    device = parse_device(shard.device(cfg.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)   # said when the model loads
        parse_dtype(cfg.dtype, device)
    if cfg.model is not None:   # None: the embedded model
        model_source(cfg.model)


def check_shard_count(shard: Shard, items: int) -> None:
    """A shard runs whole items, so a sweep splits into at most as many shards as it has items."""
    if shard.count > max(items, 1):
        raise ParameterError(f"the sweep has {items} item{'s' if items != 1 else ''}, so it splits into at most "
                             f"{items} shards (each runs whole items), not {shard.count} ({shard.source}); run at most "
                             f"{items} processes.")


@contextmanager
def removed_on_failure(created: Path | None, folder: Path):
    """If the block fails, remove the folders from `created` down to `folder` (made by this call),
    with the lock file, as long as nothing else was written in them."""
    try:
        yield
    except BaseException:
        if created is not None:
            with suppress(OSError):
                os.unlink(FolderLock(folder).path)
                for path in (folder, *folder.parents):
                    path.rmdir()
                    if path == created:
                        break
        raise


def _write_items(out: Path, folder: Path, items: list[Item], save_images: bool) -> None:
    """items.json in the table's folder; the input (and ground-truth) pictures under out/images/ITEM."""
    listing = []
    for item in items:
        image, truth = item.image, item.gt_mask   # each read once (an item may hold files, not pixels)
        entry = {"id": item.id, "source": item.source, "target": item.target, "size": list(image.size)}
        if save_images:
            item_folder = out / "images" / item.id
            item_folder.mkdir(parents=True, exist_ok=True)
            entry["input"] = save_image(image, item_folder / "input.png", overwrite=True).relative_to(out).as_posix()
            if truth is not None:
                entry["gt_mask"] = save_image(Image.fromarray(truth.astype(np.uint8) * 255, "L"),
                                              item_folder / "gt_mask.png", overwrite=True).relative_to(out).as_posix()
        listing.append(entry)
    atomic_write_text(folder / ITEMS_NAME, json.dumps(listing, indent=2) + "\n", overwrite=True)


def _execute(pipe, cfg: SweepConfig, item: Item, run: Run, state: _ItemState, out: Path, extra: dict) -> dict:
    """One grid point: mask (cached), inversion (cached), edit, metrics -> a flat row."""
    s = run.s
    encode, use_mask = ABLATIONS[s["ablation"]]
    row: dict[str, Any] = {"key": run.key, "item": item.id, **s}
    effective = _digest({"item": item.id, **effective_settings(s)})
    if effective in state.edits:
        row.update(state.edits[effective])
        return {**row, "time_mask_s": 0.0, "time_inversion_s": 0.0, "time_edit_s": 0.0, "time_metrics_s": 0.0,
                "cache_mask": True if use_mask else None, "cache_inversion": True if encode else None,
                "cache_edit": True}
    image = item.image   # read once per run (an item may hold its file, not its pixels)
    encoded = pipe.encode_image(image, resolution=cfg.resolution)
    steps, r = s["num_inference_steps"], s["strength"]
    fields: dict[str, Any] = {}
    timing = {"time_mask_s": 0.0, "time_inversion_s": 0.0, "cache_mask": None, "cache_inversion": None}

    mask, latent_mask, pixel_mask, generator = None, None, None, None
    if use_mask:
        mask, fresh = _mask(pipe, item, s, encoded, state, out, cfg.save_images)
        timing.update(time_mask_s=mask.seconds if fresh else 0.0, cache_mask=not fresh)
        latent_mask = (mask.soft > s["threshold"]).float()
        pixel_mask = np.asarray(mask_to_pil(mask.soft[0], encoded.geometry[0], threshold=s["threshold"])) >= 128
        fields.update(mask_timestep=mask.timestep, mask_file=mask.file)
    if not encode:   # the decode noise continues the mask's stream, as one pipeline call would
        generator = torch.Generator().manual_seed(s["seed"])
        if mask is not None:
            generator.set_state(mask.generator_state)
        inversion = Inversion.unencoded(encoded, steps, r)
    else:
        inversion, fresh = _inversion(pipe, encoded, steps, state)
        timing.update(time_inversion_s=inversion[1] if fresh else 0.0, cache_inversion=not fresh)
        inversion = inversion[0]

    before = pipe.counters.unet_samples
    t0 = time.perf_counter()
    result = pipe.edit(inversion, latent_mask, item.target, strength=r, num_inference_steps=steps,
                       guidance_scale=s["guidance_scale"], blend=s["blend"], encode=encode, use_mask=use_mask,
                       generator=generator)
    timing["time_edit_s"] = time.perf_counter() - t0
    edited = result.images[0]
    inversion_samples = pipe.scheduler.num_steps(steps, r) if encode else 0
    edit_samples = pipe.counters.unet_samples - before
    fields["unet_samples"] = (mask.unet_samples if mask else 0) + inversion_samples + edit_samples

    t0 = time.perf_counter()
    target_image = Image.fromarray(item.edit.target_image) if item.edit is not None else None
    fields.update(M.edit_metrics(edited, image, item.gt_mask, pixel_mask, extra, item.source, item.target,
                                 target_image))
    if item.edit is not None:   # the shapes world: the edit checked against its ground truth
        from diffedit.shapes.check import check_edit, others_kept
        check = check_edit(edited, item.edit)
        fields.update(success=check.success, colour_ok=check.colour_ok, shape_ok=check.shape_ok,
                      others_kept=others_kept(edited, item.edit),
                      bg_psnr_scene=M.psnr(edited, image, ~item.edit.background_mask))
    timing["time_metrics_s"] = time.perf_counter() - t0
    if cfg.save_images:
        path = out / "images" / item.id / f"{effective}.png"
        fields["image"] = save_image(edited, path, overwrite=True).relative_to(out).as_posix()
    state.edits[effective] = fields
    return {**row, **fields, **timing, "cache_edit": False}


def _mask(pipe, item: Item, s: dict, encoded, state: _ItemState, out: Path, save: bool) -> tuple[_Mask, bool]:
    """The soft map of (mask timestep, n, seed), computed on first use. Returns (mask, computed now)."""
    t = pipe.scheduler.step_pairs(s["num_inference_steps"], s["mask_noise_strength"])[0][0]
    key = (int(t), s["mask_samples"], s["seed"])
    if key in state.masks:
        return state.masks[key], False
    generator = torch.Generator().manual_seed(s["seed"])
    before = pipe.counters.unet_samples
    t0 = time.perf_counter()
    result = pipe.generate_mask(encoded, item.source, item.target, num_samples=s["mask_samples"],
                                noise_strength=s["mask_noise_strength"], num_inference_steps=s["num_inference_steps"],
                                generator=generator)
    seconds = time.perf_counter() - t0
    relative = ""
    if save:
        path = out / "masks" / item.id / f"t{key[0]}-n{key[1]}-seed{key[2]}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(soft=result.soft[0].cpu().numpy(), difference=result.difference[0].cpu().numpy(),
                      timestep=np.int64(result.timestep))
        if result.per_sample is not None:   # kept up to pipeline.PER_SAMPLE_UP_TO samples (memory grows with n)
            arrays["per_sample"] = result.per_sample[0].cpu().numpy()
        atomic_write(path, lambda f: np.savez(f, **arrays), overwrite=True)
        relative = path.relative_to(out).as_posix()
    mask = _Mask(result.soft, result.timestep, generator.get_state(), pipe.counters.unet_samples - before,
                 seconds, relative)
    state.masks[key] = mask
    return mask, True


def _inversion(pipe, encoded, steps: int, state: _ItemState):
    """One DDIM inversion per step count, to the largest r of the item's runs.
    Returns ((inversion, seconds), computed now)."""
    if steps in state.inversions:
        return state.inversions[steps], False
    t0 = time.perf_counter()
    inversion = pipe.invert(encoded, strength=state.r_max[steps], num_inference_steps=steps)
    state.inversions[steps] = (inversion, time.perf_counter() - t0)
    return state.inversions[steps], True
