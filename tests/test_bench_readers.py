"""The benchmark readers of diffedit/research/benchmarks/ on small data sets this file writes:
a mini ImageNet in both layouts with a mini FlexIT query list, a mini PIE-Bench with run-length
masks drawn here (the border quirk both ways), pairs files in CSV and JSONL. Each reader must
give the rows its protocol defines: their number, prompts, masks and protocol fields; and one
sentence for what is missing or refused. No model runs here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.errors import ParameterError
from diffedit.research.benchmarks import read_benchmark
from diffedit.research.benchmarks.common import subset
from diffedit.research.benchmarks.imagenet import QUERIES, read_imagenet, read_queries
from diffedit.research.benchmarks.pairs import read_pairs
from diffedit.research.benchmarks.pie_bench import EDIT_TYPES, decode_mask, read_pie_bench, strip_markers

# ---------------------------------------------------------------------- mini ImageNet

MINI_QUERIES = [  # row id, wnid, val number, source, source_id, target, target_id, is_test
    (11, "n02088364", 1, "beagle", 162, "Afghan hound", 160, True),
    (12, "n02088364", 2, "beagle", 162, "tabby, tabby cat", 281, False),
    (13, "n02123045", 3, "tabby, tabby cat", 281, "beagle", 162, True),
    (14, "n01443537", 4, "goldfish, Carassius auratus", 1, "beagle", 162, True),
    (15, "n01443537", 5, "goldfish, Carassius auratus", 1, "tabby, tabby cat", 281, False),
]


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def picture(seed: int, size=(40, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def mini_imagenet(tmp_path) -> dict:
    """The query list and both layouts of the same five validation images."""
    queries = tmp_path / "queries.csv"
    with open(queries, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "path", "source", "source_id", "target", "target_id", "is_test"])
        for row_id, wnid, number, *rest, is_test in MINI_QUERIES:
            writer.writerow([row_id, f"{wnid}/{val_name(number)}", *rest, str(is_test)])
    folders, flat = tmp_path / "val", tmp_path / "flat"
    flat.mkdir()
    for _, wnid, number, *_ in MINI_QUERIES:
        (folders / wnid).mkdir(parents=True, exist_ok=True)
        picture(number).save(folders / wnid / val_name(number), format="JPEG", quality=95)
        picture(number).save(flat / val_name(number), format="JPEG", quality=95)
    return {"queries": queries, "folders": folders, "flat": flat}


def test_the_shipped_query_list_is_flexits_two_splits():
    test, dev = read_queries("test"), read_queries("dev")
    assert len(test) == len(dev) == 1092
    for split in (test, dev):
        targets = [r["target_id"] for r in split]
        assert len(set(targets)) == 273 and all(targets.count(t) == 4 for t in set(targets))
    assert not {r["id"] for r in test} & {r["id"] for r in dev}
    assert (QUERIES.parent / "README.md").read_text().count("MIT License") == 1


@pytest.mark.parametrize("split, ids", [("test", [11, 13, 14]), ("dev", [12, 15])])
def test_imagenet_class_folders_give_the_split_with_bare_class_names(mini_imagenet, split, ids):
    bench = read_imagenet(mini_imagenet["folders"], split=split, queries=mini_imagenet["queries"])
    expected = [q for q in MINI_QUERIES if q[0] in ids]
    assert [it.id for it in bench.items] == [f"flexit-{i}" for i in ids]
    assert [(it.source, it.target) for it in bench.items] == [(q[3], q[5]) for q in expected]
    assert [(i["wnid"], i["source_id"], i["target_id"]) for i in bench.info] == [(q[1], q[4], q[6]) for q in expected]
    assert all(it.gt_mask is None and it.image.size == (40, 32) for it in bench.items)
    assert bench.protocol["template"] == "{}" and bench.protocol["split"] == split
    assert bench.protocol["layout"] == "class-folder"


def test_imagenet_template_makes_both_prompts(mini_imagenet):
    bench = read_imagenet(mini_imagenet["folders"], template="a photo of a {}", queries=mini_imagenet["queries"])
    assert (bench.items[0].source, bench.items[0].target) == ("a photo of a beagle", "a photo of a Afghan hound")
    assert bench.protocol["template"] == "a photo of a {}"
    with pytest.raises(ParameterError, match="exactly once"):
        read_imagenet(mini_imagenet["folders"], template="a photo", queries=mini_imagenet["queries"])


def test_imagenet_flat_layout_reads_the_ground_truth_both_ways(mini_imagenet):
    flat, queries = mini_imagenet["flat"], mini_imagenet["queries"]
    reference = read_imagenet(mini_imagenet["folders"], queries=queries)
    with pytest.raises(ParameterError, match="no ground-truth file"):
        read_imagenet(flat, queries=queries)
    wnids = {number: wnid for _, wnid, number, *_ in MINI_QUERIES}
    (flat / "imagenet_2012_validation_synset_labels.txt").write_text("".join(f"{wnids[n]}\n" for n in range(1, 6)))
    lines = read_imagenet(flat, queries=queries)
    (flat / "imagenet_2012_validation_synset_labels.txt").unlink()
    (flat / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},{wnids[n]} 1 2 3 4 \n" for n in range(1, 6)))
    kaggle = read_imagenet(flat, queries=queries)
    for bench in (lines, kaggle):
        assert bench.protocol["layout"] == "flat"
        assert [(it.id, it.source, it.target) for it in bench.items] == \
               [(it.id, it.source, it.target) for it in reference.items]
        assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
                   for a, b in zip(bench.items, reference.items))
    (flat / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},n09999999 1 2 3 4\n" for n in range(1, 6)))
    with pytest.raises(ParameterError, match="the ground truth gives ILSVRC2012_val_00000001.JPEG the class n09999999"):
        read_imagenet(flat, queries=queries)


def test_imagenet_missing_folder_and_image_are_one_sentence_each(mini_imagenet, tmp_path):
    with pytest.raises(ParameterError, match=r"does not exist; ImageNet's validation images come from image-net"):
        read_imagenet(tmp_path / "nowhere", queries=mini_imagenet["queries"])
    (mini_imagenet["folders"] / "n02123045" / val_name(3)).unlink()
    with pytest.raises(ParameterError, match=r"ILSVRC2012_val_00000003.JPEG is missing \(read as the class-folder"):
        read_imagenet(mini_imagenet["folders"], queries=mini_imagenet["queries"])
    with pytest.raises(ParameterError, match="--split must be test or dev"):
        read_queries("train")


def test_limit_draws_a_seeded_subset_in_protocol_order(mini_imagenet):
    rows = list(range(100))
    assert subset(rows, 10, 3) == subset(rows, 10, 3) == sorted(subset(rows, 10, 3))
    assert subset(rows, 10, 3) != subset(rows, 10, 4) and subset(rows, None) == rows == subset(rows, 500)
    with pytest.raises(ParameterError, match="--limit must be a whole number"):
        subset(rows, 0)
    two = read_imagenet(mini_imagenet["folders"], limit=2, seed=1, queries=mini_imagenet["queries"])
    assert [it.id for it in two.items] == [f"flexit-{[11, 13, 14][i]}" for i in subset([0, 1, 2], 2, 1)]


# ---------------------------------------------------------------------- mini PIE-Bench

def encode_runs(mask: np.ndarray) -> list[int]:
    """(start, length) pairs of the 1 pixels of the row-major flattened mask (how PIE-Bench stores it)."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    return [int(v) for start, end in zip(edges[0::2], edges[1::2]) for v in (start, end - start)]


def benchmark_mask_decode(encoded_mask, image_shape=(512, 512)):
    """PIE-Bench's own decoder (evaluation/evaluate.py of cure-lab/PnPInversion), transcribed."""
    length = image_shape[0] * image_shape[1]
    mask_array = np.zeros((length,))
    for i in range(0, len(encoded_mask), 2):
        splice_len = min(encoded_mask[i + 1], length - encoded_mask[i])
        for j in range(splice_len):
            mask_array[encoded_mask[i] + j] = 1
    mask_array = mask_array.reshape(image_shape[0], image_shape[1])
    mask_array[0, :] = 1
    mask_array[-1, :] = 1
    mask_array[:, 0] = 1
    mask_array[:, -1] = 1
    return mask_array


def drawn_mask(top, left, height, width) -> np.ndarray:
    mask = np.zeros((512, 512), dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


PIE_ROWS = {  # image id -> (edit type, rectangle, prompts)
    "000000000001": ("0", (100, 50, 30, 200), "a [cat] sitting on a mat", "a [dog] sitting on a mat"),
    "111000000002": ("6", (0, 0, 512, 40), "a red [car]", "a [blue] car"),
    "222000000003": ("9", (300, 400, 212, 112), "a photo of a house", "a [watercolor painting] of a house"),
}


@pytest.fixture
def mini_pie(tmp_path) -> Path:
    root = tmp_path / "PIE-Bench"
    mapping = {}
    for n, (key, (kind, rect, original, edited)) in enumerate(PIE_ROWS.items()):
        relative = f"{kind}_type/{key}.jpg"
        (root / "annotation_images" / f"{kind}_type").mkdir(parents=True, exist_ok=True)
        picture(n, (512, 512)).save(root / "annotation_images" / relative, quality=95)
        mapping[key] = {"image_path": relative, "original_prompt": original, "editing_prompt": edited,
                        "editing_instruction": "do it", "editing_type_id": kind, "blended_word": "x y",
                        "mask": encode_runs(drawn_mask(*rect))}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


@pytest.mark.parametrize("quirk", [True, False])
def test_pie_bench_rows_prompts_masks_and_edit_types(mini_pie, quirk):
    bench = read_pie_bench(mini_pie, border_quirk=quirk)
    assert [it.id for it in bench.items] == [f"pie-{k}" for k in PIE_ROWS]
    for item, info, (key, (kind, rect, original, edited)) in zip(bench.items, bench.info, PIE_ROWS.items()):
        assert (item.source, item.target) == (original.replace("[", "").replace("]", ""), edited.replace("[", "")
                                              .replace("]", ""))
        assert "[" not in item.source + item.target
        assert info["edit_type_id"] == kind and info["edit_type"] == EDIT_TYPES[kind]
        drawn = drawn_mask(*rect)
        border = np.zeros_like(drawn)
        border[[0, -1], :] = border[:, [0, -1]] = True
        assert np.array_equal(item.gt_mask, drawn | border if quirk else drawn)
        if quirk:   # exactly the benchmark's own decoder
            assert np.array_equal(item.gt_mask, benchmark_mask_decode(encode_runs(drawn)).astype(bool))
    assert bench.protocol["border_quirk"] is quirk


def test_pie_bench_decoder_cuts_runs_at_the_image_end_as_the_benchmark_does():
    runs = [512 * 512 - 10, 100, 5, 3]
    assert np.array_equal(decode_mask(runs), benchmark_mask_decode(runs).astype(bool))
    assert decode_mask(runs, border_quirk=False).sum() == 13
    assert strip_markers("a [blue] [car]") == "a blue car"
    with pytest.raises(ParameterError, match="pairs of whole numbers"):
        decode_mask([1, 2, 3])


def test_pie_bench_missing_files_and_wrong_sizes_are_one_sentence(mini_pie, tmp_path):
    with pytest.raises(ParameterError, match=r"mapping_file.json is missing: a PIE-Bench folder holds .*request form"):
        read_pie_bench(tmp_path / "empty")
    picture(0, (64, 64)).save(mini_pie / "annotation_images" / "0_type" / "000000000001.jpg")
    with pytest.raises(ParameterError, match="is 64x64, not 512x512"):
        read_pie_bench(mini_pie)


def test_read_benchmark_dispatches_with_limit(mini_pie):
    bench = read_benchmark({"benchmark": "pie-bench", "data": str(mini_pie), "border_quirk": False, "limit": 2,
                            "subset_seed": 5})
    assert len(bench.items) == 2 and not bench.items[0].gt_mask[0].all()
    with pytest.raises(ParameterError, match="unknown benchmark 'coco'"):
        read_benchmark({"benchmark": "coco"})


# ---------------------------------------------------------------------- pairs files

@pytest.fixture
def pairs_folder(tmp_path) -> Path:
    folder = tmp_path / "pairs"
    (folder / "img").mkdir(parents=True)
    for n in range(3):
        picture(n, (48, 32)).save(folder / "img" / f"p{n}.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:20, 10:30] = 255
    Image.fromarray(mask).save(folder / "img" / "m0.png")
    return folder


ROWS = [{"image": "img/p0.png", "source": "a cat", "target": "a dog", "mask": "img/m0.png", "id": "cat-dog"},
        {"image": "img/p1.png", "source": "", "target": "a bowl of pears"},
        {"image": "img/p2.png", "source": "a car", "target": "a red car"}]


def write_pairs(folder: Path, kind: str, rows: list[dict]) -> Path:
    path = folder / f"pairs.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "source", "target", "mask", "id"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_pairs_rows_paths_and_masks(pairs_folder, kind):
    bench = read_pairs(write_pairs(pairs_folder, kind, ROWS))
    assert [it.id for it in bench.items] == ["cat-dog", "0002-p1", "0003-p2"]
    assert [(it.source, it.target) for it in bench.items] == [(r["source"], r["target"]) for r in ROWS]
    expected = np.zeros((32, 48), dtype=bool)
    expected[8:20, 10:30] = True
    assert np.array_equal(bench.items[0].gt_mask, expected)
    assert bench.items[1].gt_mask is None and bench.items[2].gt_mask is None
    assert np.array_equal(np.asarray(bench.items[2].image), np.asarray(picture(2, (48, 32))))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("escape", ["../outside.png", "img/../../outside.png", "/etc/hostname"])
def test_pairs_paths_escaping_the_folder_are_refused(pairs_folder, kind, escape):
    picture(9).save(pairs_folder.parent / "outside.png")
    for column in ("image", "mask"):
        rows = [{**ROWS[0], column: escape}]
        with pytest.raises(ParameterError, match=rf"the {column} of row 1 of pairs.{kind} .* points outside"):
            read_pairs(write_pairs(pairs_folder, kind, rows))


def test_pairs_file_refusals_are_one_sentence(pairs_folder):
    with pytest.raises(ParameterError, match="does not exist; write a CSV or JSONL"):
        read_pairs(pairs_folder / "none.csv")
    with pytest.raises(ParameterError, match="needs 'image', 'source' and a non-empty 'target'"):
        read_pairs(write_pairs(pairs_folder, "jsonl", [{"image": "img/p0.png", "source": "a"}]))
    with pytest.raises(ParameterError, match="repeats item ids"):
        read_pairs(write_pairs(pairs_folder, "jsonl", [ROWS[0], ROWS[0]]))
    (pairs_folder / "pairs.txt").write_text("x")
    with pytest.raises(ParameterError, match="must end in .csv or .jsonl"):
        read_pairs(pairs_folder / "pairs.txt")
