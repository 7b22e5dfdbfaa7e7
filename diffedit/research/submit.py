"""`diffedit sweep CONFIG --submit N`: the N shards of a sweep submitted as one job array through
submitit (the `diffedit-sd[slurm]` extra), then merged.

On a machine with Slurm (`sbatch` on the PATH) each shard is one task of a Slurm array, with the
`--slurm KEY=VALUE` options (partition=gpu, gpus_per_node=1, time=600, ...: submitit's slurm_*
parameters); elsewhere submitit's local executor runs the shards as N processes on this machine.
Each task runs `run_sweep(..., shard=K/N)` exactly as `--shard K/N` would, so a task that dies is
re-run by submitting again (finished shards are skipped, a half-done one resumes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffedit.errors import DiffEditError, ParameterError
from diffedit.research.merge import MergeResult, merge_shards
from diffedit.research.plan import SweepConfig, load_items
from diffedit.research.shards import Shard
from diffedit.research.sweep import check_shard_count, check_trust


class SubmitUnavailableError(DiffEditError, ImportError):
    """submitit, needed for --submit, is not installed."""


class SubmitFailedError(DiffEditError):
    """A task of a submitted array failed."""


def parse_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings as submitit's slurm_KEY parameters (integers when they are digits)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ParameterError(f"--slurm takes KEY=VALUE (e.g. partition=gpu), got {pair!r}.")
        options[f"slurm_{key}"] = int(value) if value.isdigit() else value
    return options


def submit_sweep(config: dict | str | Path, out: Path, count: int, task: Callable, trust_config_code: bool = False,
                 options: dict | None = None, cluster: str | None = None, items: int | None = None) -> MergeResult:
    """Submit the N shards, wait for all of them, merge. `task(config, out, K, N, trust)` runs one
    shard in the job (research/command.run_shard). A failed task raises its error here. `items`:
    the number of items when the caller has read them (a benchmark's), else read from the config."""
    if count < 1:
        raise ParameterError(f"--submit needs the number of shards, at least 1; got {count}.")
    parsed = SweepConfig.parse(config)
    check_trust(parsed, trust_config_code)   # refused here, not in every task
    check_shard_count(Shard(0, count, "--submit"), len(load_items(parsed.items)) if items is None else items)
    try:
        import submitit
    except ImportError:
        raise SubmitUnavailableError("--submit needs submitit, an optional extra; install it with "
                                     "pip install 'diffedit-sd[slurm]' (or run the shards with --shard K/N).") from None
    executor = submitit.AutoExecutor(folder=Path(out) / "submitit", cluster=cluster)
    parameters = {"timeout_min": 24 * 60, "name": "diffedit-sweep"}
    if executor.cluster == "slurm":
        parameters.update(slurm_array_parallelism=count, **(options or {}))
    executor.update_parameters(**parameters)
    config = config if isinstance(config, dict) else str(Path(config).resolve())
    jobs = executor.map_array(task, [config] * count, [str(Path(out).resolve())] * count, list(range(count)),
                              [count] * count, [trust_config_code] * count)
    print(f"submitted {count} shards ({executor.cluster}): {', '.join(job.job_id for job in jobs)}", flush=True)
    failed = []
    for k, job in enumerate(jobs):
        try:
            job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:   # with a traceback
            last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
            failed.append((k, job, last.strip()))
    if failed:
        k, job, reason = failed[0]
        raise SubmitFailedError(f"{len(failed)} of {count} shards failed, the first, shard {k}, with: {reason} "
                                f"(log: {job.paths.stderr}); fix it and submit again, finished shards are skipped.")
    return merge_shards(out)
