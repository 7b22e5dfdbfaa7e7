"""What the item readers (research/plan.py's manifest, research/benchmarks/) do with data an audit
found mishandled: a resume on changed data is refused (the items' digest is the sweep's
identity), CSV fields keep their newlines, equal prompts / wrong types / deep JSON / a BOM /
a folder given as a file are refused or read when the items are read, in one sentence naming
the file and the entry, and items hold their files' paths instead of their pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference_models import TINY
from test_bench_readers import PIE_ROWS, ROWS, mini_pie, pairs_folder, picture, write_pairs  # noqa: F401 (fixtures)

from diffedit.cli import main
from diffedit.errors import DiffEditError, OutputFileError, ParameterError, PromptError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research.benchmarks.imagenet import read_imagenet
from diffedit.research.benchmarks.pairs import read_pairs
from diffedit.research.benchmarks.pie_bench import read_pie_bench
from diffedit.research import plan
from diffedit.research.plan import SweepConfig, load_items
from diffedit.research.sweep import run_sweep

DEEP = "[" * 100000 + "]" * 100000


def manifest_folder(folder: Path, entries: list[dict], kind: str = "json", bom: bool = False) -> Path:
    """FOLDER with two pictures and a manifest of `entries`."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(2):
        picture(n, (48, 32)).save(folder / f"p{n}.png")
    prefix = "\ufeff" if bom else ""
    if kind == "json":
        (folder / "manifest.json").write_text(prefix + json.dumps(entries), encoding="utf-8")
    else:
        with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            f.write(prefix)
            writer = csv.DictWriter(f, fieldnames=["image", "source", "target"])
            writer.writeheader()
            writer.writerows(entries)
    return folder


ENTRIES = [{"image": "p0.png", "source": "a cat", "target": "a dog"},
           {"image": "p1.png", "source": "a car", "target": "a red car"}]


# ---------------------------------------------------------------------- 1. resuming on changed data

def test_a_sweep_resumed_on_changed_prompts_or_pictures_is_refused(tiny_model_folder, tmp_path):
    data = manifest_folder(tmp_path / "data", ENTRIES[:1])
    config = {"items": {"folder": str(data)}, "grid": {**TINY, "strength": 0.5}}
    pipe = DiffEditPipeline.from_pretrained(tiny_model_folder)
    assert run_sweep(config, tmp_path / "out", pipe=pipe, bar=False).ran == 1
    assert run_sweep(config, tmp_path / "out", pipe=pipe, bar=False).skipped == 1   # unchanged: resumes
    (data / "manifest.json").write_text(json.dumps([{**ENTRIES[0], "target": "a horse"}]))
    with pytest.raises(OutputFileError, match="another items; choose another output folder"):
        run_sweep(config, tmp_path / "out", pipe=pipe, bar=False)
    (data / "manifest.json").write_text(json.dumps(ENTRIES[:1]))
    picture(7, (48, 32)).save(data / "p0.png")
    with pytest.raises(OutputFileError, match="another items; choose another output folder"):
        run_sweep(config, tmp_path / "out", pipe=pipe, bar=False)


def test_the_items_digest_follows_prompts_pictures_and_masks(pairs_folder):
    path = write_pairs(pairs_folder, "jsonl", ROWS)
    digest = plan.items_digest(read_pairs(path).items)
    assert plan.items_digest(read_pairs(path).items) == digest
    picture(5, (48, 32)).save(pairs_folder / "img" / "p2.png")
    assert plan.items_digest(read_pairs(path).items) != digest
    picture(2, (48, 32)).save(pairs_folder / "img" / "p2.png")
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(pairs_folder / "img" / "m0.png")
    assert plan.items_digest(read_pairs(path).items) != digest
    config = SweepConfig.parse({"items": {"folder": str(manifest_folder(pairs_folder / "m", ENTRIES))}})
    digest = plan.items_digest(load_items(config.items))
    assert config.identity()["items"] == config.as_dict()["items"] == {**config.items, "digest": digest}


def test_a_bench_resumed_on_changed_files_is_refused(pairs_folder, tmp_path, capsys):
    argv = ["bench", "pairs", str(write_pairs(pairs_folder, "csv", ROWS)), "--methods", "copy", "--quiet",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert main(argv) == 0
    picture(5, (48, 32)).save(pairs_folder / "img" / "p1.png")
    capsys.readouterr()
    assert main(argv) == 2
    assert "pictures or masks changed since" in capsys.readouterr().err


# ---------------------------------------------------------------------- 2, 7, 8. reading the files

def test_pairs_csv_fields_keep_newlines_and_separators(pairs_folder):
    target = "a red\ncircle\u2028with \x1c marks\r\nand more"
    bench = read_pairs(write_pairs(pairs_folder, "csv", [{**ROWS[2], "target": target}]))
    assert bench.items[0].target == target
    line = json.dumps({**ROWS[2], "target": "a red\u2028car"}, ensure_ascii=False) + "\n"
    (pairs_folder / "raw.jsonl").write_text(line, encoding="utf-8")
    assert read_pairs(pairs_folder / "raw.jsonl").items[0].target == "a red\u2028car"


def test_a_byte_order_mark_is_read_as_none(pairs_folder, tmp_path):
    path = write_pairs(pairs_folder, "csv", ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [it.target for it in read_pairs(path).items] == [r["target"] for r in ROWS]
    for kind in ("json", "csv"):
        folder = manifest_folder(tmp_path / kind, ENTRIES, kind, bom=True)
        assert [it.target for it in load_items({"folder": str(folder)})] == ["a dog", "a red car"]


def test_a_folder_given_as_the_pairs_file_is_named_a_folder(pairs_folder):
    with pytest.raises(ParameterError, match="is a folder, not a pairs file"):
        read_pairs(pairs_folder)


# ---------------------------------------------------------------------- 3, 5, 6. entries refused when read

@pytest.mark.parametrize("source, target", [("a dog", "a dog"), ("A  Dog", "a dog ")])
def test_equal_prompts_are_refused_when_read(pairs_folder, tmp_path, source, target):
    for kind in ("csv", "jsonl"):
        with pytest.raises(PromptError, match=rf"row 2 of pairs.{kind} \(.*\): the source and target prompts read "
                                              "the same"):
            read_pairs(write_pairs(pairs_folder, kind, [ROWS[0], {**ROWS[2], "source": source, "target": target}]))
    folder = manifest_folder(tmp_path / "m", [ENTRIES[0], {**ENTRIES[1], "source": source, "target": target}])
    with pytest.raises(PromptError, match="manifest entry 1 in .*: the source and target prompts read the same"):
        load_items({"folder": str(folder)})


@pytest.mark.parametrize("field, value", [("source", 0), ("target", False), ("source", False), ("target", 0),
                                          ("mask", 0), ("image", 5), ("source", ["a"])])
def test_prompts_and_paths_that_are_not_text_are_refused_when_read(pairs_folder, tmp_path, field, value):
    with pytest.raises(ParameterError, match="row 3 of pairs.jsonl( needs|: image, source)"):
        read_pairs(write_pairs(pairs_folder, "jsonl", [*ROWS[:2], {**ROWS[2], field: value}]))
    field = "gt_mask" if field == "mask" else field
    folder = manifest_folder(tmp_path / "m", [ENTRIES[0], {**ENTRIES[1], field: value}])
    with pytest.raises(ParameterError, match="manifest entry 1 in .*( needs|: image, gt_mask)"):
        load_items({"folder": str(folder)})


def test_save_images_must_be_a_boolean():
    with pytest.raises(ParameterError, match='"save_images" must be true or false'):
        SweepConfig.parse({"items": {"benchmark": "shapes", "count": 1}, "save_images": "false"})
    assert SweepConfig.parse({"items": {"benchmark": "shapes", "count": 1}, "save_images": False}).save_images is False


def test_a_csv_row_longer_than_its_header_is_refused(pairs_folder):
    path = pairs_folder / "extra.csv"
    path.write_text("image,source,target,colour\nimg/p0.png,a cat,a dog,red,extra\n")
    with pytest.raises(ParameterError, match="row 1 of extra.csv has more fields than the header"):
        read_pairs(path)


@pytest.mark.parametrize("field, value, words", [
    ("image_path", 5, "must be text"), ("original_prompt", None, "must be text"),
    ("editing_prompt", ["a", "b"], "must be text"), ("mask", 5, "pairs of whole numbers"),
    ("mask", None, "pairs of whole numbers")])
def test_pie_bench_fields_of_the_wrong_type_are_one_sentence(mini_pie, field, value, words):
    path = mini_pie / "mapping_file.json"
    mapping = json.loads(path.read_text())
    key = list(PIE_ROWS)[1]
    mapping[key][field] = value
    path.write_text(json.dumps(mapping))
    with pytest.raises(ParameterError, match=rf"{key}.*mapping_file.json.*{words}"):
        read_pie_bench(mini_pie)


@pytest.mark.parametrize("prediction", ["", "x", "1 2 3"])
def test_imagenet_ground_truth_without_a_class_is_one_sentence(tmp_path, prediction):
    queries = tmp_path / "queries.csv"
    queries.write_text(",path,source,source_id,target,target_id,is_test\n"
                       "11,n02088364/ILSVRC2012_val_00000001.JPEG,beagle,162,tabby,281,True\n")
    root = tmp_path / "flat"
    root.mkdir()
    picture(1).save(root / "ILSVRC2012_val_00000001.JPEG", format="JPEG")
    (root / "LOC_val_solution.csv").write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{prediction}\n")
    with pytest.raises(ParameterError, match="line 2 of .*LOC_val_solution.csv .* has no class id"):
        read_imagenet(root, queries=queries)


# ---------------------------------------------------------------------- 4. deep JSON

def test_deeply_nested_json_is_one_sentence(pairs_folder, mini_pie, tmp_path):
    config = tmp_path / "sweep.json"
    config.write_text(DEEP)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "manifest.json").write_text(DEEP)
    (pairs_folder / "deep.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + DEEP + "\n")
    (mini_pie / "mapping_file.json").write_text(DEEP)
    for read, words in [(lambda: SweepConfig.parse(config), "sweep.json nests JSON"),
                        (lambda: load_items({"folder": str(folder)}), "manifest.json nests JSON"),
                        (lambda: read_pairs(pairs_folder / "deep.jsonl"), "line 2 of .*deep.jsonl nests JSON"),
                        (lambda: read_pie_bench(mini_pie), "mapping_file.json nests JSON")]:
        with pytest.raises(ParameterError, match=words):
            read()


# ---------------------------------------------------------------------- 9. items hold paths, not pixels

def test_items_hold_their_files_and_read_them_when_asked(pairs_folder, mini_pie, tmp_path):
    bench = read_pairs(write_pairs(pairs_folder, "csv", ROWS))
    assert all(isinstance(it.picture, Path) for it in bench.items) and callable(bench.items[0].truth)
    assert np.array_equal(np.asarray(bench.items[1].image), np.asarray(picture(1, (48, 32))))
    assert bench.items[0].gt_mask.shape == (32, 48)
    pie = read_pie_bench(mini_pie)
    assert all(isinstance(it.picture, Path) and callable(it.truth) for it in pie.items)
    assert pie.items[0].image.size == (512, 512) and pie.items[0].gt_mask.shape == (512, 512)
    items = load_items({"folder": str(manifest_folder(tmp_path / "m", ENTRIES))})
    assert all(isinstance(it.picture, Path) for it in items)
    Path(items[0].picture).write_bytes(b"broken")   # read again when asked, and checked then too
    with pytest.raises(DiffEditError, match="not an image"):
        items[0].image
