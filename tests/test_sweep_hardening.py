"""Sweeps and `eval shapes` on hostile or broken input: every refusal is one sentence of the
project's error family (exit 2 and one line on the command line), comes before any work, and
leaves the files as they were -- nothing written outside the output folder, nothing partial.

Each case is a row of a table: a function that prepares the folder and returns the config (or
the command line), the error class and the words of its sentence."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.cli import main
from diffedit.errors import OutputFileError, ParameterError
from diffedit.research import table
from diffedit.research.plan import SweepConfig
from diffedit.research.shards import FolderLock
from diffedit.research.sweep import run_sweep
from diffedit.research.table import RESULTS, read_rows, write_together
from diffedit.shapes.eval import EvalSettings, prepare_output, sweep_config

GRID = {"num_inference_steps": 4, "mask_samples": 2, "strength": 0.5}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root: path -> (size, modification time) or 'dir'."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


def dataset(root: Path, manifest, name: str = "manifest.json") -> dict:
    """A folder of items: one picture, a file outside it, and the manifest (JSON, CSV text or bytes)."""
    data = root / "data"
    data.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(data / "img.png")
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(root / "outside.png")
    content = manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest)
    (data / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return {"items": {"folder": str(data)}, "grid": GRID}


def entry(**fields) -> list[dict]:
    return [{"image": "img.png", "source": "a grey square", "target": "a red square", **fields}]


def escaping_link(root: Path) -> dict:
    config = dataset(root, entry(image="link.png"))
    os.symlink(root / "outside.png", root / "data" / "link.png")
    return config


def results_not_an_object(root: Path) -> dict:
    (root / "out").mkdir()
    (root / "out" / RESULTS).write_text("[1, 2]\n{\"key\": \"k\"}\n")
    return {"items": {"benchmark": "shapes", "count": 1}, "grid": GRID}


def results_is_a_folder(root: Path) -> dict:
    (root / "out" / RESULTS).mkdir(parents=True)
    return {"items": {"benchmark": "shapes", "count": 1}, "grid": GRID}


SWEEP_REFUSALS = [
    ("id escaping the folder", lambda r: dataset(r, entry(id="../../../ESCAPED")), ParameterError, "not a plain name"),
    ("absolute id", lambda r: dataset(r, entry(id=str(r / "victim"))), ParameterError, "not a plain name"),
    ("image outside", lambda r: dataset(r, entry(image="../outside.png")), ParameterError, "points outside"),
    ("absolute image", lambda r: dataset(r, entry(image=str(r / "outside.png"))), ParameterError, "points outside"),
    ("gt mask outside", lambda r: dataset(r, entry(gt_mask="../outside.png")), ParameterError, "points outside"),
    ("link out of the folder", escaping_link, ParameterError, "points outside"),
    ("malformed JSON manifest", lambda r: dataset(r, '[{"image": "img.png",'), ParameterError, "not valid JSON"),
    ("malformed CSV manifest", lambda r: dataset(r, 'image,source,target\n"img.png"x,a,b\n', "manifest.csv"),
     ParameterError, "not a valid CSV"),
    ("non-UTF-8 manifest", lambda r: dataset(r, b'[{"image": "\xff\xfe.png"}]'), ParameterError, "not UTF-8"),
    ("a results line that is not an object", results_not_an_object, ParameterError, "not a JSON object"),
    ("results path is a folder", results_is_a_folder, OutputFileError, "is not a file"),
    ("config imports code", lambda r: {"items": {"benchmark": "shapes", "count": 1},
                                        "metrics": {"m": {"factory": "os:system", "weights": "echo pwned"}}},
     ParameterError, "--trust-config-code"),
    ("config values of the wrong type", lambda r: {"items": {"folder": 5}}, ParameterError, "DIR as text"),
    ("resolution that is not a size", lambda r: {"items": {"benchmark": "shapes", "count": 1}, "resolution": "big"},
     ParameterError, "resolution"),
    ("seed beyond 64 bits", lambda r: {"items": {"benchmark": "shapes", "count": 1}, "grid": {"seed": 2 ** 64}},
     ParameterError, "seed"),
]


@pytest.mark.parametrize("name, prepare, error, words", SWEEP_REFUSALS, ids=[c[0] for c in SWEEP_REFUSALS])
def test_sweep_refusals_change_no_file(tmp_path, monkeypatch, name, prepare, error, words):
    called = []
    monkeypatch.setattr(os, "system", lambda command: called.append(command))
    config = prepare(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=words) as refused:
        run_sweep(config, tmp_path / "out", pipe=object(), bar=False)
    message = str(refused.value)
    assert "\n" not in message and message.endswith(".")
    assert snapshot(tmp_path) == before and not called


def eval_command(root: Path, *extra: str) -> list[str]:
    return ["eval", "shapes", "--count", "1", "--steps", "10", "--mask-samples", "2", "--quiet", *extra]


def other_results(root: Path) -> list[str]:
    (root / "ev").mkdir()
    (root / "ev" / "notes.txt").write_text("mine")
    return eval_command(root, "--out", str(root / "ev"))


def locked_sweep(root: Path) -> list[str]:
    (root / "c.json").write_text(json.dumps({"items": {"benchmark": "shapes", "count": 1}, "grid": GRID}))
    (root / "out").mkdir()
    return ["sweep", str(root / "c.json"), "--out", str(root / "out")]


def escaping_sweep(root: Path) -> list[str]:
    (root / "c.json").write_text(json.dumps(dataset(root, entry(id="../../ESCAPED"))))
    return ["sweep", str(root / "c.json"), "--out", str(root / "out")]


def code_sweep(root: Path) -> list[str]:
    (root / "c.json").write_text(json.dumps({"items": {"benchmark": "shapes", "count": 1},
                                             "metrics": {"m": {"factory": "os:system", "weights": "x"}}}))
    return ["sweep", str(root / "c.json"), "--out", str(root / "out")]


CLI_REFUSALS = [
    ("eval --count 0", lambda r: ["eval", "shapes", "--count", "0", "--out", str(r / "ev")], "--count must be"),
    ("eval --out a file", lambda r: (r / "f").write_text("x") and ["eval", "shapes", "--out", str(r / "f")],
     "is a file"),
    ("eval over other files", other_results, "--overwrite"),
    ("eval seed beyond 64 bits", lambda r: eval_command(r, "--seed", str(2 ** 64), "--out", str(r / "ev")), "seed"),
    ("sweep --shard out of range", lambda r: locked_sweep(r)[:4] + ["--shard", "3/3"], "K must be"),
    ("merge of a folder without shards", lambda r: ["sweep", "merge", str(r)], "holds no shards"),
    ("merge without a folder", lambda r: ["sweep", "merge"], "needs the sweep folder"),
    ("sweep --out a file", lambda r: (r / "f").write_text("x") and locked_sweep(r)[:2] + ["--out", str(r / "f")],
     "cannot create the sweep folder"),
    ("sweep with an escaping id", escaping_sweep, "not a plain name"),
    ("sweep config that imports code", code_sweep, "--trust-config-code"),
]


@pytest.mark.parametrize("name, prepare, words", CLI_REFUSALS, ids=[c[0] for c in CLI_REFUSALS])
def test_command_line_refusals_exit_2_with_one_line(tmp_path, capsys, name, prepare, words):
    argv = prepare(tmp_path)
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffedit: error: ") and words in err[0], err
    assert snapshot(tmp_path) == before


def test_a_second_sweep_into_a_locked_folder_is_refused(tmp_path, capsys):
    argv = locked_sweep(tmp_path)
    with FolderLock(tmp_path / "out"):
        before = snapshot(tmp_path)
        assert main(argv) == 2
        assert snapshot(tmp_path) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another process" in err[0] and "is writing the results" in err[0]


def test_eval_into_a_read_only_folder_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import diffedit.shapes.eval as shapes_eval
    (tmp_path / "ro").mkdir()
    real_access = os.access   # as root every folder is writable: the check is made to see a read-only one
    monkeypatch.setattr(shapes_eval.os, "access", lambda path, mode: Path(path).name != "ro" and real_access(path, mode))
    before = snapshot(tmp_path)
    assert main(eval_command(tmp_path, "--out", str(tmp_path / "ro" / "ev"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]
    assert snapshot(tmp_path) == before


def test_eval_resumes_its_own_folder_and_overwrite_replaces_only_its_files(tmp_path):
    settings = EvalSettings(count=2, num_inference_steps=10, num_mask_samples=2)
    out = tmp_path / "ev"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps(SweepConfig.parse(sweep_config(settings)).as_dict(), default=str))
    (out / RESULTS).write_text("")
    assert prepare_output(out, settings, None, overwrite=False) == out            # the same evaluation: resumed
    assert (out / RESULTS).exists()
    other = EvalSettings(count=3, num_inference_steps=10, num_mask_samples=2)
    with pytest.raises(OutputFileError, match="--overwrite"):
        prepare_output(out, other, None, overwrite=False)
    (out / "notes.txt").write_text("mine")
    prepare_output(out, other, None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]                # only the evaluation's files go


def test_a_duplicated_row_counts_once(tmp_path):
    line = json.dumps({"key": "a", "x": 1}) + "\n"
    (tmp_path / RESULTS).write_text(line + json.dumps({"key": "b", "x": 2}) + "\n" + line)
    assert [r["key"] for r in read_rows(tmp_path)] == ["a", "b"]


def test_outputs_written_together_are_all_or_none(tmp_path, monkeypatch):
    real, calls = table.atomic_write_text, []

    def fail_on_the_second(path, text, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OutputFileError("disk full.")
        return real(path, text, **kwargs)
    monkeypatch.setattr(table, "atomic_write_text", fail_on_the_second)
    with pytest.raises(OutputFileError):
        write_together({tmp_path / "a.csv": "a", tmp_path / "b.json": "b"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(table, "atomic_write_text", real)
    write_together({tmp_path / "a.csv": "a", tmp_path / "b.json": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.json"]


def test_eval_shapes_resumes_its_folder_and_refuses_another_evaluation(tmp_path, capsys):
    out = tmp_path / "ev"
    argv = eval_command(tmp_path, "--out", str(out), "--no-tables")
    assert main(argv) == 0
    rows = read_rows(out)
    assert len(rows) == 4 and (out / "summary.csv").is_file() and (out / "summary.json").is_file()
    capsys.readouterr()
    assert main(argv) == 0                                                       # the same evaluation resumes
    assert read_rows(out) == rows
    before = snapshot(tmp_path)
    assert main(argv + ["--threshold", "0.6"]) == 2                              # another one is refused
    assert "--overwrite" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert main(argv + ["--threshold", "0.6", "--overwrite"]) == 0
    assert {r["threshold"] for r in read_rows(out)} == {0.6} and len(read_rows(out)) == 4
