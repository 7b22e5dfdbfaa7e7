"""DeiT accuracy and the DINO structure distance end to end through `diffedit bench score`, and
the background LPIPS of a pairs file with masks: a mini ImageNet (FlexIT's queries, pictures the
test writes) and a pairs file, edited by SDEdit on the embedded model (weights/shapes-64, 4 steps)
next to the copy baseline, then scored; every column equals the library called directly on the
same saved pictures.

The networks are timm's real classes (VisionTransformerDistilled for deit_base_distilled_patch16_384,
VisionTransformer for vit_base_patch8_224.dino) with random weights, saved under the file names of
diffedit/research/scores/weights.py. They are built in a small configuration (1 block, width 32,
2 heads; patch size and input size unchanged): measured on this 2-core CPU at one thread, the
full-size pair made this test take over 60 s (DeiT-B 384 ~4 s and ViT-B/8 ~2 s a picture, plus
~5 s to build each and ~700 MB of weights to write and read), so `timm.create_model` is wrapped,
during the scoring only, to pass that configuration to the same classes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import picture
from PIL import Image
from safetensors.torch import save_file

from diffedit.cli import main
from diffedit.research.benchmarks.common import subset
from diffedit.research.benchmarks.imagenet import read_queries
from diffedit.research.scores import networks, structure, weights
from diffedit.research.scores.accuracy import target_classes

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}
EDIT = ["--methods", "sdedit", "copy", "--strengths", "0.7", "--steps", "4", "--mask-samples", "1", "--quiet"]


def tiny_networks(folder):
    """Random tiny DeiT and DINO (the library's classes), saved as a user provides them."""
    import timm
    torch.manual_seed(0)
    deit = timm.create_model(networks.DEIT_NAME, pretrained=False, **TINY).eval()
    dino = timm.create_model(structure.DINO_NAME, pretrained=False, num_classes=0, dynamic_img_size=True,
                             **TINY).eval()
    for name, net in (("deit", deit), ("dino", dino)):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / weights.FILES[name][0][0]))
    return deit, dino


def score_with_tiny_networks(arguments: list[str]) -> int:
    """`diffedit bench score ...` with timm building the tiny configuration of the two networks."""
    import timm
    create = timm.create_model

    def tiny(name, *args, **kwargs):
        return create(name, *args, **{**kwargs, **TINY} if name in (networks.DEIT_NAME, structure.DINO_NAME)
                      else kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm, "create_model", tiny)
        return main(["bench", "score", *arguments])


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deit-dino")
    drawn = subset(read_queries("test"), 3, 11)
    for n, q in enumerate(drawn):
        (root / "val" / q["path"]).parent.mkdir(parents=True, exist_ok=True)
        picture(30 + n, (96, 80)).save(root / "val" / q["path"], format="JPEG")
    out, folder = root / "out", root / "weights"
    folder.mkdir()
    assert main(["bench", "imagenet", "--data", str(root / "val"), "--out", str(out), "--limit", "3",
                 "--subset-seed", "11", *EDIT]) == 0
    deit, dino = tiny_networks(folder)
    assert score_with_tiny_networks([str(out), "--metrics", "deit", "structure", "--metric-weights",
                                     str(folder)]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return out, rows, deit, dino


def edit_and_input(out, row) -> tuple[Image.Image, Image.Image]:
    image = next(r["image"] for r in [*map(json.loads, (out / "results.jsonl").read_text().splitlines()),
                                      *map(json.loads, (out / "copy.jsonl").read_text().splitlines())]
                 if r["item"] == row["item"] and (r.get("key") or f"copy-{r['item']}") == row["key"])
    return (Image.open(out / image).convert("RGB"), Image.open(out / "images" / row["item"] / "input.png").convert("RGB"))


def deit_class_by_hand(deit, image: Image.Image) -> int:
    """torchvision's Resize(384) + CenterCrop(384) + ImageNet normalisation, timm's DeiT, the
    argmax over the target classes."""
    from torchvision import transforms
    x = transforms.Compose([transforms.Resize(384), transforms.CenterCrop(384), transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    with torch.no_grad():
        logits = deit(x[None])[0]
    classes = torch.tensor(target_classes())
    return int(classes[logits[classes].argmax()])


def self_similarity_by_hand(dino, image: Image.Image) -> torch.Tensor:
    from torchvision import transforms
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    x = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        transforms.Resize(224, max_size=480, antialias=False)(pixels))[None]
    x = x[..., :x.shape[-2] // 8 * 8, :x.shape[-1] // 8 * 8]          # what DINO's patch convolution reads
    found = []
    hook = dino.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: found.append(o))
    with torch.no_grad():
        dino(x)
    hook.remove()
    keys = F.normalize(found[0][0, :, TINY["embed_dim"]:2 * TINY["embed_dim"]], dim=-1)
    return keys @ keys.T


def test_deit_and_structure_columns_equal_the_library_on_the_saved_pictures(scored):
    out, rows, deit, dino = scored
    listing = {it["id"]: it for it in json.loads((out / "benchmark.json").read_text())["items"]}
    assert sorted(r["method"] for r in rows) == ["copy"] * 3 + ["sdedit"] * 3
    for row in rows:
        edited, original = edit_and_input(out, row)
        item = listing[row["item"]]
        c = deit_class_by_hand(deit, edited)
        assert row["deit_class"] == c
        assert (row["deit_correct"], row["deit_unedited"], row["deit_wrong"]) == (
            float(c == item["target_id"]), float(c == item["source_id"]), float(c not in (item["target_id"],
                                                                                          item["source_id"])))
        expected = float(F.mse_loss(self_similarity_by_hand(dino, edited), self_similarity_by_hand(dino, original)))
        assert row["structure"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert (row["structure"] == 0) == (row["method"] == "copy")


def test_the_summary_has_the_means_of_the_new_columns(scored):
    out, rows, _, _ = scored
    summary = json.loads((out / "summary.json").read_text())
    for entry in summary["summary"]:
        members = [r for r in rows if r["method"] == entry["method"] and r["strength"] == entry["strength"]]
        for column in ("deit_correct", "deit_unedited", "deit_wrong", "structure"):
            assert entry[column] == pytest.approx(np.mean([m[column] for m in members]))
        assert entry["deit_correct"] + entry["deit_unedited"] + entry["deit_wrong"] == pytest.approx(1.0)
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"deit_correct", "deit_unedited", "deit_wrong", "structure"} <= set(header)
    assert "deit_class" not in header
    info = summary["metric_info"]
    assert "384" in info["deit"]["resolution"] and "0..255" in info["structure"]["resolution"]
    assert info["deit"]["libraries"]["timm"]


def test_background_lpips_is_pie_benchs_squeeze_whatever_lpips_net_says(tmp_path, metric_weights, monkeypatch):
    """`--lpips-net alex` sets the `lpips` column's backbone; bg_lpips_pie stays PIE-Bench's
    LearnedPerceptualImagePatchSimilarity(net_type='squeeze') on both pictures x (1 - mask)."""
    import torchvision
    from safetensors.torch import load_file
    from test_scores_lpips import library_lpips

    from diffedit.research.scores.masked import as_tensor, keep_of
    from diffedit.research.scores.perceptual import flexit_crop
    rows = []
    for i in range(2):
        picture(40 + i, (64, 48)).save(tmp_path / f"in-{i}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 12:44] = 255
        Image.fromarray(mask).save(tmp_path / f"mask-{i}.png")
        rows.append({"image": f"in-{i}.png", "mask": f"mask-{i}.png", "source": "a cat", "target": "a dog"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["bench", "pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out), *EDIT]) == 0
    assert main(["bench", "score", str(out), "--metrics", "lpips", "background", "--lpips-net", "alex",
                 "--metric-weights", str(metric_weights)]) == 0
    backbones = {}
    for net, build in (("squeeze", torchvision.models.squeezenet1_1), ("alex", torchvision.models.alexnet)):
        model = build(weights=None)
        model.load_state_dict(load_file(str(metric_weights / weights.FILES[net][0][0])), strict=False)
        backbones[net] = library_lpips(monkeypatch, net, model)
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    edits = [r for r in scored if r["method"] == "sdedit"]
    assert len(edits) == 2
    for row in edits:
        edited, original = edit_and_input(out, row)
        keep = keep_of(Image.open(out / "images" / row["item"] / "gt_mask.png"), original.size)
        x, y = as_tensor(edited) * keep, as_tensor(original) * keep
        squeeze = 100 * float(backbones["squeeze"](x, y))
        assert row["bg_lpips_pie"] == pytest.approx(squeeze, rel=1e-5)
        assert row["bg_lpips_pie"] != pytest.approx(100 * float(backbones["alex"](x, y)), rel=1e-3)
        assert row["lpips"] == pytest.approx(100 * float(backbones["alex"](flexit_crop(edited),
                                                                           flexit_crop(original))), rel=1e-5)
