"""Running one job (a sweep, a benchmark) as N independent processes: which share a process
takes, where it writes, and the lock that keeps two processes off one file. Nothing here knows
what a run is; a job hands over one weight per item (its number of runs) and gets back an
assignment.

    shard = Shard.resolve("1/3")      # --shard K/N, else torchrun's RANK / WORLD_SIZE, else a
                                      # Slurm array's SLURM_ARRAY_TASK_ID / _COUNT, else 0/1
    owner = assign([4, 4, 2, 6], 3)   # item -> shard: balanced by runs, the same every call
    with FolderLock(folder, "sweep"): # flock: released by the kernel when the process dies
        ...

The assignment rule (largest first, ties by item order, each item to the least loaded shard,
ties by shard number) depends only on the weights and N, never on the rank that computes it,
the time or the machine: every process computes the same table on its own, no collective needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffedit.errors import OutputFileError, ParameterError

SHARD_FORMAT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int          # K, from 0
    count: int          # N, the number of processes (the world size)
    source: str = "--shard"    # where it came from: --shard, torchrun, slurm, or single
    local_rank: int | None = None   # torchrun's LOCAL_RANK (the GPU of this process on its node)

    @property
    def name(self) -> str:
        """The shard's folder name, e.g. 1-of-3."""
        return f"{self.index}-of-{self.count}"

    @property
    def torchrun(self) -> bool:
        return self.source == "torchrun"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N` with 0 <= K < N."""
        match = SHARD_FORMAT.match(str(text))
        if not match:
            raise ParameterError(f"--shard must read K/N (this process's number from 0, then the number of "
                                 f"processes), e.g. 0/4; got {text!r}.")
        k, n = int(match.group(1)), int(match.group(2))
        if n < 1 or k >= n:
            raise ParameterError(f"--shard {text}: K must be between 0 and N - 1 and N at least 1.")
        return cls(k, n)

    @classmethod
    def resolve(cls, explicit: str | None = None, environ: dict | None = None) -> Shard:
        """This process's shard: an explicit `K/N` wins, then torchrun (RANK, WORLD_SIZE,
        LOCAL_RANK), then a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, or the
        array's MIN/MAX when COUNT is missing), else the whole job (0/1)."""
        env = os.environ if environ is None else environ
        if explicit:
            return cls.parse(explicit)
        if "RANK" in env and "WORLD_SIZE" in env:
            shard = cls.parse(f"{env['RANK']}/{env['WORLD_SIZE']}")
            local = env.get("LOCAL_RANK", "")
            return cls(shard.index, shard.count, "torchrun", int(local) if local.isdigit() else None)
        if "SLURM_ARRAY_TASK_ID" in env:
            task, low = env["SLURM_ARRAY_TASK_ID"], env.get("SLURM_ARRAY_TASK_MIN", "0")
            count = env.get("SLURM_ARRAY_TASK_COUNT")
            if count is None and "SLURM_ARRAY_TASK_MAX" in env:
                count = str(int(env["SLURM_ARRAY_TASK_MAX"]) - int(low) + 1)
            if count is None or not task.isdigit() or not low.isdigit():
                raise ParameterError("a Slurm array task needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT; "
                                     "submit with --array=0-(N-1) or pass --shard K/N.")
            shard = cls.parse(f"{int(task) - int(low)}/{count}")
            return cls(shard.index, shard.count, "slurm")
        return cls(0, 1, "single")

    def device(self, configured: str) -> str:
        """The device of this process: cuda:LOCAL_RANK under torchrun when the job asks for cuda
        (or for "auto" on a machine with CUDA), cuda:0 where each process sees one GPU
        (CUDA_VISIBLE_DEVICES set per rank); anything else as configured."""
        if self.local_rank is None or configured not in ("cuda", "auto"):
            return configured
        import torch
        if configured == "auto" and not torch.cuda.is_available():
            return "cpu"
        return "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{self.local_rank}"


def assign(weights: list[int], count: int) -> list[int]:
    """The shard of each item: items by decreasing weight (ties: item order) go one by one to the
    shard with the least weight so far (ties: the lowest shard number). Loads then differ by at
    most the largest weight; equal weights give item i to shard i mod N."""
    if count < 1:
        raise ParameterError(f"the number of shards must be at least 1, got {count}.")
    loads = [0] * count
    owner = [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        owner[item] = shard
        loads[shard] += weights[item]
    return owner


class FolderLockedError(OutputFileError):
    """Another live process holds the lock of a results folder."""


class FolderLock:
    """An exclusive flock on FOLDER/.NAME.lock, taken without waiting: a second process is refused
    with one sentence, and the lock goes away with the process that held it (killed or not), so a
    re-run is never blocked by a dead one. Where flock does not exist (Windows) it does nothing."""

    def __init__(self, folder: Path, name: str = "sweep"):
        self.path = Path(folder) / f".{name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:   # pragma: no cover - Windows
            return self
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputFileError(f"cannot create the lock file {self.path} ({e.strerror}); "
                                  "choose a writable --out.") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(self._fd)
            os.close(self._fd)
            self._fd = None
            raise FolderLockedError(f"another process{f' (pid {holder})' if holder else ''} is writing the results in "
                                  f"{self.path.parent}; wait for it to finish or choose another --out.") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing releases the flock
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
