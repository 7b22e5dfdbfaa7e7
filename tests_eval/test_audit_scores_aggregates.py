"""Audit of `bench score` / `bench stats` (research/scores/command.py, sets.py): what the summary
averages, and what is refused before the long work instead of after it.

  - an edit whose score is undefined (NaN: no background) no longer makes its group's mean NaN;
    the mean is over the edits that define it, as `diffedit bench`'s own summary;
  - a group of one edit gets its SFID / CSFID (defined for one picture, as FlexIT computes them),
    and FID, which needs two, is NaN instead of a missing column;
  - reference statistics without a target class are refused before any edit is scored (CSFID
    raised after every edit of a 13-18 h run was scored, and wrote nothing);
  - a folder as `bench stats --out` is one sentence before the Inception network is built (a
    safetensors traceback after every train picture's features); a train picture that cannot be
    read is named as such (the message said to re-run `diffedit bench`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import picture
from PIL import Image

from diffedit.cli import main
from diffedit.research.benchmarks.common import subset
from diffedit.research.benchmarks.imagenet import read_queries
from diffedit.research.scores import networks, sets


def _copy_summary(out):
    return next(s for s in json.loads((out / "summary.json").read_text())["summary"] if s["method"] == "copy")


def test_an_edit_without_background_leaves_the_other_edits_mean(tmp_path, metric_weights):
    rows = []
    for i in range(2):
        picture(30 + i, (64, 48)).save(tmp_path / f"in-{i}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[8:24, 10:40] = 255
        if i == 1:
            mask[:] = 255                              # the whole picture: no background to score
        Image.fromarray(mask).save(tmp_path / f"mask-{i}.png")
        rows.append({"image": f"in-{i}.png", "mask": f"mask-{i}.png", "source": "a cat", "target": "a dog"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["bench", "pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--methods", "copy",
                 "--quiet"]) == 0
    assert main(["bench", "score", str(out), "--metrics", "background", "--metric-weights", str(metric_weights)]) == 0
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert np.isnan(scored[1]["bg_mse_gt"]) and scored[0]["bg_mse_gt"] == 0.0
    copy = _copy_summary(out)
    for name in ("bg_mse_gt", "bg_lpips_gt", "bg_mse_pie", "bg_lpips_pie", "bg_ssim_pie"):
        assert copy[name] == pytest.approx(scored[0][name]), name


@pytest.fixture(scope="module")
def one_item(tmp_path_factory):
    """A copy-only imagenet bench folder of one item and its query."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("one-item")
    query = subset(read_queries("test"), 1, 5)[0]
    (root / "val" / query["path"]).parent.mkdir(parents=True)
    picture(7, (96, 80)).save(root / "val" / query["path"], format="JPEG")
    assert main(["bench", "imagenet", "--data", str(root / "val"), "--out", str(root / "out"), "--limit", "1",
                 "--subset-seed", "5", "--methods", "copy", "--quiet"]) == 0
    return root, query


def _statistics(path, classes):
    acc = sets.Accumulator()
    acc.add(torch.randn(2 * len(classes) + 2, sets.FEATURES, generator=torch.Generator().manual_seed(0)),
            [c for c in classes for _ in range(2)] + [-1, -1])
    acc.class_sum.pop(-1), acc.class_count.pop(-1)
    return sets.save_statistics(acc.statistics(), path, {"test": True})


def test_a_group_of_one_edit_gets_sfid_and_csfid_and_fid_nan(one_item, metric_weights):
    root, query = one_item
    stats_path = _statistics(root / "stats.safetensors", [query["target_id"]])
    assert main(["bench", "score", str(root / "out"), "--metrics", "fid", "sfid", "csfid", "--stats",
                 str(stats_path), "--metric-weights", str(metric_weights)]) == 0
    stats, _ = sets.load_statistics(stats_path)
    edit = Image.open(root / "out" / "images" / f"flexit-{query['id']}" / "input.png").convert("RGB")
    f = sets.features(networks.inception(metric_weights), [edit])
    copy = _copy_summary(root / "out")
    assert copy["items"] == 1 and np.isnan(copy["fid"])
    assert copy["sfid"] == pytest.approx(sets.sfid(f, stats), rel=1e-9)
    assert copy["csfid"] == pytest.approx(float((f[0] - stats["class_mean"][0].double()).square().sum()), rel=1e-9)


def test_statistics_without_a_target_class_are_refused_before_scoring(one_item, metric_weights, monkeypatch,
                                                                      capsys):
    root, query = one_item
    stats_path = _statistics(root / "other-classes.safetensors", [query["target_id"] + 1])

    def never(*args, **kwargs):
        raise AssertionError("an edit was scored before the statistics were checked")
    monkeypatch.setattr(sets, "features", never)
    assert main(["bench", "score", str(root / "out"), "--metrics", "csfid", "--stats", str(stats_path),
                 "--metric-weights", str(metric_weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no images of class {query['target_id']}" in err and "\n" not in err


def _train_folder(root):
    (root / "train" / "n01440764").mkdir(parents=True)
    for i in range(2):
        picture(60 + i, (90, 70)).save(root / "train" / "n01440764" / f"a{i}.JPEG", format="JPEG")
    return root / "train"


def test_stats_refuse_a_folder_as_out_before_building_the_network(tmp_path, monkeypatch, capsys):
    train = _train_folder(tmp_path)
    (tmp_path / "taken").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("the network was built before --out was checked")
    monkeypatch.setattr(networks, "inception", never)
    assert main(["bench", "stats", str(train), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder" in err and "\n" not in err


def test_stats_overwrite_their_file_and_name_an_unreadable_train_picture(tmp_path, metric_weights, capsys):
    train = _train_folder(tmp_path)
    out = tmp_path / "new" / "stats.safetensors"
    assert main(["bench", "stats", str(train), "--out", str(out), "--metric-weights", str(metric_weights),
                 "--quiet"]) == 0
    assert int(sets.load_statistics(out)[0]["count"]) == 2 and [p.name for p in out.parent.iterdir()] == [out.name]
    (train / "n01440764" / "a0.JPEG").write_bytes(b"not a picture")
    assert main(["bench", "stats", str(train), "--out", str(out), "--metric-weights", str(metric_weights),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train picture" in err and "a0.JPEG" in err and "diffedit bench" not in err
    assert int(sets.load_statistics(out)[0]["count"]) == 2
