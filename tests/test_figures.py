"""Figures (diffedit/figures.py) from a small sweep of the random tiny model: every figure is a PNG
of the stated pixel size with the right pictures in its cells, ambiguous cells are refused, the
trade-off table averages the rows it says, and a missing matplotlib gives a clear error."""

import argparse
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import TINY

from diffedit.errors import ParameterError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research import figures as F
from diffedit.research.command import add_arguments, run
from diffedit.research.sweep import run_sweep
from diffedit.research.table import read_rows
from diffedit.shapes.world import heldout_edits

CELL = 64


def _config(model_folder) -> dict:
    return {"model": str(model_folder), "items": {"benchmark": "shapes", "count": 2},
            "grid": {**TINY, "strength": [0.5, 1.0], "ablation": ["none", "no_mask"]}}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_model_folder):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before conftest's per-test one-thread setting
    folder = tmp_path_factory.mktemp("sweep")
    pipe = DiffEditPipeline.from_pretrained(tiny_model_folder)
    run_sweep(_config(tiny_model_folder), folder, pipe=pipe, bar=False)
    torch.set_num_threads(threads)
    return folder


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(np.float64)


def _panel(picture: np.ndarray, col: int, row: int) -> np.ndarray:
    """The (CELL - 4)-pixel square a panel's picture fills."""
    top, left = F.HEADER + row * CELL + 2, col * CELL + 2
    return picture[top:top + CELL - 4, left:left + CELL - 4]


def _resized(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((CELL - 4, CELL - 4)), dtype=np.float64)


def _lower_mean(a: np.ndarray) -> np.ndarray:
    """Mean colour of the lower two thirds (the labels sit at the top of a panel)."""
    return a[a.shape[0] // 3:].mean(axis=(0, 1))


def _no_temp_files(folder):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_image_grid_has_the_stated_size_and_the_pictures_in_place(sweep_dir):
    path = F.image_grid(sweep_dir, "strength", where={"ablation": "none"}, cell=CELL, annotate="bg_psnr_gt")
    picture = _png(path)
    assert picture.shape == (F.HEADER + 2 * CELL, 3 * CELL, 3)                 # 2 items, input + 2 values
    rows = [r for r in read_rows(sweep_dir) if r["ablation"] == "none"]
    inputs = [sweep_dir / "images" / f"shapes-00{i}" / "input.png" for i in range(2)]
    for i in range(2):
        np.testing.assert_allclose(_lower_mean(_panel(picture, 0, i)), _lower_mean(_resized(inputs[i])), atol=3)
        row = next(r for r in rows if r["item"] == f"shapes-00{i}" and r["strength"] == 1.0)
        np.testing.assert_allclose(_lower_mean(_panel(picture, 2, i)), _lower_mean(_resized(sweep_dir / row["image"])),
                                   atol=3)
    _no_temp_files(path.parent)


def test_an_ambiguous_cell_is_refused(sweep_dir, tmp_path):
    with pytest.raises(ParameterError, match="ablation"):
        F.image_grid(sweep_dir, "strength", out=tmp_path / "g.png")
    with pytest.raises(ParameterError, match="not columns"):
        F.image_grid(sweep_dir, "strength", where={"r": 0.5}, out=tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_mask_overlays_and_difference_maps(sweep_dir, tmp_path, tiny_model_folder):
    masks = _png(F.mask_overlays(sweep_dir, cell=CELL))
    assert masks.shape == (F.HEADER + 2 * CELL, 5 * CELL, 3)
    diffs = _png(F.difference_maps(sweep_dir, item="shapes-001", cell=CELL))
    assert diffs.shape == (F.HEADER + CELL, (1 + 2 + 3) * CELL, 3)            # input, n = 2 samples, 3 maps
    with pytest.raises(ParameterError, match="item"):
        F.difference_maps(sweep_dir)
    # from a MaskResult, as the notebooks draw them: n = 3 samples, no sweep folder
    pipe = DiffEditPipeline.from_pretrained(tiny_model_folder)
    edit = heldout_edits(1)[0]
    result = pipe.generate_mask(Image.fromarray(edit.source_image), edit.source_caption, edit.target_caption,
                                num_samples=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ParameterError, match="out"):
        F.difference_maps(result)
    picture = _png(F.difference_maps(result, out=tmp_path / "d.png", cell=CELL))
    assert picture.shape == (F.HEADER + CELL, (1 + 3 + 3) * CELL, 3)
    mask_panel = _panel(picture, 1 + 3 + 2, 0)
    bright = (mask_panel.mean(axis=2) > 128).mean()                            # magma: 1 is light, 0 is dark
    assert bright == pytest.approx(float(result.mask.float().mean()), abs=0.08)


def test_tradeoff_table_and_curve(sweep_dir, tmp_path):
    rows = read_rows(sweep_dir)
    table = F.tradeoff_table(rows, "mask_area", "bg_psnr_gt", along="strength", by="ablation")
    assert [(t["group"], t["along"]) for t in table] == [("none", 0.5), ("none", 1.0)]  # no_mask has no mask_area
    for t in table:
        cell = [r for r in rows if r["ablation"] == t["group"] and r["strength"] == t["along"]]
        assert t["count"] == 2
        assert t["x"] == pytest.approx(np.mean([r["mask_area"] for r in cell]))
        assert t["y"] == pytest.approx(np.mean([r["bg_psnr_gt"] for r in cell]))
    successes = F.tradeoff_table(rows, "success", "bg_psnr_gt", by="ablation")
    assert len(successes) == 4 and all(0 <= t["x"] <= 1 for t in successes)
    path = F.tradeoff_curve(sweep_dir, "success", "bg_psnr_gt", by="ablation", out=tmp_path / "t.png", size=(500, 300))
    assert _png(path).shape == (300, 500, 3)
    with pytest.raises(ParameterError, match="no run has both"):
        F.tradeoff_curve(sweep_dir, "clip_score", "bg_psnr_gt", out=tmp_path / "none.png")
    _no_temp_files(tmp_path)


def test_sweep_command_draws_the_default_figures(sweep_dir, tmp_path, capsys, tiny_model_folder):
    import json
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(tiny_model_folder)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(config), "--out", str(sweep_dir), "--figures", "--quiet"])
    assert run(args) == 0                                                       # resumes: 0 runs
    out = capsys.readouterr().out
    assert "8 rows (0 run now, 8 already done)" in out
    names = sorted(p.name for p in (sweep_dir / "figures").iterdir())
    assert {"grid-strength.png", "masks.png", "tradeoff-bg_psnr_gt-vs-success.png"} <= set(names)
    assert _png(sweep_dir / "figures" / "tradeoff-bg_psnr_gt-vs-success.png").shape == (480, 640, 3)


def test_missing_matplotlib_is_a_clear_error(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(F.PlotsUnavailableError, match=r"diffedit-sd\[plots\]"):
        F.image_grid(sweep_dir, "strength", where={"ablation": "none"}, out=tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
