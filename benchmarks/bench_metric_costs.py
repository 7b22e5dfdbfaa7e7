"""What `diffedit bench score` costs on the CPU: seconds per edited picture of each library metric,
the one-time cost of building each metric network, and the process's peak memory (a study, not a
test).

    .venv-eval/bin/python benchmarks/bench_metric_costs.py                    # 3 pictures, 3 repeats
    .venv-eval/bin/python benchmarks/bench_metric_costs.py --quick --threads 1 --keep /tmp/metric-weights

Every network is built at full size with random weights (nothing is downloaded) and saved, by a
child process, into a metric-weights folder under the names of diffedit/research/scores/weights.py: torchvision's AlexNet / VGG16 / SqueezeNet 1.1 and the FID
Inception (tests_eval/conftest.py's writers), timm's DeiT-B distilled 384 and DINO ViT-B/8, and a
transformers CLIPModel with openai/clip-vit-large-patch14's architecture and OpenAI's BPE
tokenizer. Two bench folders of 512 x 512 pictures are made with the copy baseline (no diffusion
model; the edit is the input, which costs the metrics the same): an `imagenet` one (FlexIT
queries) and a `pairs` one with ground-truth masks (PIE-Bench's per-edit metrics). Then the real
`score_folder` runs on them (a warm-up run, then --repeats runs), with the functions it calls
wrapped in timers: the network builders (timed once, then reused) and the per-edit scorers
(LPIPS, L1, CLIPScore, Inception features, DeiT, background scores, CLIP of the edited region,
DINO structure distance). A scorer called inside another (CLIPScore inside clip_edited) counts
for the outer one. The table gives the median seconds per picture over pictures x repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench_pipeline import cpu_name

from diffedit.cli import main as cli
from diffedit.research.scores import (
    command,
    masked,
    networks,
    perceptual,
    sets,
    structure,
    weights,
)
from diffedit.research.scores.accuracy import DeiTAccuracy

CLIP_NAME = "clip-vit-large-patch14"   # the folder the default --clip-model maps to
CLIP_L14 = {  # openai/clip-vit-large-patch14's config.json (architecture only)
    "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768},
    "vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 768},
    "projection_dim": 768}
_spec = importlib.util.spec_from_file_location("tests_eval_conftest", ROOT / "tests_eval" / "conftest.py")
fixtures = importlib.util.module_from_spec(_spec)   # the metric tests' writers (random weights, pictures)
_spec.loader.exec_module(fixtures)


def write_weights(folder: Path) -> None:
    """Every metric network, full size, random, saved as a user provides it (missing files only)."""
    import timm
    import transformers
    from safetensors.torch import save_file

    from diffedit.models.tokenizer import Tokenizer
    transformers.utils.logging.disable_progress_bar()
    for net in networks.LPIPS_NETS:
        if not (folder / weights.FILES[net][0][0]).is_file():
            fixtures.save_backbone(folder, net)
    timm_nets = {"deit": (networks.DEIT_NAME, {}), "dino": (structure.DINO_NAME, {"num_classes": 0})}
    for key, (name, extra) in timm_nets.items():
        if not (folder / weights.FILES[key][0][0]).is_file():
            state = timm.create_model(name, pretrained=False, **extra).state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights.FILES[key][0][0]))
    if not (folder / weights.FILES["inception"][0][0]).is_file():
        save_file(fixtures.random_inception_state(), str(folder / weights.FILES["inception"][0][0]))
    clip = folder / CLIP_NAME
    if not (clip / "model.safetensors").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            Tokenizer.default().save(tmp)    # OpenAI's BPE (weights/clip/), vocab.json + merges.txt
            tokenizer = transformers.CLIPTokenizerFast(vocab_file=f"{tmp}/vocab.json",
                                                       merges_file=f"{tmp}/merges.txt", model_max_length=77)
        processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=tokenizer)
        processor.save_pretrained(clip)      # CLIPImageProcessor's defaults are CLIP's 224 resize / crop
        transformers.CLIPModel(transformers.CLIPConfig(**CLIP_L14)).save_pretrained(clip)


def make_benches(root: Path, pictures: int, size: int) -> tuple[Path, Path, Path]:
    """An `imagenet` and a masked `pairs` bench folder (copy baseline), and FID statistics."""
    from diffedit.research.benchmarks.common import subset
    from diffedit.research.benchmarks.imagenet import read_queries
    for n, q in enumerate(subset(read_queries("test"), pictures, 0)):
        (root / "val" / q["path"]).parent.mkdir(parents=True, exist_ok=True)
        fixtures.picture(n, (size, size)).save(root / "val" / q["path"], format="JPEG", quality=95)
    quiet = ["--methods", "copy", "--quiet"]
    assert cli(["bench", "imagenet", "--data", str(root / "val"), "--out", str(root / "imagenet"),
                "--limit", str(pictures), "--subset-seed", "0", *quiet]) == 0
    rows, mask = [], np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255     # the edited region: a quarter of the picture
    Image.fromarray(mask).save(root / "mask.png")
    for n in range(pictures):
        fixtures.picture(100 + n, (size, size)).save(root / f"in-{n}.png")
        rows.append({"image": f"in-{n}.png", "mask": "mask.png", "source": "a photo of a cat",
                     "target": "a photo of a dog wearing a red hat"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["bench", "pairs", str(root / "pairs.jsonl"), "--out", str(root / "pie"), *quiet]) == 0
    listing = json.loads((root / "imagenet" / "benchmark.json").read_text())
    targets = sorted({it["target_id"] for it in listing["items"]})
    g = torch.Generator().manual_seed(0)
    stats = {"mean": torch.rand(2048, generator=g, dtype=torch.float64), "count": torch.tensor(10000),
             "cov": torch.eye(2048, dtype=torch.float64) * 0.1, "class_index": torch.tensor(targets),
             "class_mean": torch.rand(len(targets), 2048, generator=g, dtype=torch.float64),
             "class_count": torch.full((len(targets),), 50)}
    return root / "imagenet", root / "pie", sets.save_statistics(stats, root / "stats.safetensors", {})


class Timers:
    """Wraps what score_folder calls: builders (once=True: built once, timed, then reused) and
    scorers (each top-level call timed under its name)."""

    def __init__(self):
        self.calls, self.builds, self.built, self.busy, self.undo = defaultdict(list), {}, {}, False, []

    def wrap(self, owner, attr, name, once=False):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            key = name(*args) if callable(name) else name
            if (once and key in self.built) or (not once and self.busy):
                return self.built[key] if once else original(*args, **kwargs)
            self.busy, start = True, time.perf_counter()
            try:
                out = original(*args, **kwargs)
            finally:
                self.busy, seconds = False, time.perf_counter() - start
            if once:
                self.built[key], self.builds[key] = out, seconds
            else:
                self.calls[key].append(seconds)
            return out
        setattr(owner, attr, wrapper)
        self.undo.append((owner, attr, original))

    def restore(self):
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)


def install(t: Timers) -> None:
    t.wrap(networks, "lpips", lambda net="alex", *a: f"LPIPS {net} (torchvision backbone)", once=True)
    t.wrap(networks, "clip", "CLIP ViT-L/14 (transformers, 428M)", once=True)
    t.wrap(networks, "inception", "FID Inception-v3 (torchmetrics)", once=True)
    t.wrap(networks, "deit", "DeiT-B distilled 384 (timm)", once=True)
    t.wrap(structure, "dino", "DINO ViT-B/8 (timm)", once=True)
    t.wrap(perceptual.LPIPS, "__call__", lambda self, *a: f"LPIPS {self.net}")
    t.wrap(perceptual, "l1", "L1")
    t.wrap(perceptual.CLIPScorer, "__call__", "CLIPScore (whole picture)")
    t.wrap(sets, "features", "Inception features")
    t.wrap(DeiTAccuracy, "__call__", "DeiT accuracy")
    t.wrap(masked, "background_scores", "background metrics (6, LPIPS squeeze)")
    t.wrap(masked, "clip_edited", "CLIPScore of the edited region")
    t.wrap(structure.StructureDistance, "__call__", "DINO structure distance")
    t.wrap(sets, "fid", "FID of a group (per group, not per picture)")


RUNS = {  # name -> (folder, score_folder's keyword arguments)
    "imagenet": ("imagenet", {"metrics": ["lpips", "l1", "clip_score", "fid", "sfid", "csfid", "deit"]}),
    "lpips vgg": ("imagenet", {"metrics": ["lpips"], "lpips_net": "vgg"}),
    "lpips squeeze": ("imagenet", {"metrics": ["lpips"], "lpips_net": "squeeze"}),
    "pie-bench": ("pie", {"metrics": ["background", "clip_score", "clip_edited", "structure"]}),
}
IMAGENET = ("LPIPS alex", "CLIPScore (whole picture)", "Inception features", "DeiT accuracy")
PIE = ("background metrics (6, LPIPS squeeze)", "CLIPScore (whole picture)", "CLIPScore of the edited region",
       "DINO structure distance")


def import_libraries() -> float:
    """Import what the builders import, so that their times are the networks' alone."""
    start = time.perf_counter()
    import timm  # noqa: F401
    import torchmetrics.functional.image.lpips
    import torchmetrics.image.fid
    import torchmetrics.multimodal.clip_score  # noqa: F401
    import transformers
    from transformers import CLIPModel, CLIPProcessor  # noqa: F401
    transformers.utils.logging.disable_progress_bar()
    return time.perf_counter() - start


def peak_gb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / 1e9    # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of score_folder after one warm-up run")
    parser.add_argument("--size", type=int, default=512, help="the pictures' side in pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="1 picture, 1 repeat (to check the script)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="the metric-weights folder to use and keep "
                        "(files already there are reused); default a temporary folder")
    parser.add_argument("--write-weights", default=None, metavar="DIR", help=argparse.SUPPRESS)   # the child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.write_weights:
        return write_weights(Path(args.write_weights))
    if args.quick:
        args.pictures, args.repeats = 1, 1
    with tempfile.TemporaryDirectory(prefix="bench-metric-costs-") as tmp:
        folder = Path(args.keep or Path(tmp) / "weights")
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-weights", str(folder), "--threads", str(args.threads)],
                       check=True)
        written = time.perf_counter() - start
        benches = dict(zip(("imagenet", "pie", "stats"), make_benches(Path(tmp), args.pictures, args.size)))
        imports, timers, walls = import_libraries(), Timers(), defaultdict(list)
        install(timers)
        try:
            for repeat in range(1 + args.repeats):
                if repeat == 1:
                    timers.calls.clear()      # the warm-up run is left out
                for name, (bench, kwargs) in RUNS.items():
                    start = time.perf_counter()
                    command.score_folder(benches[bench], weights=folder, stats_path=benches["stats"], **kwargs)
                    if repeat:
                        walls[name].append((time.perf_counter() - start) / args.pictures)
        finally:
            timers.restore()
        size_gb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}; {args.pictures} "
          f"pictures {args.size}x{args.size}, {args.repeats} repeats after a warm-up")
    print(f"\nmetric weights: {size_gb:.2f} GB, written (or found) in {written:.0f} s by a child process "
          f"(its peak RSS {peak_gb(resource.RUSAGE_CHILDREN):.2f} GB)")
    print("\n| network | build + load s (once) |\n|---|---|")
    print(f"| (importing timm, torchmetrics, transformers: once) | {imports:.2f} |")
    for name, seconds in timers.builds.items():
        print(f"| {name} | {seconds:.2f} |")
    median = {name: statistics.median(v) for name, v in timers.calls.items()}
    print("\n| metric (as `bench score` computes it) | s per picture (median) | min | max | calls |")
    print("|---|---|---|---|---|")
    for name, values in timers.calls.items():
        print(f"| {name} | {median[name]:.3f} | {min(values):.3f} | {max(values):.3f} | {len(values)} |")
    print("\n| per edited picture | s (sum of medians) | score_folder wall s per picture (median) |\n|---|---|---|")
    for label, parts, run in (("ImageNet: LPIPS alex + CLIPScore + Inception + DeiT", IMAGENET, "imagenet"),
                              ("PIE-Bench: background + CLIP whole + CLIP edited + DINO", PIE, "pie-bench")):
        print(f"| {label} | {sum(median.get(p, float('nan')) for p in parts):.3f} | "
              f"{statistics.median(walls[run]):.3f} |")
    print(f"\npeak RSS of the scoring process: {peak_gb():.2f} GB (every network above loaded at once)")


if __name__ == "__main__":
    main()
