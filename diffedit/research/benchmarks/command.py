"""`diffedit bench`: one of the paper's benchmarks, every method over a grid of r, on the sweep
engine (research/sweep.py): the same rows, caches (one mask and one inversion per item serve
every r), resuming and sharding as `diffedit sweep`.

    diffedit bench imagenet  --data IMAGENET_VAL --model ID --out DIR [--split test|dev] [--template '{}']
    diffedit bench pie-bench --data PIE_BENCH    --model ID --out DIR [--no-border-quirk]
    diffedit bench pairs FILE.csv|FILE.jsonl     --model ID --out DIR
      common: [--limit N [--subset-seed S]] [--strengths 0.2 0.4 ...] [--methods diffedit sdedit ...]
              [--steps 50 --mask-samples 10 --threshold 0.5 --guidance 7.5 --seed S] [--resolution PX]
              [--shard K/N] (or torchrun / a Slurm array, as `diffedit sweep`)
              [--submit N [--slurm partition=gpu ...]]   N shards through submitit, merged, summarised
    diffedit bench report DIR [--pair X Y ...]   the trade-off figures and report.md (research/report.py)
    diffedit bench score DIR [--metrics ...]     the library metrics of a finished folder (research/scores/)
    diffedit bench stats IMAGENET_TRAIN --out STATS.safetensors   reference statistics for FID/SFID/CSFID
      score and stats: [--device cpu|cuda|cuda:N]   where their metric networks run (default cpu)

Methods (the paper's curves): diffedit; diffedit-no-encoding (the mask, with noised latents
instead of DDIM-encoded ones); sdedit (no mask, no encoding); encode-decode (DDIM encoding,
no mask); copy (output = input, no model call: the anchor point). Each model method runs at
every r of --strengths; the other settings are fixed (the paper's defaults unless given).

The benchmark's reader spec (benchmark, data, split, template, border quirk, limit, subset
seed) and the digest of the items it gave (plan.items_digest: prompts, picture and mask bytes)
are the sweep config's "items", so they are recorded in OUT/sweep.json and a folder never mixes
two specs, nor two versions of the benchmark's files. OUT also gets images/ITEM/ (the input, the
ground-truth mask, one edited PNG per distinct edit), masks/ITEM/ (DiffEdit's soft maps) and,
once every row is there, summary.py's files. The library metrics (LPIPS, L1, CLIPScore, FID,
SFID/CSFID, DeiT accuracy) are computed afterwards from the saved pictures by `diffedit bench
score DIR`, in an environment with the `eval` extra (research/scores/command.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import user_path
from diffedit.io.saving import save_image
from diffedit.research.benchmarks import NAMES, read_benchmark
from diffedit.research.benchmarks.summary import METHODS, write_summary
from diffedit.research.command import finish_shard
from diffedit.research.plan import SweepConfig, items_digest
from diffedit.research.report import write_report
from diffedit.research.scores.command import add_score_arguments
from diffedit.research.shards import Shard
from diffedit.research.sweep import run_sweep
from diffedit.research.table import CSV_NAME, RESULTS, read_json, read_rows
from diffedit.settings import CURVE_STRENGTHS, add_argument


def add_arguments(parser) -> None:
    """Arguments of `diffedit bench BENCHMARK [FILE]`."""
    parser.add_argument("benchmark", choices=(*NAMES, "report", "score", "stats"), help="imagenet (FlexIT's class "
                        "edits), pie-bench, or pairs (a CSV / JSONL of image, source, target[, mask] rows); or "
                        "`report DIR` to draw a finished bench folder's trade-off figures and write its report.md; "
                        "`score DIR` for its library metrics; `stats ROOT --out FILE` for FID's reference statistics")
    parser.add_argument("file", nargs="?", help="the pairs file (for `pairs`; or give it with --data); for "
                        "`report` and `score`, the bench folder; for `stats`, the ImageNet train folder")
    parser.add_argument("--pair", nargs=2, action="append", default=None, metavar=("X", "Y"), help="report: draw "
                        "metric Y against metric X (repeatable; default: the paper's LPIPS against CLIPScore, CSFID "
                        "and FID when measured, else background PSNR against success or mask IoU)")
    parser.add_argument("--data", default=None, help="imagenet: the ImageNet validation folder; pie-bench: the "
                        "folder with mapping_file.json and annotation_images/; pairs: the pairs file")
    parser.add_argument("--model", default=None, help="model folder / file / hub id (default: the embedded model)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/BENCHMARK); an interrupted "
                        "run with the same settings resumes there")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="run N items drawn at random "
                        "(seeded by --subset-seed) instead of all")
    parser.add_argument("--subset-seed", type=int, default=0, metavar="S", help="which items --limit draws "
                        "(default 0)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to run (default all: {', '.join(METHODS)})")
    parser.add_argument("--strengths", nargs="+", type=float, default=list(CURVE_STRENGTHS), metavar="R",
                        help=f"the encoding ratios r of the curves (default {' '.join(map(str, CURVE_STRENGTHS))})")
    group = parser.add_argument_group("fixed settings of every run")
    for name in ("num_inference_steps", "guidance_scale", "mask_samples", "mask_noise_strength", "threshold",
                 "seed"):
        add_argument(group, name)
    group.add_argument("--resolution", type=int, default=None, metavar="PX", help="working size's longest side, "
                       "a multiple of 8 (default: the model's own size)")
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu); for `score` and "
                       "`stats`, where the metric networks run")
    group.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    protocol = parser.add_argument_group("protocol options")
    protocol.add_argument("--split", default="test", choices=["test", "dev"], help="imagenet: FlexIT's split "
                          "(1,092 edits each; default test)")
    protocol.add_argument("--template", default="{}", help="imagenet: the prompt made of a class name, {} is the "
                           "name (default: the bare name, as FlexIT)")
    protocol.add_argument("--ground-truth", default=None, metavar="FILE", help="imagenet, flat layout: the "
                          "validation ground truth (LOC_val_solution.csv or one wnid per line)")
    protocol.add_argument("--no-border-quirk", action="store_true", help="pie-bench: decode the masks as "
                          "annotated, without the benchmark's 1-pixel border set to 1")
    parser.add_argument("--shard", default=None, metavar="K/N", help="run only shard K of N (from 0), as "
                        "`diffedit sweep --shard`")
    parser.add_argument("--submit", type=int, default=None, metavar="N", help="submit the model methods as N "
                        "shards through submitit (a Slurm job array; local processes without Slurm), wait, merge and "
                        "summarise, as `diffedit sweep --submit` (needs pip install 'diffedit-sd[slurm]')")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="a Slurm option of "
                        "--submit, e.g. partition=gpu, gpus_per_node=1, time=600 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_score_arguments(parser)


def reader_spec(args) -> dict:
    """The reader's spec from the command line (only the options of the chosen benchmark)."""
    data = args.data or args.file
    if args.file and args.benchmark != "pairs":
        raise ParameterError(f"`diffedit bench {args.benchmark}` takes its folder with --data, not as an argument.")
    if args.file and args.data:
        raise ParameterError("give the pairs file once: `diffedit bench pairs FILE` or --data FILE.")
    if not data:
        what = "FILE (a CSV or JSONL)" if args.benchmark == "pairs" else "--data DIR"
        raise ParameterError(f"`diffedit bench {args.benchmark}` needs {what}: the benchmark's files on this machine.")
    spec = {"benchmark": args.benchmark, "data": str(user_path(data, ParameterError).resolve())}
    if args.benchmark == "imagenet":
        spec.update(split=args.split, template=args.template, ground_truth=args.ground_truth)
    if args.benchmark == "pie-bench":
        spec["border_quirk"] = not args.no_border_quirk
    if args.limit is not None:
        spec.update(limit=args.limit, subset_seed=args.subset_seed)
    return spec


def sweep_config(args, spec: dict) -> dict | None:
    """The sweep of the model methods (None when only the copy baseline is asked for)."""
    ablations = [METHODS[m] for m in dict.fromkeys(args.methods) if METHODS[m]]
    if not ablations:
        return None
    grid = {"num_inference_steps": args.num_inference_steps, "seed": args.seed, "mask_samples": args.mask_samples,
            "mask_noise_strength": args.mask_noise_strength, "threshold": args.threshold,
            "strength": list(dict.fromkeys(args.strengths)), "guidance_scale": args.guidance_scale,
            "ablation": ablations}
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "resolution": args.resolution,
            "items": spec, "grid": grid, "save_images": True}


def run(args) -> int:
    """Read the benchmark, run (or resume) its sweep, then write the copy baseline and the summary
    once the table is complete (in this process, or in the one that merges the shards).
    `diffedit bench report DIR` draws a finished folder's figures and writes its report.md."""
    if args.benchmark == "report":
        return run_report(args)
    if args.benchmark in ("score", "stats"):
        return run_scores(args)
    if args.pair:
        raise ParameterError("--pair is an option of `diffedit bench report DIR`.")
    spec = reader_spec(args)
    config = sweep_config(args, spec)
    if args.submit is not None and args.shard:
        raise ParameterError("--submit and --shard exclude each other: --submit N makes the N shards itself.")
    if args.submit is not None and config is None:
        raise ParameterError("--submit runs the model methods as a job array; the copy baseline alone needs none.")
    if args.submit is not None:
        from diffedit.research.submit import parse_options, submit_sweep
        options = parse_options(args.slurm)
    if config is not None:
        SweepConfig.parse(config)   # every setting checked before any image is read
    out = user_path(args.out, OutputFileError) if args.out else Path("bench") / args.benchmark
    stored = stored_spec(out)
    if stored is not None and {k: v for k, v in stored.items() if k != "digest"} != spec:
        raise OutputFileError(f"{out} holds the results of another benchmark spec (see {out / 'benchmark.json'}); "
                              "choose another --out.")
    bench = read_benchmark(spec)
    spec = {**spec, "digest": items_digest(bench.items)}   # the sweep's identity: what the items are now
    if stored is not None and stored.get("digest") != spec["digest"]:
        raise OutputFileError(f"the benchmark's prompts, pictures or masks changed since {out} was written; choose "
                              "another --out.")
    if config is not None:
        config["items"] = spec
    rows: list[dict] = []
    if config is not None and args.submit is not None:
        merged = submit_sweep(config, out, args.submit, run_bench_shard, options=options, items=len(bench.items))
        rows = read_rows(out)
        print(f"merged {merged.shards} shards: {len(rows)} rows in {out / RESULTS} and {out / CSV_NAME}")
    elif config is not None:
        shard = Shard.resolve(args.shard)
        result = run_sweep(config, out, bar=not args.quiet, shard=shard, items=bench.items)
        if shard.count > 1 and finish_shard(out, shard, result) is None:
            return 0
        rows = read_rows(out)
        print(f"{len(rows)} rows ({result.ran} run now, {result.skipped} already done) in {out / RESULTS} and "
              f"{out / CSV_NAME}")
    for item in bench.items:   # the copy baseline's pictures; the sweep wrote them already when it ran
        path = out / "images" / item.id / "input.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(item.image, path, overwrite=True)
        if item.gt_mask is not None and not (path.parent / "gt_mask.png").is_file():   # for `bench score`
            save_image(Image.fromarray(item.gt_mask.astype(np.uint8) * 255, "L"), path.parent / "gt_mask.png",
                       overwrite=True)
    written = write_summary(out, bench, spec, list(dict.fromkeys(args.methods)), rows)
    print(f"{len(bench.items)} items of {bench.name}; wrote {', '.join(str(p) for p in written)}")
    return 0


def stored_spec(out: Path) -> dict | None:
    """The reader spec of the results in OUT (benchmark.json, written once the table is complete)."""
    listing = out / "benchmark.json"
    if not listing.is_file():
        return None
    stored = read_json(listing, "benchmark listing")
    spec = stored.get("spec") if isinstance(stored, dict) else None
    return spec if isinstance(spec, dict) else {}


def run_bench_shard(config: dict, out: str, index: int, count: int, trust_config_code: bool) -> int:
    """One task of `diffedit bench --submit N`: shard `index` of `count`, the benchmark read again
    from the config's reader spec in the job (returns its row count)."""
    bench = read_benchmark(config["items"])
    if items_digest(bench.items) != config["items"].get("digest"):
        raise ParameterError(f"the benchmark's prompts, pictures or masks changed since the shards of {out} were "
                             "submitted; submit them again.")
    result = run_sweep(config, out, bar=False, shard=Shard(index, count, "submitit"), items=bench.items)
    return len(result.rows)


def run_report(args) -> int:
    """`diffedit bench report DIR [--pair X Y ...]`: figures and report.md in DIR."""
    if not args.file or args.data:
        raise ParameterError("`diffedit bench report` needs the bench folder: diffedit bench report DIR.")
    written = write_report(args.file, [tuple(p) for p in args.pair] if args.pair else None)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def run_scores(args) -> int:
    """`diffedit bench score DIR ...` and `diffedit bench stats ROOT --out FILE` (the eval extra)."""
    from diffedit.research.scores import command as scores
    if not args.file or args.data:
        what = "the bench folder: diffedit bench score DIR" if args.benchmark == "score" else \
            "the ImageNet train folder: diffedit bench stats ROOT --out FILE"
        raise ParameterError(f"`diffedit bench {args.benchmark}` needs {what}.")
    if args.benchmark == "stats" and not args.out:
        raise ParameterError("`diffedit bench stats` needs --out FILE.safetensors for the statistics.")
    scores.check_extra()
    if args.benchmark == "stats":
        path = scores.compute_stats(args.file, args.out, args.metric_weights, args.per_class, bar=not args.quiet,
                                    device=args.device)
        print(f"wrote {path}")
        return 0
    written = scores.score_folder(args.file, args.metrics, args.metric_weights, args.lpips_net, args.clip_model,
                                  args.stats, device=args.device)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
