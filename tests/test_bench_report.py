"""`diffedit bench report DIR` on a real bench run of the embedded model (weights/shapes-64, a pairs
file of 2 shapes edits, 4 steps, n = 2, r in {0.5, 1.0}): the trade-off figures and the image
grids have their stated pixel sizes, axes say name, unit and direction (figures.LABELS), grid rows
say "source -> target", report.md has the copy row first and one row per (method, r), the paper's
pairs are drawn when their columns exist, and a folder without a summary is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.cli import main
from diffedit.research import figures as F
from diffedit.research import report as R

FAST = ["--steps", "4", "--mask-samples", "2", "--quiet"]
METHODS = ["diffedit", "sdedit", "copy"]
STRENGTHS = [0.5, 1.0]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """A finished `diffedit bench pairs` run over a pairs file of 2 shapes edits with masks."""
    from diffedit.shapes.world import heldout_edits
    data = tmp_path_factory.mktemp("pairs")
    rows = []
    for i, e in enumerate(heldout_edits(2)):
        Image.fromarray(e.source_image).save(data / f"input-{i}.png")
        Image.fromarray(e.edit_mask.astype(np.uint8) * 255).save(data / f"mask-{i}.png")
        rows.append({"id": f"item-{i}", "image": f"input-{i}.png", "mask": f"mask-{i}.png",
                     "source": e.source_caption, "target": e.target_caption})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", "pairs", str(data / "pairs.jsonl"), "--out", str(out), "--methods", *METHODS,
                     "--strengths", *map(str, STRENGTHS), *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """Every figure saved by figures._save, by file name (to read its axes and texts)."""
    figures, save = {}, F._save

    def record(fig, path, overwrite):
        figures[Path(path).name] = fig
        return save(fig, path, overwrite)
    monkeypatch.setattr(F, "_save", record)
    return figures


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_report_draws_the_figures_and_writes_the_table(bench_dir, drawn, capsys):
    assert main(["bench", "report", str(bench_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    # today's metrics of a pairs file: background PSNR against mask IoU (the paper's pairs need LPIPS...)
    tradeoff = bench_dir / "figures" / "tradeoff-bg_psnr_gt-vs-mask_iou.png"
    assert _size(tradeoff) == (640, 480)
    ax = drawn[tradeoff.name].axes[0]
    assert ax.get_xlabel() == "mask IoU with the ground truth (0-1), higher = better mask"
    assert ax.get_ylabel() == "background PSNR (dB), higher = closer to the input"
    assert [line.get_label() for line in ax.get_lines()] == ["DiffEdit"]          # SDEdit has no mask
    assert sorted(t.get_text() for t in ax.texts) == ["r=0.5", "r=1.0"]
    # one image grid per model method: the input + 2 values of r, 2 items, 128-pixel cells
    items = json.loads((bench_dir / "items.json").read_text())
    for method in ("diffedit", "sdedit"):
        grid = bench_dir / "figures" / f"grid-{method}.png"
        assert _size(grid) == (3 * 128, F.HEADER + 2 * 128)
        texts = [t.get_text().replace("\n", " ") for t in drawn[grid.name].texts]
        for item in items:
            assert f"{item['source']} -> {item['target']}" in texts
        assert not any(item["id"] in texts for item in items)
    # report.md: the copy row first, then one row per (method, r)
    lines = (bench_dir / "report.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith(("| method", "| ---"))]
    assert [row.split(" | ")[:3] for row in table] == [
        ["| copy (output = input)", "-", "2"], ["| DiffEdit", "0.5", "2"], ["| DiffEdit", "1", "2"],
        ["| SDEdit", "0.5", "2"], ["| SDEdit", "1", "2"]]
    header = next(line for line in lines if line.startswith("| method"))
    assert "background PSNR (dB)" in header and "bg_psnr_gt" not in header
    assert "- `bg_psnr_gt`: background PSNR (dB), higher = closer to the input" in lines
    assert f"![{tradeoff.stem}](figures/{tradeoff.name})" in lines
    copy = table[0].split(" | ")
    summary = json.loads((bench_dir / "summary.json").read_text())["summary"]
    psnr = R.columns(summary).index("bg_psnr_gt")
    assert copy[3 + psnr] == "100"                                                 # the input against itself


def test_asked_pairs_draw_the_copy_point_and_sweep_curves_use_the_labels(bench_dir, drawn, tmp_path):
    assert main(["bench", "report", str(bench_dir), "--pair", "bg_ssim_gt", "bg_psnr_gt"]) == 0
    ax = drawn["tradeoff-bg_psnr_gt-vs-bg_ssim_gt.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["DiffEdit", "SDEdit", "copy (output = input)"]
    assert tuple(lines["copy (output = input)"].get_xydata()[0]) == pytest.approx((1.0, 100.0))
    assert ax.get_xlabel() == "background SSIM (0-1), higher = closer to the input"
    # a bench folder is a sweep folder: the sweep's own trade-off curve names its axes the same way
    path = F.tradeoff_curve(bench_dir, "mask_area", "bg_psnr_gt", by="ablation", out=tmp_path / "t.png",
                            size=(500, 300))
    assert _size(path) == (500, 300)
    ax = drawn["t.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == (F.axis_label("mask_area"), F.axis_label("bg_psnr_gt"))
    assert ax.get_xlabel() == "DiffEdit's mask area (fraction)"


def test_the_paper_pairs_are_drawn_when_their_metrics_exist(tmp_path, drawn):
    summary = [{"method": m, "strength": r, "items": 4, "lpips": lp, "clip_score": cs, "fid": 30 + lp,
                "csfid": 60 - lp, "sfid": 1.0}
               for m, r, lp, cs in (("diffedit", 0.4, 10.0, 26.0), ("diffedit", 0.8, 25.0, 29.0),
                                    ("sdedit", 0.4, 30.0, 26.5), ("sdedit", 0.8, 60.0, 29.5))]
    summary.append({"method": "copy", "strength": None, "items": 4, "lpips": 0.0, "clip_score": 24.3, "fid": 20.0,
                    "csfid": 106.0, "sfid": 0.2})
    (tmp_path / "summary.json").write_text(json.dumps({"benchmark": "imagenet", "methods": ["diffedit", "sdedit",
                                                                                            "copy"],
                                                       "summary": summary}))
    written = R.write_report(tmp_path)
    assert [p.name for p in written] == ["tradeoff-clip_score-vs-lpips.png", "tradeoff-csfid-vs-lpips.png",
                                         "tradeoff-fid-vs-lpips.png", "report.md"]
    ax = drawn["tradeoff-clip_score-vs-lpips.png"].axes[0]
    assert ax.get_xlabel() == "LPIPS x100, lower = closer to the input"
    assert ax.get_ylabel() == "CLIPScore (100 x cosine), higher = closer to the target text"
    assert tuple(ax.get_lines()[-1].get_xydata()[0]) == (0.0, 24.3)                # the copy anchor
    assert "FID" in drawn["tradeoff-fid-vs-lpips.png"].axes[0].get_ylabel()
    assert "CSFID" in drawn["tradeoff-csfid-vs-lpips.png"].axes[0].get_ylabel()
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | r | items | LPIPS x100 | CLIPScore (100 x cosine) | FID")
    assert rows[2].startswith("| copy (output = input) | - | 4 | 0 | 24.3 | 20 | 106 | 0.2 |")
    assert len(rows) == 2 + 5


def test_refusals_are_one_line_with_status_2(bench_dir, tmp_path, capsys):
    cases = [(["bench", "report", str(tmp_path)], "no bench summary"),
             (["bench", "report"], "needs the bench folder"),
             (["bench", "report", str(bench_dir), "--pair", "lpips", "bg_psnr_gt"], "lpips is not a metric"),
             (["bench", "pairs", "x.csv", "--pair", "a", "b"], "--pair is an option of")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "figures").exists()
