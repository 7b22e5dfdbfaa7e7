"""A sweep split over processes (diffedit/research/shards.py, merge.py): the assignment of items to
shards, torchrun with two CPU processes, --shard K/3 run one after another, a shard killed with
SIGKILL and run again, and the refusals of the merge. The processes run the embedded model
(weights/shapes-64) on 4 held-out edits with 4 steps and n = 2; every merged table is compared
with the table of one process running the whole config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffedit.cli import main
from diffedit.errors import OutputFileError, ParameterError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research.merge import DONE, merge_shards
from diffedit.research.shards import FolderLock, Shard, assign
from diffedit.research.sweep import run_sweep
from diffedit.research.table import RESULTS, read_rows
from reference_models import assert_same_table

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"items": {"benchmark": "shapes", "count": 4}, "save_images": True,
          "grid": {"num_inference_steps": 4, "mask_samples": 2, "strength": [0.5, 0.75, 1.0]}}
ROWS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "grid.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    """The table of one process running the whole config (the reference of every merge)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single")
        rows = run_sweep(CONFIG, out, pipe=DiffEditPipeline.from_pretrained(), bar=False).rows
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == ROWS
    return rows


def sweep_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffedit", "sweep", str(config), "--out", str(out), "--quiet", *extra]


# ---------------------------------------------------------------------- the assignment

@pytest.mark.parametrize("weights, count", [([6] * 10, 3), ([1, 9, 4, 4, 2, 7, 3], 3), ([5, 5], 4), ([3], 1)])
def test_assignment_is_balanced_and_stable(weights, count):
    owner = assign(weights, count)
    assert owner == assign(list(weights), count)                      # the same on every call / process
    assert all(0 <= s < count for s in owner)
    loads = [sum(w for w, s in zip(weights, owner) if s == k) for k in range(count)]
    if len(weights) >= count:
        assert max(loads) - min(loads) <= max(weights)                # within one item's runs
    if len(set(weights)) == 1:
        assert owner == [i % count for i in range(len(weights))]      # equal items: round robin


@pytest.mark.parametrize("explicit, env, expected", [
    ("2/3", {"RANK": "0", "WORLD_SIZE": "8"}, (2, 3, "--shard")),
    (None, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, "torchrun")),
    (None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4, "slurm")),
    (None, {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "12"}, (1, 3, "slurm")),
    (None, {}, (0, 1, "single")),
])
def test_where_a_process_finds_its_shard(explicit, env, expected):
    shard = Shard.resolve(explicit, env)
    assert (shard.index, shard.count, shard.source) == expected
    if shard.source == "torchrun":
        assert shard.device("cuda") == "cuda:1" and shard.device("cpu") == "cpu"


def test_a_rank_that_sees_one_gpu_takes_it(monkeypatch):
    """torchrun with CUDA_VISIBLE_DEVICES set per rank: each process sees its GPU as cuda:0."""
    import torch
    shard = Shard.resolve(None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert shard.device("cuda") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert shard.device("cuda") == "cuda:3"


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_is_one_sentence(text):
    with pytest.raises(ParameterError, match="K"):
        Shard.parse(text)


# ---------------------------------------------------------------------- processes

def test_torchrun_two_processes_merge_to_the_single_process_table(config_file, single, tmp_path):
    out = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "diffedit", "sweep",
                           str(config_file), "--out", str(out), "--quiet"], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged 2 shards: 12 rows" in done.stdout
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0-of-2", "1-of-2"]
    assert_same_table(read_rows(out), single)
    items = json.loads((out / "items.json").read_text())
    assert [i["id"] for i in items] == [f"shapes-{k:03d}" for k in range(4)]


def test_shards_run_one_after_another_then_merge(config_file, single, tmp_path, capsys):
    out = tmp_path / "sharded"
    for k in range(3):
        assert main(["sweep", str(config_file), "--out", str(out), "--quiet", "--shard", f"{k}/3"]) == 0
        if k < 2:
            assert not (out / RESULTS).exists()
    assert "merged 3 shards: 12 rows" in capsys.readouterr().out    # the last shard merges
    assert_same_table(read_rows(out), single)
    assert [len(read_rows(out / "shards" / f"{k}-of-3")) for k in range(3)] == [6, 3, 3]
    again = merge_shards(out)                                      # merging again changes nothing
    assert again.rows == read_rows(out)


def test_a_killed_shard_resumes_without_losing_or_duplicating_rows(config_file, single, tmp_path):
    out = tmp_path / "killed"
    pipe = DiffEditPipeline.from_pretrained()
    run_sweep(CONFIG, out, pipe=pipe, bar=False, shard=Shard(1, 2))
    other = {p: p.read_bytes() for p in (out / "shards" / "1-of-2").iterdir()}
    shard_rows = out / "shards" / "0-of-2" / RESULTS
    process = subprocess.Popen(sweep_command(config_file, out, "--shard", "0/2"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if shard_rows.is_file() and shard_rows.read_text().count("\n") >= 1:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the shard finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert 1 <= len(read_rows(shard_rows.parent)) < 6 and not (shard_rows.parent / DONE).exists()
    assert {p: p.read_bytes() for p in (out / "shards" / "1-of-2").iterdir()} == other   # the other shard intact
    with pytest.raises(OutputFileError, match="shard 0 of 2 has not finished"):
        merge_shards(out)                                         # a missing shard is named by number
    resumed = run_sweep(CONFIG, out, pipe=pipe, bar=False, shard=Shard(0, 2))   # the killed lock is gone
    assert resumed.skipped >= 1 and resumed.ran + resumed.skipped == 6
    assert_same_table(merge_shards(out).rows, single)


# ---------------------------------------------------------------------- refusals

def test_merge_and_world_size_refusals(tmp_path):
    out = tmp_path / "refusals"
    pipe = DiffEditPipeline.from_pretrained()
    small = {**CONFIG, "items": {"benchmark": "shapes", "count": 3},
             "grid": {"num_inference_steps": 4, "mask_samples": 2, "guidance_scale": 1.0, "strength": 0.5}}
    with pytest.raises(OutputFileError, match="does not exist"):
        merge_shards(out)
    out.mkdir()
    with pytest.raises(OutputFileError, match="holds no shards"):
        merge_shards(out)
    run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(1, 3))
    with pytest.raises(OutputFileError, match=r"shards 0, 2 of 3 have not finished"):
        merge_shards(out)
    with pytest.raises(OutputFileError, match="split into 3 shards, not 2"):
        run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(0, 2))
    with pytest.raises(OutputFileError, match="split into 3 shards"):
        run_sweep(small, out, pipe=pipe, bar=False)
    other = {**small, "grid": {**small["grid"], "strength": 0.75}}
    run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(0, 3))
    run_sweep(other, out, pipe=pipe, bar=False, shard=Shard(2, 3))
    with pytest.raises(OutputFileError, match="different configs"):
        merge_shards(out)
    assert not (out / RESULTS).exists()
    (out / "shards" / "0-of-2").mkdir()
    with pytest.raises(OutputFileError, match="different numbers of processes"):
        merge_shards(out)
    single = tmp_path / "single"
    run_sweep(small, single, pipe=pipe, bar=False)
    with pytest.raises(OutputFileError, match="single-process sweep"):
        run_sweep(small, single, pipe=pipe, bar=False, shard=Shard(0, 2))


def test_a_second_writer_of_one_shard_is_refused_but_other_shards_are_not(tmp_path):
    out = tmp_path / "locked"
    pipe = DiffEditPipeline.from_pretrained()
    small = {**CONFIG, "items": {"benchmark": "shapes", "count": 2},
             "grid": {"num_inference_steps": 4, "mask_samples": 2, "guidance_scale": 1.0, "strength": 0.5}}
    (out / "shards" / "0-of-2").mkdir(parents=True)
    with FolderLock(out / "shards" / "0-of-2"):
        with pytest.raises(OutputFileError, match="another process .* is writing"):
            run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(0, 2))
        assert run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(1, 2)).ran == 1
    assert run_sweep(small, out, pipe=pipe, bar=False, shard=Shard(0, 2)).ran == 1


def test_submit_runs_the_shards_as_a_submitit_array_and_merges(config_file, single, tmp_path, monkeypatch):
    import submitit  # noqa: F401  (in the test extra: this test must run, not skip)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the local executor's processes inherit it, as torchrun's do
    from diffedit.research.command import run_shard
    from diffedit.research.submit import submit_sweep
    out = tmp_path / "submitted"
    merged = submit_sweep(config_file, out, 2, run_shard, cluster="local")   # Slurm's stand-in on this machine
    assert merged.shards == 2
    assert_same_table(read_rows(out), single)


def test_submit_refuses_more_shards_than_items_before_submitting(config_file, tmp_path):
    from diffedit.research.command import run_shard
    from diffedit.research.submit import submit_sweep
    with pytest.raises(ParameterError, match=r"splits into at most \d+ shards .* not 1000 \(--submit\)"):
        submit_sweep(config_file, tmp_path / "submitted", 1000, run_shard, cluster="local")
    assert not (tmp_path / "submitted").exists()


def test_the_readme_and_the_slurm_script_say_how():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on many GPUs or a cluster", 1)[1].split("\n## ", 1)[0]
    for words in ("torchrun --nproc_per_node=8 -m diffedit sweep", "sbatch --array=0-7 scripts/sweep-array.sbatch",
                  "diffedit sweep merge DIR", "--shard 3/8", "flock", "refused"):
        assert words in section, words
    script = (REPO / "scripts" / "sweep-array.sbatch").read_text(encoding="utf-8")
    assert script.startswith("#!/bin/bash") and "python -m diffedit sweep" in script and "#SBATCH" in script


def test_a_second_process_on_a_locked_folder_exits_2_in_one_line(config_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with FolderLock(out):                   # a sweep running there (the lock is the kernel's, across processes)
        done = subprocess.run(sweep_command(config_file, out), env=ENV, capture_output=True, text=True,
                              timeout=120, check=False)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"(pid {os.getpid()}) is writing the results in {out}" in err[0], err
    assert not (out / RESULTS).exists()
