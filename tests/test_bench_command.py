"""`diffedit bench` end to end on the embedded model (weights/shapes-64, 64 px, 4 steps): the copy
baseline gives the input back without a model call; a run killed with SIGKILL and resumed gives
the rows of an uninterrupted run; shards merge to the same rows; and the shapes world exported as
a `pairs` benchmark gives, per item and setting, the mask IoU and background PSNR that
`diffedit eval shapes` reports on the same edits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.cli import main
from diffedit.research.table import RESULTS, read_rows
from reference_models import assert_same_table

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FAST = ["--steps", "4", "--mask-samples", "1", "--quiet"]
GRID = ["--methods", "diffedit", "sdedit", "copy", "--strengths", "0.5", "1.0", *FAST]
RUNS = 2 * 2 * 2       # items x model methods x r


@contextmanager
def one_thread():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def export_shapes(folder: Path, count: int, mask: str) -> Path:
    """The first `count` held-out edits of the shapes world as a pairs file: the input picture,
    the prompts and a mask picture, `edit` (the edited object, old | new: eval's mask IoU) or
    `objects` (every object: eval's background PSNR is over the pixels outside them)."""
    from diffedit.shapes.world import heldout_edits
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, e in enumerate(heldout_edits(count)):
        region = e.edit_mask if mask == "edit" else ~e.background_mask
        Image.fromarray(e.source_image).save(folder / f"input-{i}.png")
        Image.fromarray(region.astype(np.uint8) * 255).save(folder / f"mask-{i}.png")
        rows.append({"id": f"shapes-{i:03d}", "image": f"input-{i}.png", "mask": f"mask-{i}.png",
                     "source": e.source_caption, "target": e.target_caption})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory) -> Path:
    return export_shapes(tmp_path_factory.mktemp("shapes-pairs"), 2, "edit")


@pytest.fixture(scope="module")
def reference(shapes_pairs, tmp_path_factory) -> Path:
    """One uninterrupted in-process run of GRID (the reference of the resumed and sharded runs)."""
    out = tmp_path_factory.mktemp("reference")
    with one_thread():
        assert main(["bench", "pairs", str(shapes_pairs), "--out", str(out), *GRID]) == 0
    assert len(read_rows(out)) == RUNS
    return out


def test_copy_baseline_gives_the_input_back_without_a_model(shapes_pairs, tmp_path, monkeypatch):
    from diffedit.pipeline import DiffEditPipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the copy baseline loaded a model")
    monkeypatch.setattr(DiffEditPipeline, "from_pretrained", no_model)
    out = tmp_path / "copy"
    assert main(["bench", "pairs", str(shapes_pairs), "--out", str(out), "--methods", "copy", "--quiet"]) == 0
    assert not (out / RESULTS).exists()
    rows = [json.loads(line) for line in (out / "copy.jsonl").read_text().splitlines()]
    assert [r["item"] for r in rows] == ["shapes-000", "shapes-001"]
    for i, row in enumerate(rows):
        given = np.asarray(Image.open(shapes_pairs.parent / f"input-{i}.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(out / row["image"])), given)
        assert row["bg_psnr_gt"] == 100.0 and row["bg_ssim_gt"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert [(s["method"], s["items"]) for s in summary] == [("copy", 2)]
    assert main(["bench", "pairs", str(shapes_pairs), "--out", str(out), "--methods", "copy", "--limit", "1",
                 "--quiet"]) == 2   # another spec in the same folder is refused


def test_a_killed_bench_run_resumes_to_the_rows_of_an_uninterrupted_run(shapes_pairs, reference, tmp_path, capsys):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "diffedit", "bench", "pairs", str(shapes_pairs), "--out", str(out), *GRID]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if (out / RESULTS).is_file() and (out / RESULTS).read_text().count("\n") >= 1:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert 1 <= len(read_rows(out)) < RUNS and not (out / "summary.json").exists()
    capsys.readouterr()
    with one_thread():
        assert main(["bench", "pairs", str(shapes_pairs), "--out", str(out), *GRID]) == 0
    assert "already done" in capsys.readouterr().out
    assert_same_table(read_rows(out), read_rows(reference))
    for name in ("summary.json", "copy.jsonl", "benchmark.json"):
        assert json.loads((out / name).read_text().splitlines()[0] if name.endswith("jsonl") else
                          (out / name).read_text()) == json.loads(
            (reference / name).read_text().splitlines()[0] if name.endswith("jsonl") else (reference / name).read_text())


def test_bench_shards_merge_to_the_single_process_rows(shapes_pairs, reference, tmp_path, capsys):
    out = tmp_path / "sharded"
    with one_thread():
        for shard in ("0/2", "1/2"):
            assert main(["bench", "pairs", str(shapes_pairs), "--out", str(out), "--shard", shard, *GRID]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    assert_same_table(read_rows(out), read_rows(reference))
    assert (out / "summary.csv").read_text() == (reference / "summary.csv").read_text()


def test_shapes_as_pairs_give_the_numbers_of_eval_shapes(shapes_pairs, tmp_path):
    methods = ["diffedit", "diffedit-no-encoding", "sdedit", "encode-decode"]
    with one_thread():
        assert main(["eval", "shapes", "--count", "2", "--no-tables", "--out", str(tmp_path / "eval"), *FAST]) == 0
        assert main(["bench", "pairs", str(shapes_pairs), "--out", str(tmp_path / "bench"), "--methods", *methods,
                     "--strengths", "0.8", *FAST]) == 0
        objects = export_shapes(tmp_path / "objects", 2, "objects")
        assert main(["bench", "pairs", str(objects), "--out", str(tmp_path / "objects-bench"), "--methods",
                     "diffedit", "--strengths", "0.8", *FAST]) == 0
    evaluated = {r["key"]: r for r in read_rows(tmp_path / "eval")}
    benched = {r["key"]: r for r in read_rows(tmp_path / "bench")}
    assert benched.keys() == evaluated.keys() and len(benched) == 2 * 4
    for key, row in benched.items():   # per item and setting: the same edit, the same numbers
        for column in ("mask_iou", "bg_psnr_gt", "bg_ssim_gt", "bg_psnr_mask", "unet_samples"):
            assert row.get(column) == evaluated[key].get(column), (key, column)
    for row in read_rows(tmp_path / "objects-bench"):   # eval's background PSNR: outside every object
        assert row["bg_psnr_gt"] == evaluated[row["key"]]["bg_psnr_scene"]
    eval_summary = {s["run"]: s for s in json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]}
    bench_summary = {s["method"]: s for s in json.loads((tmp_path / "bench" / "summary.json").read_text())["summary"]}
    objects_summary = json.loads((tmp_path / "objects-bench" / "summary.json").read_text())["summary"][0]
    assert bench_summary["diffedit"]["mask_iou"] == pytest.approx(eval_summary["diffedit"]["mask_iou"], rel=1e-12)
    assert objects_summary["bg_psnr_gt"] == pytest.approx(eval_summary["diffedit"]["bg_psnr"], rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["bench", "imagenet"], "`diffedit bench imagenet` needs --data DIR"),
    (["bench", "pie-bench", "somewhere"], "takes its folder with --data"),
    (["bench", "pairs", "/nonexistent/pairs.csv", "--methods", "copy"], "/nonexistent/pairs.csv does not exist"),
    (["bench", "pairs", "x.csv", "--strengths", "0.01"], "leaves no step"),
])
def test_user_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_imagenet_limit_reads_only_the_drawn_queries_of_the_shipped_list(tmp_path, monkeypatch):
    """--limit draws from the 1,092 shipped test queries before any image is read: only the drawn
    images need to exist. Through the command, with the copy baseline (no model)."""
    from diffedit.research.benchmarks.common import subset
    from diffedit.research.benchmarks.imagenet import read_queries
    drawn = subset(read_queries("test"), 3, 7)
    for n, query in enumerate(drawn):
        (tmp_path / "val" / query["path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32, 3), 40 * n, np.uint8)).save(tmp_path / "val" / query["path"], format="JPEG")
    out = tmp_path / "out"
    assert main(["bench", "imagenet", "--data", str(tmp_path / "val"), "--out", str(out), "--limit", "3",
                 "--subset-seed", "7", "--methods", "copy", "--template", "a photo of a {}", "--quiet"]) == 0
    listing = json.loads((out / "benchmark.json").read_text())
    assert listing["spec"]["limit"] == 3 and listing["protocol"]["template"] == "a photo of a {}"
    assert [(i["id"], i["source"], i["target_id"]) for i in listing["items"]] == [
        (f"flexit-{q['id']}", f"a photo of a {q['source']}", q["target_id"]) for q in drawn]


def test_pie_bench_copy_baseline_is_summarised_per_edit_type(tmp_path):
    """The PIE-Bench reader through the command (copy baseline, no model): masks with the border
    quirk, prompts without [ ], and summary.json's means per edit type."""
    from test_bench_readers import PIE_ROWS, drawn_mask, encode_runs, picture
    root = tmp_path / "PIE-Bench"
    mapping = {}
    for n, (key, (kind, rect, original, edited)) in enumerate(PIE_ROWS.items()):
        (root / "annotation_images").mkdir(parents=True, exist_ok=True)
        picture(n, (512, 512)).save(root / "annotation_images" / f"{key}.jpg")
        mapping[key] = {"image_path": f"{key}.jpg", "original_prompt": original, "editing_prompt": edited,
                        "editing_type_id": kind, "mask": encode_runs(drawn_mask(*rect))}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    out = tmp_path / "out"
    assert main(["bench", "pie-bench", "--data", str(root), "--out", str(out), "--methods", "copy", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["by_edit_type"]) == ["random", "change attribute (color)", "change style"]
    assert all(groups[0]["items"] == 1 and groups[0]["bg_psnr_gt"] == 100.0
               for groups in summary["by_edit_type"].values())
    from diffedit.research.benchmarks.pie_bench import decode_mask
    copies = [json.loads(line) for line in (out / "copy.jsonl").read_text().splitlines()]
    assert [c["gt_mask_area"] for c in copies] == [decode_mask(encode_runs(drawn_mask(*r[1]))).mean()
                                                   for r in PIE_ROWS.values()]
    listing = json.loads((out / "benchmark.json").read_text())
    assert [i["source"] for i in listing["items"]] == [r[2].replace("[", "").replace("]", "") for r in PIE_ROWS.values()]


def test_the_readme_bench_commands_parse():
    """Every `diffedit bench` command of README "Reproducing the paper" parses (optional parts in
    [ ] included, a trailing ... dropped)."""
    import re
    import shlex

    from diffedit.cli import build_parser
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^diffedit bench .*?(?<!\\)$", section.replace("\\\n", " "), flags=re.M)
    assert len(commands) == 8   # three benchmarks, a quick seeded subset, two report forms, stats, score
    for line in commands:
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("...", " "), comments=True)
        args = build_parser("bench").parse_args(words[1:])
        assert args.command == "bench" and args.benchmark in ("imagenet", "pie-bench", "pairs", "report", "stats", "score")
