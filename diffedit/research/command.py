"""`diffedit sweep`: run or resume a sweep (or this process's shard of it), merge shards, or
submit the shards as a job array.

    diffedit sweep CONFIG [--out DIR]                       one process, the whole sweep
    torchrun --nproc_per_node=8 -m diffedit sweep CONFIG --out DIR
                                                            one shard per process; rank 0 merges
    diffedit sweep CONFIG --out DIR --shard K/N             shard K of N (any scheduler; a Slurm
                                                            array task finds K/N by itself)
    diffedit sweep merge DIR                                one table from the N shards
    diffedit sweep CONFIG --out DIR --submit N [--slurm partition=gpu ...]
                                                            a job array through submitit, merged
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffedit.errors import ParameterError
from diffedit.research.merge import all_done, merge_shards, shard_folder, wait_and_merge
from diffedit.research.plan import SweepConfig
from diffedit.research.shards import FolderLockedError, Shard
from diffedit.research.sweep import run_sweep
from diffedit.research.table import CSV_NAME, RESULTS


def add_arguments(parser) -> None:
    """Arguments of `diffedit sweep` (and of `diffedit sweep merge DIR`)."""
    parser.add_argument("config", help="sweep config (JSON): model, items, grid (see diffedit/research/sweep.py); "
                        "or `merge DIR` to merge the shards of a sweep run by many processes")
    parser.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="output folder (default: sweeps/<config name>); "
                        "an existing sweep there is resumed")
    parser.add_argument("--device", default=None, help="override the config's device (cpu, cuda)")
    parser.add_argument("--dtype", default=None, help="override the config's dtype (fp32, bf16, fp16)")
    parser.add_argument("--shard", default=None, metavar="K/N", help="run only shard K of N (from 0) into "
                        "OUT/shards/K-of-N; overrides torchrun's RANK/WORLD_SIZE and a Slurm array's task id")
    parser.add_argument("--trust-config-code", action="store_true", help="allow the config's \"metrics\" to "
                        "import and run Python code (module:function factories); refused without this flag")
    parser.add_argument("--submit", type=int, default=None, metavar="N", help="submit the sweep as N shards "
                        "through submitit (a Slurm job array; local processes without Slurm), wait, merge "
                        "(needs pip install 'diffedit-sd[slurm]')")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="a Slurm option of "
                        "--submit, e.g. partition=gpu, gpus_per_node=1, time=600 (repeatable)")
    parser.add_argument("--figures", action="store_true", help="also draw an image grid and a trade-off curve "
                        "(needs matplotlib: pip install 'diffedit-sd[plots]')")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """`diffedit sweep`: run or resume a sweep (or this process's shard of it); prints where the
    table is. `diffedit sweep merge DIR` merges the shards in DIR."""
    if args.config == "merge" and args.folder:
        merged = merge_shards(args.folder)
        print(f"merged {merged.shards} shards: {len(merged.rows)} rows in {merged.out_dir / RESULTS} and "
              f"{merged.out_dir / CSV_NAME} ({merged.seconds:.2f} s)")
        return _figures(args, merged.out_dir)
    if args.config == "merge" and not Path("merge").is_file():
        raise ParameterError("`diffedit sweep merge` needs the sweep folder: diffedit sweep merge DIR.")
    if args.folder:
        raise ParameterError(f"unexpected argument {args.folder!r}; write `diffedit sweep CONFIG [--out DIR]` or "
                             "`diffedit sweep merge DIR`.")
    cfg = SweepConfig.parse(args.config)
    if args.device:
        cfg.device = args.device
    if args.dtype:
        cfg.dtype = args.dtype
    out = Path(args.out) if args.out else Path("sweeps") / Path(args.config).stem
    if args.submit is not None:
        from diffedit.research.submit import parse_options, submit_sweep
        merged = submit_sweep(cfg.as_dict(), out, args.submit, run_shard, args.trust_config_code,
                              parse_options(args.slurm))
        print(f"merged {merged.shards} shards: {len(merged.rows)} rows in {out / RESULTS} and {out / CSV_NAME}")
        return _figures(args, out)
    shard = Shard.resolve(args.shard)
    result = run_sweep(cfg, out, bar=not args.quiet, shard=shard, trust_config_code=args.trust_config_code)
    if shard.count > 1:
        merged = finish_shard(out, shard, result)
        return 0 if merged is None else _figures(args, out)
    print(f"{len(result.rows)} rows ({result.ran} run now, {result.skipped} already done) in {out / RESULTS} "
          f"and {out / CSV_NAME}")
    return _figures(args, out)


def finish_shard(out: Path, shard: Shard, result):
    """After this process's shard K of N (N > 1) of the sweep in `out`: the merged table
    (merge.MergeResult) when this process merges it -- torchrun's rank 0 waits for the others,
    otherwise the last shard to finish merges -- else None. Says what happened on stdout."""
    print(f"shard {shard.index}/{shard.count}: {len(result.rows)} rows ({result.ran} run now, {result.skipped} "
          f"already done) in {shard_folder(out, shard) / RESULTS}")
    if shard.torchrun and shard.index == 0:
        merged = wait_and_merge(out, shard.count, result.plan)
    elif all_done(out, shard.count, result.plan) and not shard.torchrun:
        try:   # the last shard to finish merges; two finishing at once: one merges, the other says so
            merged = merge_shards(out)
        except FolderLockedError:
            print(f"another shard is merging {out}")
            return None
    else:
        return None
    print(f"merged {shard.count} shards: {len(merged.rows)} rows in {out / RESULTS} and {out / CSV_NAME}")
    return merged


def _figures(args, out: Path) -> int:
    if args.figures:
        from diffedit.research.figures import sweep_figures
        for path in sweep_figures(out):
            print(f"figure: {path}")
    return 0


def run_shard(config: dict, out: str, index: int, count: int, trust_config_code: bool) -> int:
    """One task of a submitted array: shard `index` of `count` (returns its row count)."""
    result = run_sweep(config, out, bar=False, shard=Shard(index, count, "submitit"),
                       trust_config_code=trust_config_code)
    return len(result.rows)
