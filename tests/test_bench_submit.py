"""`diffedit bench ... --submit N`: the model methods as N shards through submitit (its local
executor here, Slurm's stand-in on a machine without it), merged, then the copy baseline and the
summary written as by one process; the embedded model, 2 shapes edits, 4 steps."""

from __future__ import annotations

import json

import pytest
from reference_models import assert_same_table
from test_bench_command import GRID, export_shapes, one_thread

from diffedit.cli import main
from diffedit.research.table import read_rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return export_shapes(tmp_path_factory.mktemp("submit-pairs"), 2, "edit")


def test_submit_gives_the_rows_and_summary_of_one_process(pairs, tmp_path, monkeypatch):
    import submitit  # noqa: F401  (in the test extra: this test must run, not skip)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the local executor's processes inherit it
    single, submitted = tmp_path / "single", tmp_path / "submitted"
    with one_thread():
        assert main(["bench", "pairs", str(pairs), "--out", str(single), *GRID]) == 0
    assert main(["bench", "pairs", str(pairs), "--out", str(submitted), *GRID, "--submit", "2"]) == 0
    assert (submitted / "submitit").is_dir() and len(list((submitted / "shards").iterdir())) == 2
    assert_same_table(read_rows(submitted), read_rows(single))
    assert (submitted / "copy.jsonl").read_text() == (single / "copy.jsonl").read_text()
    ours, reference = (json.loads((d / "summary.json").read_text()) for d in (submitted, single))
    assert [(s["method"], s["strength"], s["items"]) for s in ours["summary"]] == \
        [(s["method"], s["strength"], s["items"]) for s in reference["summary"]]
    for a, b in zip(ours["summary"], reference["summary"]):
        assert a.keys() == b.keys()
        for name in ("bg_psnr_gt", "mask_iou", "unet_samples"):
            if name in b:
                assert a[name] == pytest.approx(b[name], rel=1e-6, nan_ok=True), name


def test_submit_refusals_are_one_sentence(pairs, tmp_path, capsys):
    assert main(["bench", "pairs", str(pairs), "--out", str(tmp_path / "a"), *GRID, "--submit", "2",
                 "--shard", "0/2"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["bench", "pairs", str(pairs), "--out", str(tmp_path / "b"), "--methods", "copy", "--submit", "2",
                 "--quiet"]) == 2
    assert "copy baseline alone" in capsys.readouterr().err
    assert main(["bench", "pairs", str(pairs), "--out", str(tmp_path / "c"), *GRID, "--submit", "2",
                 "--slurm", "partition"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
