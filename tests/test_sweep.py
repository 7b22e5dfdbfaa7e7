"""Sweeps (diffedit/sweep.py) on a random tiny model with tiny settings (4 steps, 2 mask samples):
an interrupted sweep resumes to the table of an uninterrupted one; an r-sweep inverts once and a
threshold sweep computes its mask once, and every row equals the one-shot pipeline call with the
same settings (the re-use changes nothing); folder items; torn JSONL lines; config errors; CLI."""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import TINY

from diffedit.errors import OutputFileError, ParameterError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research import metrics as M
from diffedit.research.command import add_arguments, run
from diffedit.research.plan import AXES, SweepConfig, comparable, effective_settings
from diffedit.research.sweep import run_sweep
from diffedit.research.table import RESULTS, read_rows
from diffedit.shapes.world import heldout_edits


@pytest.fixture
def pipe(tiny_model_folder):
    return DiffEditPipeline.from_pretrained(tiny_model_folder)


def _count_calls(pipe, name: str) -> list:
    """Replace pipe.<name> by a wrapper recording its keyword arguments (edit's internal re-inversion
    goes through self.invert, so it is counted too)."""
    calls, original = [], getattr(pipe, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    setattr(pipe, name, wrapper)
    return calls


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _one_shot(pipe, row: dict, edit) -> np.ndarray:
    """The same run as one pipeline call, without any re-use."""
    encode, use_mask = {"none": (True, True), "no_mask": (True, False), "no_encode": (False, True),
                        "sdedit": (False, False)}[row["ablation"]]
    result = pipe(Image.fromarray(edit.source_image), edit.source_caption, edit.target_caption,
                  strength=row["strength"], num_inference_steps=row["num_inference_steps"],
                  guidance_scale=row["guidance_scale"], num_mask_samples=row["mask_samples"],
                  mask_noise_strength=row["mask_noise_strength"], mask_threshold=row["threshold"],
                  blend=row["blend"], encode=encode, use_mask=use_mask,
                  generator=torch.Generator().manual_seed(row["seed"]))
    return np.asarray(result.images[0]), result


# ---------------------------------------------------------------------- resume

def test_interrupted_sweep_resumes_to_the_same_table(pipe, tmp_path):
    config = {"items": {"benchmark": "shapes", "count": 2},
              "grid": {**TINY, "strength": [0.5, 1.0], "threshold": [0.4, 0.6]}}
    whole = run_sweep(config, tmp_path / "whole", pipe=pipe, bar=False)
    assert (whole.ran, whole.skipped, len(whole.rows)) == (8, 0, 8)

    def stop_after(k):
        def progress(done, total, row):
            assert total == 8 and row["key"]
            if done == k:
                raise KeyboardInterrupt
        return progress

    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, parts, pipe=pipe, progress=stop_after(3), bar=False)      # inside item 0
    assert len(read_rows(parts)) == 3
    with open(parts / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3                                     # CSV rebuilt on interrupt
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, parts, pipe=pipe, progress=stop_after(6), bar=False)      # inside item 1
    last = run_sweep(config, parts, pipe=pipe, bar=False)
    assert (last.ran, last.skipped) == (2, 6)

    assert [comparable(r) for r in last.rows] == [comparable(r) for r in whole.rows]
    assert len({r["key"] for r in last.rows}) == 8
    for a, b in zip(last.rows, whole.rows):
        np.testing.assert_array_equal(_pixels(parts / a["image"]), _pixels(tmp_path / "whole" / b["image"]))
    csvs = []
    for folder in (parts, tmp_path / "whole"):
        with open(folder / "results.csv", newline="") as f:
            csvs.append([comparable(r) for r in csv.DictReader(f)])
    assert csvs[0] == csvs[1] and len(csvs[0]) == 8
    again = run_sweep(config, parts, pipe=pipe, bar=False)                           # nothing left to do
    assert (again.ran, again.skipped) == (0, 8)


def test_a_torn_last_line_is_redone(pipe, tmp_path):
    config = {"items": {"benchmark": "shapes", "count": 1}, "grid": {**TINY, "guidance_scale": 1.0,
                                                                     "strength": [0.5, 1.0]}}
    first = run_sweep(config, tmp_path, pipe=pipe, bar=False)
    path = tmp_path / RESULTS
    text = path.read_text()
    path.write_text(text[:len(text) - 40])                                          # a crash mid-write
    assert len(read_rows(tmp_path)) == 1
    second = run_sweep(config, tmp_path, pipe=pipe, bar=False)
    assert second.ran == 1
    assert [comparable(r) for r in second.rows] == [comparable(r) for r in first.rows]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    with pytest.raises(OutputFileError, match="another items"):
        run_sweep({**config, "items": {"benchmark": "shapes", "count": 2}}, tmp_path, pipe=pipe, bar=False)


# ---------------------------------------------------------------------- re-use

def test_r_sweep_inverts_once_and_matches_one_shot_calls(pipe, tmp_path):
    config = {"items": {"benchmark": "shapes", "count": 1}, "grid": {**TINY, "strength": [0.5, 0.75, 1.0]}}
    inverts, masks = _count_calls(pipe, "invert"), _count_calls(pipe, "generate_mask")
    result = run_sweep(config, tmp_path, pipe=pipe, bar=False)
    assert len(result.rows) == 3
    assert len(inverts) == 1 and inverts[0]["strength"] == 1.0                      # one inversion, to r_max
    assert len(masks) == 1
    # mask 2n = 4, inversion 4 steps, edits (2 + 3 + 4) steps x 2 (guidance)
    assert pipe.counters.unet_samples == 4 + 4 + 2 * (2 + 3 + 4)
    assert [r["unet_samples"] for r in result.rows] == [4 + k + 2 * k for k in (2, 3, 4)]
    assert [r["cache_inversion"] for r in result.rows] == [False, True, True]
    edit = heldout_edits(1)[0]
    for row in result.rows:
        expected, _ = _one_shot(pipe, row, edit)
        np.testing.assert_array_equal(_pixels(tmp_path / row["image"]), expected)


def test_threshold_reuses_the_mask_and_ablations_match_one_shot_calls(pipe, tmp_path):
    config = {"items": {"benchmark": "shapes", "count": 1},
              "grid": {**TINY, "strength": 0.75, "seed": 3, "threshold": [0.4, 0.6],
                       "ablation": ["none", "no_mask", "no_encode", "sdedit"]}}
    masks, edits = _count_calls(pipe, "generate_mask"), _count_calls(pipe, "edit")
    rows = run_sweep(config, tmp_path, pipe=pipe, bar=False).rows
    assert len(rows) == 8
    assert len(masks) == 1                         # the threshold re-applies to the stored soft map
    assert len(edits) == 6                         # no_mask and sdedit ignore the threshold
    by = {(r["ablation"], r["threshold"]): r for r in rows}
    for ablation in ("no_mask", "sdedit"):
        a, b = by[(ablation, 0.4)], by[(ablation, 0.6)]
        assert comparable({**a, "key": "", "threshold": 0}) == comparable({**b, "key": "", "threshold": 0})
        assert b["cache_edit"] and "mask_iou" not in a and "mask_area" not in a
    assert by[("none", 0.4)]["mask_area"] >= by[("none", 0.6)]["mask_area"]
    settings = [{a: by[("no_mask", t)][a] for a in AXES} for t in (0.4, 0.6)]
    assert effective_settings(settings[0]) == effective_settings(settings[1])
    assert "threshold" not in effective_settings(settings[0]) and "seed" not in effective_settings(settings[0])
    edit = heldout_edits(1)[0]
    for ablation in ("none", "no_mask", "no_encode", "sdedit"):
        row = by[(ablation, 0.6)]
        expected, result = _one_shot(pipe, row, edit)
        np.testing.assert_array_equal(_pixels(tmp_path / row["image"]), expected)
        if result.mask is not None:
            assert row["mask_area"] == M.mask_area(result.mask.mask_images[0])
            assert row["mask_iou"] == M.mask_iou(result.mask.mask_images[0], edit.edit_mask)


# ---------------------------------------------------------------------- items from a folder

def test_folder_items_with_and_without_ground_truth(pipe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    edits = heldout_edits(2)
    for i, e in enumerate(edits):
        Image.fromarray(e.source_image).save(data / f"img{i}.png")
    Image.fromarray(edits[0].edit_mask.astype(np.uint8) * 255).save(data / "gt0.png")
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "source", "target", "gt_mask"])
        w.writerow(["img0.png", edits[0].source_caption, edits[0].target_caption, "gt0.png"])
        w.writerow(["img1.png", edits[1].source_caption, edits[1].target_caption, ""])
    M.register_metric("brightness", lambda inputs: float(np.asarray(inputs.edited).mean()))
    try:
        rows = run_sweep({"items": {"folder": str(data)}, "grid": {**TINY, "strength": 0.5}},
                         tmp_path / "out", pipe=pipe, bar=False).rows
    finally:
        M.unregister_metric("brightness")
    assert [r["item"] for r in rows] == ["000-img0", "001-img1"]
    with_gt, without = rows
    assert {"bg_psnr_gt", "bg_ssim_gt", "mask_iou", "gt_mask_area", "bg_psnr_mask", "mask_area"} <= set(with_gt)
    assert not {"bg_psnr_gt", "mask_iou", "success"} & set(without) and "bg_psnr_mask" in without
    assert with_gt["gt_mask_area"] == pytest.approx(edits[0].edit_mask.mean())
    edited = _pixels(tmp_path / "out" / with_gt["image"])
    assert with_gt["brightness"] == pytest.approx(edited.mean())
    assert with_gt["bg_psnr_gt"] == pytest.approx(M.psnr(edited, edits[0].source_image, edits[0].edit_mask))
    assert not any(k.startswith(("lpips", "clip")) for k in with_gt)             # nothing invented
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "brightness" in header and "bg_psnr_gt" in header


# ---------------------------------------------------------------------- config and CLI

@pytest.mark.parametrize("config, message", [
    ({"grid": {}}, "needs \"items\""),
    ({"items": {"benchmark": "shapes", "count": 1}, "grids": {}}, "unknown sweep config keys"),
    ({"items": {"benchmark": "shapes", "count": 1}, "grid": {"r": [0.5]}}, "unknown grid axes"),
    ({"items": {"benchmark": "shapes", "count": 1}, "grid": {"blend": "soft"}}, "blend"),
    ({"items": {"benchmark": "shapes", "count": 1}, "grid": {"ablation": ["none", "none"]}}, "repeats"),
    ({"items": {"benchmark": "shapes", "count": 1}, "grid": {"num_inference_steps": 4, "strength": 0.2}},
     "leaves no step"),
    ({"items": {"benchmark": "shapes", "count": 1}, "grid": {"mask_samples": 1.5}}, "integer"),
    ({"items": {"benchmark": "shapes", "count": 1}, "metrics": {"lpips": "/weights"}}, "factory"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ParameterError, match=message):
        SweepConfig.parse(config)


def test_bad_items_are_refused(tmp_path):
    with pytest.raises(ParameterError, match="manifest"):
        run_sweep({"items": {"folder": str(tmp_path)}}, tmp_path / "out", pipe=object(), bar=False)
    with pytest.raises(ParameterError, match="benchmark"):
        run_sweep({"items": {"benchmark": "coco", "count": 2}}, tmp_path / "out2", pipe=object(), bar=False)


def test_command_line(tmp_path, capsys, tiny_model_folder):
    config = tmp_path / "r.json"
    config.write_text(json.dumps({"model": str(tiny_model_folder), "items": {"benchmark": "shapes", "count": 1},
                                  "grid": {**TINY, "guidance_scale": 1.0, "strength": 0.5}}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(config), "--out", str(tmp_path / "out"), "--quiet"])
    assert run(args) == 0
    assert "1 rows (1 run now, 0 already done)" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "out")) == 1 and (tmp_path / "out" / "results.csv").is_file()


def test_the_readme_sweep_example_is_real():
    """The README's sweep command names a config in the repository that parses, and the figures it
    shows exist (they were made by that command; see notebooks/sweeps/README.md)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "diffedit sweep notebooks/sweeps/strength.json" in readme
    cfg = SweepConfig.parse(root / "notebooks" / "sweeps" / "strength.json")
    assert len(cfg.grid["strength"]) > 1 and cfg.items["benchmark"] == "shapes"
    for figure in ("strength-grid.png", "strength-tradeoff.png"):
        assert f"notebooks/sweeps/{figure}" in readme
        with Image.open(root / "notebooks" / "sweeps" / figure) as im:
            assert min(im.size) >= 128
