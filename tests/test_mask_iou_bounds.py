"""scripts/mask_iou_bounds.py: the IoU a mask of exactly the changed pixels reaches on the shapes
benchmark (README, "What the IoU goal asks for"). The figures quoted there are pinned here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from diffedit.research.metrics import mask_iou
from diffedit.shapes.world import heldout_edits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mask_iou_bounds.py"
spec = importlib.util.spec_from_file_location("mask_iou_bounds", SCRIPT)
bounds_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bounds_script)


@pytest.fixture(scope="module")
def edits():
    return heldout_edits(50)


def test_changed_pixels_are_the_whole_ground_truth_of_a_colour_edit_and_part_of_a_shape_edit(edits):
    for edit in edits:
        changed = bounds_script.changed_pixels(edit)
        assert not (changed & ~edit.edit_mask).any()            # nothing changes outside old | new
        if edit.kind == "colour":
            assert np.array_equal(changed, edit.edit_mask)
        else:
            assert changed.sum() < edit.edit_mask.sum()
            assert mask_iou(changed, edit.edit_mask) == pytest.approx(changed.sum() / edit.edit_mask.sum())


def test_a_latent_map_keeps_a_full_mask_and_an_empty_one():
    full, empty = np.ones((64, 64), bool), np.zeros((64, 64), bool)
    assert bounds_script.through_latent_map(full, 16).all() and not bounds_script.through_latent_map(empty, 16).any()
    square = np.zeros((64, 64), bool)
    square[16:32, 16:32] = True          # aligned with the 4-px cells: a binary map, resized nearest: kept
    assert np.array_equal(bounds_script.through_latent_map(square, 16), square)
    off = np.zeros((64, 64), bool)
    off[18:34, 18:34] = True             # off the cells: a soft map, upsampled bilinearly: corners rounded
    seen = bounds_script.through_latent_map(off, 16)
    assert seen[20:32, 20:32].all() and not seen[18, 18] and 0.9 < mask_iou(seen, off) < 1.0


def test_the_bounds_quoted_in_the_readme(edits):
    table = bounds_script.bounds(edits, 16)
    assert table["changed pixels"]["colour"] == 1.0
    assert table["changed pixels"]["shape"] == pytest.approx(0.325, abs=5e-4)
    assert table["changed pixels"]["all"] == pytest.approx(0.663, abs=5e-4)
    assert table["changed pixels, 16x16 map"]["all"] == pytest.approx(0.566, abs=5e-4)
    assert table["ground truth, 16x16 map"]["all"] == pytest.approx(0.959, abs=5e-4)
    assert table["changed pixels, 16x16 map"]["all"] < 0.65 < table["ground truth, 16x16 map"]["all"]


def test_false_positives_of_a_model_are_split_without_overlap(edits):
    # the --model path on the embedded model, 4 edits (2 colour, 2 shape): the three places of the
    # predicted pixels outside the ground truth add up to all of them
    model = Path(__file__).resolve().parents[1] / "weights" / "shapes-64"
    counts = bounds_script.false_positives(edits[:4], str(model))
    assert set(counts) == {"colour", "shape"}
    for outside, near, on_others, elsewhere, predicted in counts.values():
        assert predicted > 0 and 0 <= outside <= predicted
        assert near + on_others + elsewhere == outside


@pytest.mark.parametrize("argument", [["--edits", "0"], ["--cells", "-3"], ["--edits", "x"]])
def test_bad_counts_are_one_sentence_and_status_2(argument, capsys):
    with pytest.raises(SystemExit) as stop:
        bounds_script.main(argument)
    assert stop.value.code == 2 and "is not a whole number of at least 1" in capsys.readouterr().err
