"""Audit fixes in the sweep's tables (research/table.py, merge.py, sweep.py): a merge refuses shards
whose rows are not exactly the plan's (cut, foreign, outside the plan, conflicting) and malformed
item lists; results lines with an unhashable key, NaN or deep nesting are one sentence; a shard
count beyond the items, a bad dtype, device or model path are refused before any folder is made;
a model that fails to load leaves the folder as it was."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffedit.cli import main
from diffedit.errors import DiffEditError, OutputFileError, ParameterError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research.merge import merge_shards
from diffedit.research.shards import Shard
from diffedit.research.sweep import run_sweep
from diffedit.research.table import RESULTS, read_rows

CONFIG = {"items": {"benchmark": "shapes", "count": 3}, "save_images": False,
          "grid": {"num_inference_steps": 4, "mask_samples": 2, "strength": [0.5, 1.0]}}
S0, S1 = Path("shards/0-of-2"), Path("shards/1-of-2")     # 3 equal items: shard 0 runs items 0 and 2


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A sweep of 3 items run as 2 shards, not merged."""
    out = tmp_path_factory.mktemp("sharded") / "sweep"
    pipe = DiffEditPipeline.from_pretrained()
    for k in range(2):
        run_sweep(CONFIG, out, pipe=pipe, bar=False, shard=Shard(k, 2))
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, rows: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in rows))


def cut_row(out: Path) -> None:
    write_lines(out / S1 / RESULTS, lines(out / S1 / RESULTS)[:1])


def foreign_row(out: Path) -> None:
    row = json.loads(lines(out / S1 / RESULTS)[0])
    write_lines(out / S0 / RESULTS, lines(out / S0 / RESULTS) + [json.dumps({**row, "bg_psnr_gt": 99.0})])


def row_outside_the_plan(out: Path) -> None:
    row = json.loads(lines(out / S0 / RESULTS)[0])
    write_lines(out / S0 / RESULTS, lines(out / S0 / RESULTS) + [json.dumps({**row, "key": "bogus"})])


def conflicting_duplicate(out: Path) -> None:
    row = json.loads(lines(out / S0 / RESULTS)[0])
    write_lines(out / S0 / RESULTS, lines(out / S0 / RESULTS) + [json.dumps({**row, "bg_psnr_gt": 99.0})])


def nan_value(out: Path) -> None:
    rows = lines(out / S0 / RESULTS)
    write_lines(out / S0 / RESULTS, [json.dumps({**json.loads(rows[0]), "bg_psnr_gt": float("nan")})] + rows[1:])


MERGE_REFUSALS = [
    ("rows cut after the marker", cut_row, "shard 1 of 2 has 1 row in .*counts 2"),
    ("a row of another shard's item", foreign_row, "shard 0 of 2 holds a row of item 'shapes-001', which the plan "
                                                   "gives to shard 1"),
    ("a key outside the plan", row_outside_the_plan, "shard 0 of 2 holds a row .* not a run of the plan"),
    ("conflicting duplicate rows", conflicting_duplicate, "repeats the key of an earlier row with other values"),
    ("NaN in a row", nan_value, "line 1 of .* holds NaN"),
    ("item list as a dict", lambda out: (out / S1 / "items.json").write_text('{"a": 1}'), "not a list of items"),
    ("items without id", lambda out: (out / S1 / "items.json").write_text('[{"x": 1}]'), "not a list of items"),
]


@pytest.mark.parametrize("name, mutate, words", MERGE_REFUSALS, ids=[c[0] for c in MERGE_REFUSALS])
def test_a_merge_refuses_shards_that_are_not_the_plan(sharded, tmp_path, name, mutate, words):
    out = tmp_path / "sweep"
    shutil.copytree(sharded, out)
    mutate(out)
    with pytest.raises(DiffEditError, match=words) as refused:
        merge_shards(out)
    assert "\n" not in str(refused.value) and not (out / RESULTS).exists()


def test_an_intact_sweep_still_merges(sharded, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(sharded, out)
    with open(out / S1 / RESULTS, "a") as f:
        f.write('{"key": "tor')                                   # a torn last line is still ignored
    assert len(merge_shards(out).rows) == 6


def test_merging_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["sweep", "merge", str(tmp_path / "nowhere")]) == 2
    assert f"the sweep folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("line, words", [
    (json.dumps({"key": [1], "x": 1}), "has a \"key\" that is not text"),
    ('{"key": "a", "x": NaN}', "holds NaN"),
    ("[" * 100000 + "]" * 100000, "is not JSON"),
])
def test_malformed_results_lines_are_one_sentence(tmp_path, line, words):
    (tmp_path / RESULTS).write_text(line + "\n" + json.dumps({"key": "b"}) + "\n" + '{"key": "tor')
    with pytest.raises(ParameterError, match=f"line 1 of .*{words}"):
        read_rows(tmp_path, repair=True)


# ---------------------------------------------------------------------- settings checked before any file

SMALL = {"items": {"benchmark": "shapes", "count": 2}, "grid": {"num_inference_steps": 4, "mask_samples": 2,
                                                                 "strength": 0.5}}


@pytest.mark.parametrize("config, extra, words", [
    (SMALL, ["--shard", "0/1000000000"], "at most 2 shards"),
    (SMALL, ["--dtype", "fp64"], "unknown dtype 'fp64'"),
    (SMALL, ["--device", "cuda"] , "CUDA"),
    ({**SMALL, "device": "gpu"}, [], "unknown device 'gpu'"),
    ({**SMALL, "model": "/nonexistent"}, [], "neither an existing folder or file nor a hub id"),
])
def test_bad_settings_are_refused_before_the_folder_is_made(tmp_path, capsys, config, extra, words):
    import torch
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has CUDA")
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    assert main(["sweep", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "sw" / "s2"), "--quiet", *extra]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_a_model_that_fails_to_load_leaves_the_folder_as_it_was(tmp_path):
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"not a model")
    config = {**SMALL, "model": str(picture)}
    with pytest.raises(DiffEditError, match="not a checkpoint file"):
        run_sweep(config, tmp_path / "new" / "sweep", bar=False)
    assert not (tmp_path / "new").exists()                        # the folders it made are gone
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    with pytest.raises(DiffEditError, match="not a checkpoint file"):
        run_sweep(config, tmp_path / "old", bar=False)
    left = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert left in (["notes.txt"], [".sweep.lock", "notes.txt"])       # no sweep.json claiming a run


def test_a_shard_of_an_empty_share_is_refused_by_the_python_api_too(tmp_path):
    with pytest.raises(ParameterError, match="not 3 \\(--shard\\)"):
        run_sweep(SMALL, tmp_path / "out", pipe=object(), bar=False, shard=Shard(2, 3))
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputFileError):
        merge_shards(tmp_path / "out")


def test_eval_shapes_with_a_model_that_fails_leaves_no_folder(tmp_path, capsys):
    from reference_models import run_cli
    picture = tmp_path / "photo.png"
    Image.new("RGB", (16, 16)).save(picture)
    code, _, err = run_cli(["eval", "shapes", "--model", picture, "--out", tmp_path / "evx", "--count", "1"], capsys)
    assert code == 2 and "is not a checkpoint file" in err[-1], err
    assert not (tmp_path / "evx").exists()
