"""`--device` of `diffedit bench score` and `diffedit bench stats`: the metric networks are moved
there once after they are built, and each scorer sends its inputs to the device of its module's
parameters and brings back floats and CPU tensors.

There is no GPU here, so the CUDA path itself cannot be run. What these tests pin instead:
`--device cpu` writes the same bytes as no --device (scores, summaries, reference statistics)
and records the device in metric_info; a device torch cannot use ("cuda" without CUDA, a
malformed or unsupported name) is one sentence and exit status 2 before any network is built;
and every scorer's inputs reach every submodule of its network on the device of that network's
parameters (forward pre-hooks on the submodules), which is the code path a CUDA module takes.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import picture, write_masked_pairs
from test_scores_networks_bench import (
    EDIT,
    TINY,
    score_with_tiny_networks,
    tiny_networks,
)

from diffedit.cli import main
from diffedit.research.benchmarks.common import subset
from diffedit.research.benchmarks.imagenet import read_queries
from diffedit.research.scores import networks, sets, structure
from diffedit.research.scores.accuracy import DeiTAccuracy
from diffedit.research.scores.masked import background_scores, clip_edited
from diffedit.research.scores.networks import device_of
from diffedit.research.scores.perceptual import LPIPS, CLIPScorer
from diffedit.research.scores.structure import StructureDistance

OUTPUTS = ("scores.jsonl", "summary.json", "summary.csv")
# fid left out: its compute (~4 s a group here, two 2048 x 2048 float64 matrix square roots) runs on the
# CPU whatever --device says, from the same Inception features as sfid and csfid
IMAGENET_METRICS = ["lpips", "l1", "clip_score", "sfid", "csfid", "deit", "structure"]
PAIRS_METRICS = ["lpips", "l1", "clip_score", "background", "clip_edited", "structure"]


@pytest.fixture(scope="module")
def benches(tmp_path_factory, metric_weights):
    """A mini ImageNet bench and a pairs bench with masks (SDEdit on the embedded model next to the
    copy baseline), the target classes' train pictures, and one weights folder with every network
    (the session's LPIPS, Inception and CLIP, and a tiny DeiT and DINO)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("device")
    weights = root / "weights"
    shutil.copytree(metric_weights, weights)
    tiny_networks(weights)
    queries = read_queries("test")
    drawn = subset(queries, 2, 5)
    wnid = {r["source_id"]: r["path"].split("/")[0] for split in ("test", "dev") for r in read_queries(split)}
    for n, q in enumerate(drawn):
        (root / "val" / q["path"]).parent.mkdir(parents=True, exist_ok=True)
        picture(60 + n, (96, 80)).save(root / "val" / q["path"], format="JPEG")
    for n, w in enumerate(sorted({wnid[q["target_id"]] for q in drawn} | {"n00000001"})):   # the last: no FlexIT class
        (root / "train" / w).mkdir(parents=True)
        picture(70 + n, (90, 70)).save(root / "train" / w / f"{w}_0.JPEG", format="JPEG")
    assert main(["bench", "imagenet", "--data", str(root / "val"), "--out", str(root / "imagenet"), "--limit", "2",
                 "--subset-seed", "5", *EDIT]) == 0
    pairs = write_masked_pairs(root, 80, bottom=30, right=44, step=8)
    assert main(["bench", "pairs", str(pairs), "--out", str(root / "pairs"), *EDIT]) == 0
    return root, weights


def score_twice(root, bench: str, arguments: list[str]) -> tuple:
    """Score copies of one bench folder without --device and with --device cpu."""
    folders = []
    for name, device in (("default", []), ("cpu", ["--device", "cpu"])):
        folder = root / f"{bench}-{name}"
        shutil.copytree(root / bench, folder)
        assert score_with_tiny_networks([str(folder), *arguments, *device]) == 0
        folders.append(folder)
    return tuple(folders)


def test_device_cpu_writes_the_same_statistics_and_scores_as_no_device(benches):
    root, weights = benches
    for name, device in (("default", []), ("cpu", ["--device", "cpu"])):
        assert main(["bench", "stats", str(root / "train"), "--out", str(root / f"stats-{name}.safetensors"),
                     "--metric-weights", str(weights), "--quiet", *device]) == 0
    assert (root / "stats-default.safetensors").read_bytes() == (root / "stats-cpu.safetensors").read_bytes()
    assert sets.load_statistics(root / "stats-cpu.safetensors")[1]["device"] == "cpu"
    for bench, metrics, extra in (("imagenet", IMAGENET_METRICS, ["--stats", str(root / "stats-cpu.safetensors")]),
                                  ("pairs", PAIRS_METRICS, [])):
        default, cpu = score_twice(root, bench, ["--metrics", *metrics, "--metric-weights", str(weights), *extra])
        for name in OUTPUTS:
            assert (default / name).read_bytes() == (cpu / name).read_bytes(), (bench, name)
        summary = json.loads((cpu / "summary.json").read_text())
        assert all(summary["metric_info"][m]["device"] == "cpu" for m in metrics)
        scored = [json.loads(line) for line in (cpu / "scores.jsonl").read_text().splitlines()]
        edits = [s for s in scored if s["method"] == "sdedit"]
        assert edits and all(s["lpips"] > 0 and s["structure"] > 0 for s in edits)   # not only the copy's zeros
        if bench == "imagenet":
            assert all(e[m] > 0 for e in summary["summary"] for m in ("sfid", "csfid"))
        else:
            assert all(s["bg_mse_gt"] > 0 for s in edits)


def no_network_may_be_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a metric network was built before the device was checked")
    for owner, builder in ((networks, "lpips"), (networks, "clip"), (networks, "inception"), (networks, "deit"),
                           (structure, "dino")):
        monkeypatch.setattr(owner, builder, refuse)


def refused(capsys, monkeypatch, arguments: list[str]) -> str:
    """The one line `diffedit bench ...` prints when it exits with status 2, no network built."""
    no_network_may_be_built(monkeypatch)
    capsys.readouterr()
    assert main(["bench", *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(".")
    return lines[0]


def commands(root, weights, device: str) -> list[list[str]]:
    """`bench score` and `bench stats` whose only problem is `device`."""
    return [["score", str(root / "imagenet"), "--metrics", "lpips", "l1", "clip_score", "deit", "structure",
             "--metric-weights", str(weights), "--device", device],
            ["stats", str(root / "train"), "--out", str(root / "refused.safetensors"), "--metric-weights",
             str(weights), "--quiet", "--device", device]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is accepted here")
def test_cuda_without_a_cuda_device_is_one_sentence_and_exit_2(benches, capsys, monkeypatch):
    root, weights = benches
    for arguments in commands(root, weights, "cuda"):
        assert "CUDA was asked for but this machine has no CUDA device" in refused(capsys, monkeypatch, arguments)
    assert not (root / "imagenet" / "scores.jsonl").exists() and not (root / "refused.safetensors").exists()


@pytest.mark.parametrize("device, said", [("nonsense", "unknown device 'nonsense'"), ("cuda:x", "unknown device"),
                                          ("meta", "device 'meta' is not supported")])
def test_a_device_torch_cannot_use_is_one_sentence_and_exit_2(benches, capsys, monkeypatch, device, said):
    root, weights = benches
    for arguments in commands(root, weights, device):
        assert said in refused(capsys, monkeypatch, arguments)
    assert not (root / "imagenet" / "scores.jsonl").exists() and not (root / "refused.safetensors").exists()


def test_the_device_is_read_from_the_modules_parameters_or_buffers():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert device_of(torch.nn.BatchNorm2d(2, affine=False, device="meta")) == torch.device("meta")   # buffers only
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


@contextmanager
def input_devices(module: torch.nn.Module):
    """The devices of the tensors every submodule of `module` is called with, while inside."""
    seen: list[torch.device] = []

    def record(_module, args, kwargs):
        seen.extend(t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in module.modules()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def assert_inputs_reach_it_on_its_device(module: torch.nn.Module, score) -> None:
    """`score()` runs the scorer; every tensor any submodule received was on the module's device."""
    with input_devices(module) as seen:
        result = score()
    assert seen and set(seen) == {device_of(module)}
    for value in (result.values() if isinstance(result, dict) else [result]):
        assert isinstance(value, (int, float)) or value.device == torch.device("cpu")


def test_each_scorer_sends_its_inputs_to_its_modules_device(benches, metric_weights):
    """The CUDA path itself cannot be run here (no GPU): on the CPU, the only device, this pins the
    path a CUDA module takes -- every submodule receives its inputs on the device of the module's
    parameters, and the results come back as floats or CPU tensors."""
    _, weights = benches
    edited, original = picture(90, (64, 48)), picture(91, (64, 48))
    mask = np.zeros((48, 64), bool)
    mask[10:30, 12:40] = True
    alex, squeeze = networks.lpips("alex", metric_weights), networks.lpips("squeeze", metric_weights)
    assert_inputs_reach_it_on_its_device(alex, lambda: LPIPS(alex, "alex")(edited, original))
    assert_inputs_reach_it_on_its_device(squeeze, lambda: background_scores(edited, original, mask, squeeze))
    model, processor = networks.clip("openai/clip-vit-large-patch14", metric_weights)
    clip = CLIPScorer(model, processor, "clip")
    assert_inputs_reach_it_on_its_device(model, lambda: clip(edited, "a dog"))
    assert_inputs_reach_it_on_its_device(model, lambda: clip_edited(clip, edited, mask, "a dog"))
    inception = networks.inception(metric_weights)
    assert_inputs_reach_it_on_its_device(inception, lambda: sets.features(inception, [edited]))
    deit = networks.deit(weights, **TINY)
    assert_inputs_reach_it_on_its_device(deit, lambda: DeiTAccuracy(deit)(edited, 1, 2))
    dino = structure.dino(weights, **TINY)
    assert_inputs_reach_it_on_its_device(dino, lambda: StructureDistance(dino)(edited, original))
    assert_inputs_reach_it_on_its_device(dino, lambda: StructureDistance(dino).self_similarity(edited))
