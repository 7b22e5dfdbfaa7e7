"""`others_kept` (diffedit/shapes/check.py): an edit that also repaints the objects it was not
asked to change is caught, and `diffedit eval shapes` reports it per run (diffedit/shapes/eval.py).

Before, success checked the edited object only and the scene's background PSNR left out every
object, so a colour edit that recoloured the whole scene scored as a faithful one."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from diffedit.shapes.check import check_edit, check_others, others_kept
from diffedit.shapes.eval import EvalReport, EvalSettings, summarise, write_report
from diffedit.shapes.world import (COLOURS, OBJECT_RGB, SHAPES, SceneObject, heldout_edits, object_mask,
                                   render_background)

N_EDITS = 60


@pytest.fixture(scope="module")
def edits():
    return heldout_edits(N_EDITS)


def _repaint_others(edit, colour_of):
    """The ideal edit with every other object recoloured by `colour_of(object)`."""
    image = edit.target_image.copy()
    for j, obj in enumerate(edit.target.objects):
        if j != edit.object_index:
            image[object_mask(obj)] = OBJECT_RGB[colour_of(obj)]
    return image


def test_an_edit_that_recolours_another_object_is_not_others_kept(edits):
    """The brief's case: "the red circle becomes blue" also turning the other objects blue. The
    edited object still succeeds; others_kept is False and names the colour the others took."""
    recoloured = 0
    for e in edits:
        if e.kind != "colour" or len(e.source.objects) == 1:
            continue
        new = e.target_value
        painted = {obj: new if obj.colour != new else next(c for c in COLOURS if c != new) for obj in e.source.objects}
        image = _repaint_others(e, painted.get)
        assert check_edit(image, e).success            # what success alone measures: unchanged
        assert not others_kept(image, e)
        others = [o for j, o in enumerate(e.source.objects) if j != e.object_index]
        assert [c.colour for c in check_others(image, e)] == [painted[o] for o in others]
        recoloured += 1
    assert recoloured >= 10


def test_an_edit_that_reshapes_or_erases_another_object_is_not_others_kept(edits):
    for e in [e for e in edits if len(e.source.objects) > 1][:15]:
        j = next(j for j in range(len(e.source.objects)) if j != e.object_index)
        other = e.source.objects[j]
        reshaped = e.target_image.copy()
        reshaped[object_mask(other)] = render_background(e.target.background)[object_mask(other)]
        erased = reshaped.copy()
        for shape in SHAPES:   # another shape of the same colour, if it keeps the scene's pairs distinct
            if shape != other.shape:
                new = SceneObject(shape, other.colour, other.centre, other.size)
                reshaped[object_mask(new)] = OBJECT_RGB[other.colour]
                break
        assert not others_kept(reshaped, e) and not others_kept(erased, e)
        assert check_edit(reshaped, e).success and check_edit(erased, e).success


def test_a_faithful_edit_keeps_the_others(edits):
    """The ideal edit, also JPEG-compressed, and the untouched source keep every other object
    (shape edits included: the edited object's new outline is left out of the others' windows)."""
    for e in edits:
        buffer = io.BytesIO()
        Image.fromarray(e.target_image).save(buffer, "JPEG", quality=75)
        compressed = np.asarray(Image.open(buffer).convert("RGB"))
        assert others_kept(e.target_image, e) and others_kept(compressed, e) and others_kept(e.source_image, e)
        checks = check_others(e.target_image, e)
        others = [o for j, o in enumerate(e.source.objects) if j != e.object_index]
        assert [(c.colour, c.shape) for c in checks] == [(o.colour, o.shape) for o in others]


def test_a_one_object_scene_keeps_its_others(edits):
    e = next(e for e in edits if len(e.source.objects) == 1)
    assert check_others(e.target_image, e) == [] and others_kept(e.target_image, e)
    assert others_kept(e.source_image, e)   # vacuously: whatever happens to the only object


def _row(run, success, kept, objects, kind="colour"):
    row = {"run": run, "strength": 0.8, "threshold": 0.5, "ablation": "none" if run == "diffedit" else run,
           "mask_iou": 0.5, "bg_psnr_scene": 30.0, "success": success, "kind": kind, "objects": objects,
           "time_mask_s": 0.0, "time_inversion_s": 0.0, "time_edit_s": 0.0}
    if kept is not None:
        row["others_kept"] = kept
    return row


def test_the_summary_reports_others_kept_and_strict_success(tmp_path):
    """others_kept: mean over the edits whose scene has other objects; success_strict: success and
    others kept over every edit (a one-object scene's edit counts its success); success unchanged."""
    rows = [_row("no_mask", True, False, 3), _row("no_mask", True, True, 2),
            _row("no_mask", False, True, 2), _row("no_mask", True, True, 1)]
    s = summarise(rows, "no_mask")
    assert s["success"] == 0.75 and s["edits_with_others"] == 3
    assert s["others_kept"] == pytest.approx(2 / 3)
    assert s["success_strict"] == 0.5      # edits 2 and 4: edit 1 repainted another object
    report = EvalReport(EvalSettings(count=4), rows, [s], 0.0, 0.0)
    header, line = report.table().splitlines()
    assert header.split()[-2:] == ["others", "strict"] and line.split()[-2:] == ["0.67", "0.50"]
    csv_path, json_path = write_report(report, tmp_path)
    header, values = csv_path.read_text().splitlines()
    assert dict(zip(header.split(","), values.split(",")))["success_strict"] == "0.5"


def test_rows_written_before_the_measure_give_nan_not_a_partial_mean():
    """A folder resumed from rows that lack others_kept (the shapes items' identity has no digest,
    so such a folder resumes) reports NaN rather than a mean over the newer rows only."""
    rows = [_row("diffedit", True, None, 2), _row("diffedit", True, False, 2)]
    s = summarise(rows, "diffedit")
    assert s["success"] == 1.0 and math.isnan(s["others_kept"]) and math.isnan(s["success_strict"])
    one_object_only = summarise([_row("diffedit", True, True, 1)], "diffedit")
    assert math.isnan(one_object_only["others_kept"]) and one_object_only["success_strict"] == 1.0


def test_the_sweep_row_records_others_kept_of_the_edited_image(tiny_model_folder, tmp_path):
    """A shapes sweep's row holds others_kept, measured on the very image the run made (a random
    tiny model: whatever it paints, the row agrees with the checker on the saved picture)."""
    from reference_models import TINY

    from diffedit.pipeline import DiffEditPipeline
    from diffedit.research.sweep import run_sweep

    pipe = DiffEditPipeline.from_pretrained(tiny_model_folder)
    edits = heldout_edits(3)
    rows = run_sweep({"items": {"benchmark": "shapes", "count": 3}, "grid": {**TINY, "ablation": "no_mask"},
                      "save_images": True}, tmp_path, pipe=pipe, bar=False).rows
    assert len(rows) == 3
    for row, edit in zip(rows, edits):
        with Image.open(tmp_path / row["image"]) as picture:
            edited = np.asarray(picture.convert("RGB"))
        assert row["others_kept"] is others_kept(edited, edit)


def test_eval_shapes_on_a_folder_from_before_the_measure_says_so(tmp_path, capsys):
    """`diffedit eval shapes` resuming a folder whose rows lack others_kept (the shapes items carry
    no digest, so it resumes) prints NaN for the two new columns and says why, in one sentence."""
    import json

    from diffedit.cli import main
    from diffedit.research.table import read_rows, write_rows

    out = tmp_path / "ev"
    argv = ["eval", "shapes", "--count", "1", "--steps", "10", "--mask-samples", "2", "--quiet", "--no-tables",
            "--out", str(out)]
    assert main(argv) == 0
    rows = read_rows(out)
    assert all(isinstance(r["others_kept"], bool) for r in rows) and "predate" not in capsys.readouterr().out
    write_rows(out, [{k: v for k, v in r.items() if k != "others_kept"} for r in rows])   # as an older version wrote
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "predate the others_kept measure" in printed and "Traceback" not in printed
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert all(math.isnan(s["others_kept"]) and math.isnan(s["success_strict"]) for s in summary)
    assert [s["success"] for s in summary] == [float(r["success"]) for r in rows]
