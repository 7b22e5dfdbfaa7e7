"""The cost of running a sweep as many processes, on this machine (README, "Running on many GPUs or
a cluster"): what each process pays before its first run, and what the merge costs.

    .venv/bin/python scripts/measure_sharding.py [--repeats 3]

1. start-up: `python -m diffedit sweep CONFIG --shard K/N` on a shard that is already done (the
   interpreter, torch, diffedit, the plan and the lock; no model is loaded when nothing is left);
2. the embedded model's load (each process loads its own copy);
3. torchrun with 2 CPU processes on a finished sweep (the agent, two start-ups, rank 0's merge);
4. the merge of a paper-scale table: 1,092 items x 30 settings = 32,760 rows over 8 shards,
   synthetic rows of the real width (about 40 columns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"items": {"benchmark": "shapes", "count": 2}, "save_images": False,
          "grid": {"num_inference_steps": 4, "mask_samples": 2, "guidance_scale": 1.0, "strength": 0.5}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def timed(command: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def synthetic_merge(folder: Path, items: int = 1092, shards: int = 8) -> float:
    from diffedit.research.merge import SHARDS, mark_done
    from diffedit.research.plan import Item, SweepConfig, plan_digest, plan_runs, runs_per_item
    from diffedit.research.shards import Shard, assign
    from diffedit.research.table import CONFIG_NAME, ITEMS_NAME, write_rows
    cfg = SweepConfig.parse({"items": {"folder": "imagenet"}, "grid": {
        "strength": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "ablation": ["none", "no_mask", "no_encode", "sdedit"],
        "threshold": [0.5]}})
    cfg = SweepConfig.parse({**cfg.as_dict(), "grid": [cfg.grid, {**cfg.grid, "ablation": ["none"],
                                                                    "threshold": [0.3, 0.4, 0.6, 0.7, 0.8, 0.9]}]})
    ids = [f"{i:04d}-image" for i in range(items)]
    runs = plan_runs(cfg, [Item(i, None, "", "") for i in ids])
    owner = assign(runs_per_item(runs, items), shards)
    digest = plan_digest(cfg, runs)
    metrics = {name: 0.123456789 for name in ("bg_psnr_gt", "bg_ssim_gt", "bg_psnr_mask", "bg_ssim_mask", "mask_iou",
                                              "mask_area", "gt_mask_area", "clip_score", "lpips")}
    timing = {"time_mask_s": 1.5, "time_inversion_s": 2.5, "time_edit_s": 3.5, "time_metrics_s": 0.1,
              "cache_mask": True, "cache_inversion": True, "cache_edit": False}
    for k in range(shards):
        shard = Shard(k, shards)
        part = folder / SHARDS / shard.name
        part.mkdir(parents=True)
        rows = [{"key": r.key, "item": r.item_id, **r.s, "mask_timestep": 501, "unet_samples": 140, **metrics,
                 "image": f"images/{r.item_id}/0123456789abcdef.png", "mask_file": "", **timing}
                for r in runs if owner[r.item] == k]
        write_rows(part, rows)
        (part / CONFIG_NAME).write_text(json.dumps(cfg.as_dict()))
        (part / ITEMS_NAME).write_text(json.dumps([{"id": i} for n, i in enumerate(ids) if owner[n] == k]))
        mark_done(part, shard, digest, ids, len(rows))
    from diffedit.research.merge import merge_shards
    result = merge_shards(folder)
    assert len(result.rows) == len(runs)
    return result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "config.json"
        config.write_text(json.dumps(CONFIG))
        sweep = [sys.executable, "-m", "diffedit", "sweep", str(config), "--quiet"]
        out = tmp / "sharded"
        for k in range(2):
            timed(sweep + ["--out", str(out), "--shard", f"{k}/2"])
        startup = [timed(sweep + ["--out", str(out), "--shard", "1/2"]) for _ in range(repeats)]
        load = [timed([sys.executable, "-c", "from diffedit import DiffEditPipeline; "
                       "DiffEditPipeline.from_pretrained()"]) for _ in range(repeats)]
        imports = [timed([sys.executable, "-c", "import diffedit.research.sweep"]) for _ in range(repeats)]
        torchrun = [timed([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                           "-m", "diffedit", "sweep", str(config), "--out", str(out), "--quiet"])
                    for _ in range(repeats)]
        merges = []
        for n in range(repeats):
            merges.append(synthetic_merge(tmp / f"merge{n}"))
    print(f"start-up of a shard process with nothing left to run: {statistics.median(startup):.2f} s "
          f"(python + import of diffedit and torch alone: {statistics.median(imports):.2f} s)")
    print(f"process that imports diffedit and loads the embedded model: {statistics.median(load):.2f} s")
    print(f"torchrun --nproc_per_node=2 on a finished sweep (agent, 2 start-ups, merge): "
          f"{statistics.median(torchrun):.2f} s")
    print(f"merge of 32,760 rows from 8 shards: {statistics.median(merges):.2f} s "
          f"(min {min(merges):.2f}, max {max(merges):.2f})")


if __name__ == "__main__":
    main()
