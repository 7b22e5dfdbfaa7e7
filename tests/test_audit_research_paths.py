"""Audit fixes in the readers of result files (research/figures.py, scores/command.py, report.py):
a path read from a row or an item list that leaves its folder (absolute, '..', a symbolic link
out) is refused in one sentence, pictures go through the guarded loader (a decompression bomb is
an ImageInputError), masks load without pickles, and a summary with a malformed method or r is
one sentence, not a traceback."""

import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.cli import main
from diffedit.errors import ImageInputError, ParameterError
from diffedit.research import figures as F
from diffedit.research.table import ITEMS_NAME, RESULTS


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header announcing width x height pixels (no pixel data): Pillow refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def sweep_folder(root: Path, image: str = "images/a/edit.png", mask_file: str = "masks/a/m.npz",
                 item_input: str = "images/a/input.png") -> Path:
    """A hand-made sweep folder of one item and one row, its paths as given; a picture outside it."""
    folder = root / "sweep"
    (folder / "images" / "a").mkdir(parents=True)
    (folder / "masks" / "a").mkdir(parents=True)
    picture = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    for name in ("edit.png", "input.png"):
        picture.save(folder / "images" / "a" / name)
    picture.save(root / "outside.png")
    np.savez(folder / "masks" / "a" / "m.npz", soft=np.zeros((2, 2), np.float32), difference=np.zeros((2, 2)))
    np.savez(root / "outside.npz", soft=np.zeros((2, 2), np.float32), difference=np.zeros((2, 2)))
    row = {"key": "k", "item": "a", "strength": 0.5, "threshold": 0.5, "ablation": "none", "image": image,
           "mask_file": mask_file}
    (folder / RESULTS).write_text(json.dumps(row) + "\n")
    (folder / ITEMS_NAME).write_text(json.dumps([{"id": "a", "source": "x", "target": "y", "size": [16, 16],
                                                  "input": item_input}]))
    return folder


def link_out(root: Path) -> str:
    os.symlink(root / "outside.png", root / "sweep" / "images" / "a" / "link.png")
    return "images/a/link.png"


ESCAPES = [("dot-dot", lambda root: "../outside.png"), ("absolute", lambda root: str(root / "outside.png")),
           ("symbolic link", link_out)]


@pytest.mark.parametrize("name, escape", ESCAPES, ids=[c[0] for c in ESCAPES])
@pytest.mark.parametrize("field", ["image", "input"])
def test_figures_refuse_pictures_outside_the_sweep(tmp_path, name, escape, field):
    folder = sweep_folder(tmp_path)
    relative = escape(tmp_path)
    if field == "image":    # a row's edit, drawn by the image grid
        row = json.loads((folder / RESULTS).read_text())
        (folder / RESULTS).write_text(json.dumps({**row, "image": relative}) + "\n")
    else:                   # an item's input, drawn by the mask overlays
        items = json.loads((folder / ITEMS_NAME).read_text())
        (folder / ITEMS_NAME).write_text(json.dumps([{**items[0], "input": relative}]))
    draw = F.image_grid if field == "image" else F.mask_overlays
    with pytest.raises(ParameterError, match="points outside") as refused:
        draw(folder, out=tmp_path / "figure.png")
    assert "\n" not in str(refused.value) and not (tmp_path / "figure.png").exists()


def test_figures_refuse_a_mask_outside_and_a_mask_with_pickles(tmp_path):
    with pytest.raises(ParameterError, match="points outside"):
        F.mask_overlays(sweep_folder(tmp_path / "a", mask_file="../outside.npz"), out=tmp_path / "m.png")
    with pytest.raises(ParameterError, match="points outside"):
        F.difference_maps(sweep_folder(tmp_path / "b", mask_file="../outside.npz"), item="a", out=tmp_path / "d.png")
    folder = sweep_folder(tmp_path / "c")
    np.savez(folder / "masks" / "a" / "m.npz", soft=np.array([{"code": 1}], dtype=object), difference=np.zeros(2))
    with pytest.raises(ParameterError, match="not a saved mask"):
        F.mask_overlays(folder, out=tmp_path / "m.png")


def test_figures_load_pictures_through_the_guarded_loader(tmp_path):
    folder = sweep_folder(tmp_path)
    (folder / "images" / "a" / "edit.png").write_bytes(png_declaring(60000, 60000))
    with pytest.raises(ImageInputError, match="decompression-bomb"):
        F.image_grid(folder, out=tmp_path / "g.png")


def bench_folder(root: Path, image: str, item: str = "a") -> Path:
    folder = sweep_folder(root, image=image)
    rows = [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]
    (folder / RESULTS).write_text(json.dumps({**rows[0], "item": item}) + "\n")
    (folder / "benchmark.json").write_text(json.dumps({"items": [{"id": "a", "source": "x", "target": "y"}]}))
    (folder / "summary.json").write_text(json.dumps({"benchmark": "pairs", "methods": ["diffedit"], "summary": [
        {"method": "diffedit", "strength": 0.5, "items": 1}]}))
    return folder


def test_bench_score_refuses_paths_outside_the_bench_folder(tmp_path, monkeypatch):
    from diffedit.research.scores import perceptual
    from diffedit.research.scores.command import score_folder
    monkeypatch.setattr(perceptual, "l1", lambda edited, original: 0.0)   # torchmetrics is in the eval extra
    with pytest.raises(ParameterError, match="points outside"):
        score_folder(bench_folder(tmp_path / "a", "../outside.png"), metrics=["l1"])
    with pytest.raises(ParameterError, match="points outside"):
        score_folder(bench_folder(tmp_path / "b", "images/a/edit.png", item="../../.."), metrics=["l1"])
    folder = bench_folder(tmp_path / "c", "images/a/edit.png")
    (folder / "images" / "a" / "edit.png").write_bytes(png_declaring(60000, 60000))
    with pytest.raises(ImageInputError, match="decompression-bomb"):
        score_folder(folder, metrics=["l1"])
    written = score_folder(bench_folder(tmp_path / "d", "images/a/edit.png"), metrics=["l1"])
    assert json.loads(written[0].read_text())["l1"] == 0.0          # an intact folder is still scored


def test_bench_score_names_a_copy_line_that_is_not_json(tmp_path, monkeypatch):
    from diffedit.research.scores import perceptual
    from diffedit.research.scores.command import score_folder
    monkeypatch.setattr(perceptual, "l1", lambda edited, original: 0.0)
    folder = bench_folder(tmp_path / "a", "images/a/edit.png")
    (folder / "copy.jsonl").write_text('{"item": "a", "image": "images/a/edit.png"}\n{not json\n')
    with pytest.raises(ParameterError, match=r"line 2 of .*copy.jsonl is not JSON"):
        score_folder(folder, metrics=["l1"])


@pytest.mark.parametrize("row, words", [
    ({"method": "diffedit", "strength": "0.5"}, "row 1 of the summary .* no number as its strength"),
    ({"method": "diffedit"}, "row 1 of the summary .* no number as its strength"),
    ({"method": ["diffedit"], "strength": 0.5}, "row 1 of the summary .* method that is not a name"),
])
def test_a_malformed_summary_is_one_sentence(tmp_path, capsys, row, words):
    (tmp_path / "summary.json").write_text(json.dumps({"benchmark": "pairs", "methods": ["diffedit"],
                                                       "summary": [{**row, "items": 1, "l1": 0.1, "lpips": 0.2}]}))
    assert main(["bench", "report", str(tmp_path), "--pair", "l1", "lpips"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(words, err), err
