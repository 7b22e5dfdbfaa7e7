"""`diffedit bench stats` and `diffedit bench score` end to end on a mini ImageNet (FlexIT's
queries, pictures the test writes), with the copy baseline (no diffusion model): LPIPS 0, L1 0,
CLIPScore of the input, and SFID / CSFID equal to the features' means computed here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import picture, write_masked_pairs

from diffedit.cli import main
from diffedit.research.benchmarks.common import subset
from diffedit.research.benchmarks.imagenet import read_queries
from diffedit.research.scores import networks, sets
from diffedit.research.scores.perceptual import CLIPScorer


@pytest.fixture(scope="module")
def bench(tmp_path_factory, metric_weights):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mini-imagenet")
    queries = read_queries("test")
    drawn = subset(queries, 4, 3)
    for n, q in enumerate(drawn):
        (root / "val" / q["path"]).parent.mkdir(parents=True, exist_ok=True)
        picture(n, (96, 80)).save(root / "val" / q["path"], format="JPEG")
    wnid = {r["source_id"]: r["path"].split("/")[0] for r in queries}
    train = {wnid[q["target_id"]] for q in drawn} | {"n00000001"}     # the last: not a FlexIT class
    for k, w in enumerate(sorted(train)):
        for i in range(2):
            (root / "train" / w).mkdir(parents=True, exist_ok=True)
            picture(50 + 2 * k + i, (90, 70)).save(root / "train" / w / f"{w}_{i}.JPEG", format="JPEG")
    out = root / "out"
    assert main(["bench", "imagenet", "--data", str(root / "val"), "--out", str(out), "--limit", "4",
                 "--subset-seed", "3", "--methods", "copy", "--quiet"]) == 0
    assert main(["bench", "stats", str(root / "train"), "--out", str(root / "stats.safetensors"),
                 "--metric-weights", str(metric_weights), "--quiet"]) == 0
    assert main(["bench", "score", str(out), "--metrics", "lpips", "l1", "clip_score", "fid", "sfid", "csfid",
                 "--stats", str(root / "stats.safetensors"), "--metric-weights", str(metric_weights)]) == 0
    return root, out, drawn, wnid


def test_the_copy_baseline_scores_lpips_and_l1_zero_and_the_inputs_clipscore(bench, metric_weights):
    root, out, drawn, _ = bench
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["item"] for r in rows] == [f"flexit-{q['id']}" for q in drawn]
    assert all(r["method"] == "copy" and r["lpips"] == 0.0 and r["l1"] == 0.0 for r in rows)
    listing = {it["id"]: it for it in json.loads((out / "benchmark.json").read_text())["items"]}
    scorer = CLIPScorer(*networks.clip("openai/clip-vit-large-patch14", metric_weights), "clip")
    from PIL import Image
    for r in rows:
        image = Image.open(out / "images" / r["item"] / "input.png").convert("RGB")
        assert r["clip_score"] == pytest.approx(scorer(image, listing[r["item"]]["target"]), rel=1e-6)


def test_stats_keep_flexit_classes_per_class_and_every_class_globally(bench):
    root, _, drawn, _ = bench
    stats, about = sets.load_statistics(root / "stats.safetensors")
    targets = sorted({q["target_id"] for q in drawn})
    assert stats["class_index"].tolist() == targets and stats["class_count"].tolist() == [2] * len(targets)
    assert int(stats["count"]) == 2 * (len(targets) + 1) and about["images"] == int(stats["count"])
    assert "torchmetrics" in about["libraries"]


def test_summary_sets_scores_equal_the_features_by_hand(bench, metric_weights):
    from PIL import Image
    root, out, drawn, wnid = bench
    stats, _ = sets.load_statistics(root / "stats.safetensors")
    inception = networks.inception(metric_weights)
    images = [Image.open(out / "images" / f"flexit-{q['id']}" / "input.png").convert("RGB") for q in drawn]
    f = sets.features(inception, images).numpy()
    summary = json.loads((out / "summary.json").read_text())
    copy = next(s for s in summary["summary"] if s["method"] == "copy")
    assert copy["lpips"] == 0.0 and copy["items"] == 4
    assert copy["sfid"] == pytest.approx(((f.mean(0) - stats["mean"].numpy()) ** 2).sum(), rel=1e-9)
    row = {c: i for i, c in enumerate(stats["class_index"].tolist())}
    per_class = []
    for c in sorted({q["target_id"] for q in drawn}):
        members = f[[i for i, q in enumerate(drawn) if q["target_id"] == c]]
        per_class.append(((members.mean(0) - stats["class_mean"][row[c]].numpy()) ** 2).sum())
    assert copy["csfid"] == pytest.approx(sum(per_class) / len(per_class), rel=1e-9)
    assert copy["fid"] > 0
    info = summary["metric_info"]
    assert set(info) >= {"lpips", "l1", "clip_score", "fid", "sfid", "csfid"}
    assert all({"backbone", "resolution", "range", "libraries"} <= set(v) for v in info.values())
    assert "not an FID" in info["sfid"]["backbone"] and info["lpips"]["libraries"]["torchmetrics"]
    assert (out / "summary.csv").read_text().splitlines()[0].count("csfid") == 1


def test_score_refuses_what_it_cannot_compute(bench, capsys, tmp_path):
    _, out, _, _ = bench
    assert main(["bench", "score", str(out), "--metrics", "fid"]) == 2
    assert "--stats FILE" in capsys.readouterr().err
    assert main(["bench", "score", str(tmp_path)]) == 2
    assert "no finished bench folder" in capsys.readouterr().err


def test_masked_scores_of_a_pairs_file_with_masks(tmp_path, metric_weights):
    """A pairs file with masks, copy baseline: the background is untouched under both definitions,
    and clip_edited is CLIPScore of the input times the mask."""
    import numpy as np
    from PIL import Image

    from diffedit.research.scores.masked import clip_edited
    write_masked_pairs(tmp_path, 20, bottom=24, right=40, step=10)
    out = tmp_path / "out"
    assert main(["bench", "pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--methods", "copy",
                 "--quiet"]) == 0
    assert main(["bench", "score", str(out), "--metrics", "lpips", "background", "clip_edited",
                 "--metric-weights", str(metric_weights)]) == 0
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    scorer = CLIPScorer(*networks.clip("openai/clip-vit-large-patch14", metric_weights), "clip")
    for i, r in enumerate(scored):
        assert r["lpips"] == 0 and r["bg_mse_gt"] == 0 and r["bg_lpips_gt"] == 0 and r["bg_mse_pie"] == 0
        assert r["bg_ssim_pie"] == pytest.approx(1.0) and r["bg_psnr_pie"] > 100
        image = Image.open(tmp_path / f"in-{i}.png").convert("RGB")
        mask = np.asarray(Image.open(tmp_path / f"mask-{i}.png")) > 0
        assert r["clip_edited"] == pytest.approx(clip_edited(scorer, image, mask, "a dog"), rel=1e-6)
    info = json.loads((out / "summary.json").read_text())["metric_info"]
    assert "background" in info and "clip_edited" in info
    assert main(["bench", "score", str(out), "--metrics", "csfid", "--stats", "x"]) == 2
