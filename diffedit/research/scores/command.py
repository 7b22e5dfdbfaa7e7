"""`diffedit bench score DIR` and `diffedit bench stats ROOT`: the library metrics of a finished
bench folder, and the reference statistics they compare with. Both need the `eval` extra.

    diffedit bench score DIR [--metrics lpips l1 clip_score fid sfid csfid deit background clip_edited
                             structure] [--lpips-net alex]
                             [--clip-model openai/clip-vit-large-patch14] [--stats STATS.safetensors]
                             [--metric-weights WEIGHTS_DIR] [--device cpu|cuda|cuda:N]
    diffedit bench stats IMAGENET_TRAIN --out STATS.safetensors [--per-class N] [--metric-weights DIR]
                             [--device cpu|cuda|cuda:N]

`score` reads the rows (results.jsonl, copy.jsonl), the pictures they name and benchmark.json,
writes DIR/scores.jsonl (one row per edit: its key, item, method, r and per-edit scores), and adds
to summary.json / summary.csv, per (method, r), the mean of each per-edit score and the set scores
(FID, SFID, CSFID over that group's edits), with `metric_info`: each metric's backbone,
resolution, range, library versions and device. `stats` walks ROOT/<wnid>/*.JPEG (ImageNet
train): the global mean, covariance and count of the Inception features, and per FlexIT target
class (the query list gives their wnids and indices) the mean and count.

Both run their networks on `--device` (the option of `diffedit bench`, default cpu), checked
before any network is built; each network is built on the CPU and moved there once, and the
scorers send their inputs to their network's device and bring back floats and CPU tensors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from importlib import metadata
from pathlib import Path

from PIL import Image

from diffedit.devices import parse_device
from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.io.images import load_image
from diffedit.research.table import RESULTS, parse_row, read_json, read_rows, table_path, write_together

PER_EDIT = ("lpips", "l1", "clip_score", "deit", "background", "clip_edited", "structure")
PER_SET = ("fid", "sfid", "csfid")
DEFAULT_METRICS = ("lpips", "l1", "clip_score")
NO_NETWORK = ("l1",)     # computed on the CPU whatever the device
METHOD_OF = {"none": "diffedit", "no_encode": "diffedit-no-encoding", "sdedit": "sdedit", "no_mask": "encode-decode"}


def add_score_arguments(parser) -> None:
    group = parser.add_argument_group("score and stats (the `eval` extra)")
    group.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=[*PER_EDIT, *PER_SET],
                       metavar="METRIC", help=f"score: metrics to compute (default {' '.join(DEFAULT_METRICS)}; also "
                       "fid sfid csfid with --stats, deit for imagenet; background clip_edited with ground-truth "
                       "masks; structure: PIE-Bench's DINO distance)")
    group.add_argument("--metric-weights", default=None, metavar="DIR", help="the metric networks' weights "
                       "(default: $DIFFEDIT_METRIC_WEIGHTS); nothing is downloaded")
    group.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"], help="LPIPS backbone "
                       "of `lpips` (default alex, as FlexIT); the background LPIPS is always squeeze, as PIE-Bench")
    group.add_argument("--clip-model", default="openai/clip-vit-large-patch14", metavar="ID|DIR", help="CLIPScore's "
                       "model: a folder, or a hub id whose folder DIR/<name> is in --metric-weights")
    group.add_argument("--stats", default=None, metavar="FILE", help="score: the reference statistics of "
                       "`diffedit bench stats` (needed by fid, sfid, csfid)")
    group.add_argument("--per-class", type=int, default=None, metavar="N", help="stats: at most N images per class "
                       "(the first N by name; default all)")


def check_extra() -> None:
    """One sentence when the `eval` extra cannot be imported (absent, or torchvision next to a
    torch build it was not made for)."""
    try:
        import timm  # noqa: F401
        import torchmetrics  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as e:   # torchvision raises RuntimeError next to another torch build
        raise ParameterError(f"the metrics need the eval extra (pip install 'diffedit-sd[eval]' with a torch build "
                             f"that matches torchvision; `make install-eval` makes .venv-eval): "
                             f"{str(e).splitlines()[0][:120]}.") from None


def versions() -> dict[str, str]:
    out = {}
    for name in ("torchmetrics", "torch-fidelity", "timm", "torchvision", "transformers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _edit_rows(folder: Path) -> list[dict]:
    rows = [dict(r, method=METHOD_OF.get(r.get("ablation"), r.get("ablation"))) for r in
            (read_rows(folder) if (folder / RESULTS).is_file() else [])]
    copy = folder / "copy.jsonl"
    if copy.is_file():
        copied = [parse_row(line, f"line {n} of {copy}")
                  for n, line in enumerate(copy.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        rows += [dict(row, strength=None, key=f"copy-{row.get('item')}") for row in copied]
    if not rows:
        raise ParameterError(f"{folder} holds no bench rows (results.jsonl or copy.jsonl); run `diffedit bench` first.")
    if not all(isinstance(r.get("item"), str) for r in rows):
        raise ParameterError(f"a row of {folder / RESULTS} or copy.jsonl has no item id; run `diffedit bench` again "
                             "to rewrite it.")
    return rows


def _open(path: Path) -> Image.Image:
    """An ImageNet train picture, read as the reference implementations read it (no EXIF turn)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        raise ParameterError(f"cannot read the train picture {path}; replace it or move it out of the "
                             "folder.") from None


def score_folder(folder, metrics=DEFAULT_METRICS, weights=None, lpips_net="alex",
                 clip_model="openai/clip-vit-large-patch14", stats_path=None, device="cpu") -> list[Path]:
    """Score a finished bench folder (see the module docstring) with the networks on `device`;
    returns the files written."""
    device = parse_device(device)   # a device torch cannot use is refused before any network is built
    from diffedit.research.scores import networks, sets
    from diffedit.research.scores.perceptual import L1_INFO, LPIPS, CLIPScorer, l1

    def clip_scorer() -> CLIPScorer:
        model, processor = networks.clip(clip_model, weights)
        return CLIPScorer(model.to(device), processor, clip_model)

    folder = user_path(folder, ParameterError)
    listing = read_json(folder / "benchmark.json", "benchmark listing") if (folder / "benchmark.json").is_file() \
        else None
    if listing is None or not (folder / "summary.json").is_file():
        raise ParameterError(f"{folder} is no finished bench folder (benchmark.json, summary.json); run `diffedit "
                             "bench` there first.")
    items = {it["id"]: it for it in listing["items"]}
    metrics = list(dict.fromkeys(metrics))
    rows, info, scorers = _edit_rows(folder), {}, {}
    if "lpips" in metrics:
        scorers["lpips"] = LPIPS(networks.lpips(lpips_net, weights).to(device), lpips_net)
        info["lpips"] = scorers["lpips"].info()
    if "l1" in metrics:
        info["l1"] = L1_INFO
    if "clip_score" in metrics:
        scorers["clip_score"] = clip_scorer()
        info["clip_score"] = scorers["clip_score"].info()
    masked = bool({"background", "clip_edited"} & set(metrics))   # the scores that need the ground-truth mask
    if masked:
        from diffedit.research.scores.masked import (
            MASKED_INFO,
            background_scores,
            clip_edited,
        )
        if not all(it.get("has_gt_mask") for it in items.values()):
            raise ParameterError("background and clip_edited need ground-truth masks: score a pie-bench folder or "
                                 "a pairs file with masks.")
        background_net = scorers["lpips"].module if "lpips" in scorers and lpips_net == "squeeze" else \
            networks.lpips("squeeze", weights).to(device)   # PIE-Bench's backbone for the background LPIPS
        info.update({m: MASKED_INFO[m] for m in ("background", "clip_edited") if m in metrics})
        if "clip_edited" in metrics and "clip_score" not in scorers:
            scorers["clip_score"] = clip_scorer()
    if "structure" in metrics:
        from diffedit.research.scores.structure import StructureDistance, dino
        scorers["structure"] = StructureDistance(dino(weights).to(device))
        info["structure"] = StructureDistance.info()
    has_classes = all("target_id" in it for it in items.values())
    if "deit" in metrics:
        from diffedit.research.scores.accuracy import DeiTAccuracy
        if not has_classes:
            raise ParameterError("deit accuracy needs ImageNet class ids: score an `imagenet` bench folder.")
        scorers["deit"] = DeiTAccuracy(networks.deit(weights).to(device))
        info["deit"] = DeiTAccuracy.info()
    stats = None
    if "csfid" in metrics and not has_classes:
        raise ParameterError("csfid needs each edit's target class: score an `imagenet` bench folder, or leave it out.")
    if set(metrics) & set(PER_SET):
        if stats_path is None:
            raise ParameterError("fid, sfid and csfid need the reference statistics: pass --stats FILE (made once "
                                 "with `diffedit bench stats IMAGENET_TRAIN --out FILE`).")
        stats, about = sets.load_statistics(stats_path)
        if "csfid" in metrics:   # refused now, not after every edit was scored
            sets.check_classes(stats, [it["target_id"] for it in items.values()])
        inception = networks.inception(weights).to(device)
        info.update({m: {"backbone": f"Inception-v3 (FID graph, torchmetrics NoTrainInceptionV3), {sets.SET_INFO[m]}",
                         "resolution": "shorter side 256, centre crop 256, resized to 299 inside",
                         "range": ">= 0, lower = closer to the reference images", "reference": about}
                     for m in PER_SET if m in metrics})
    info = {m: {**v, "device": "cpu" if m in NO_NETWORK else str(device)} for m, v in info.items()}
    scored, current = [], None   # features go to an unnamed scratch file (freed with it), not memory
    feats = sets.SpilledFeatures(folder) if stats is not None else None
    for r in rows:
        item = items.get(r["item"], {})
        edited = load_image(table_path(folder, r.get("image"), f"the image of the row of item {r['item']}"))
        if current is None or current[0] != r["item"]:   # an item's rows follow one another (the plan's order):
            pictures = f"images/{r['item']}/"              # its input and mask are read once, one item held
            current = (r["item"], load_image(table_path(folder, pictures + "input.png", f"the input of {r['item']}")),
                       load_image(table_path(folder, pictures + "gt_mask.png", f"the mask of {r['item']}"))
                       if masked else None)
        _, original, gt = current
        out = {"key": r["key"], "item": r["item"], "method": r["method"], "strength": r.get("strength")}
        if "lpips" in scorers:
            out["lpips"] = scorers["lpips"](edited, original)
        if "l1" in metrics:
            out["l1"] = l1(edited, original)
        if "clip_score" in metrics:
            out["clip_score"] = scorers["clip_score"](edited, item.get("target", ""))
        if gt is not None:
            if "background" in metrics:
                out.update(background_scores(edited, original, gt, background_net))
            if "clip_edited" in metrics:
                out["clip_edited"] = clip_edited(scorers["clip_score"], edited, gt, item.get("target", ""))
        if "structure" in scorers:
            out["structure"] = scorers["structure"](edited, original)
        if "deit" in scorers:
            out.update(scorers["deit"](edited, item["source_id"], item["target_id"]))
        if stats is not None:
            feats.add(r["key"], sets.features(inception, [edited])[0])
        scored.append(out)
    return _write(folder, scored, feats, stats, metrics, info, items)


def _write(folder, scored, feats, stats, metrics, info, items) -> list[Path]:
    from diffedit.research.scores import sets
    groups: dict[tuple, list[dict]] = {}
    for s in scored:
        groups.setdefault((s["method"], s["strength"]), []).append(s)
    payload = read_json(folder / "summary.json", "bench summary")
    names = [k for s in scored for k in s if k not in ("key", "item", "method", "strength", "deit_class")]
    for entry in payload["summary"]:
        members = groups.get((entry["method"], entry["strength"]), [])
        for name in dict.fromkeys(names):   # the mean over the edits that define the score (NaN: undefined)
            values = [m[name] for m in members if isinstance(m.get(name), (int, float)) and not math.isnan(m[name])]
            entry[name] = statistics.fmean(values) if values else math.nan
        if stats is not None and members:
            f = feats.group([m["key"] for m in members])
            if "fid" in metrics:
                entry["fid"] = sets.fid(f, stats) if len(members) >= 2 else math.nan
            if "sfid" in metrics:
                entry["sfid"] = sets.sfid(f, stats)
            if "csfid" in metrics:
                entry["csfid"] = sets.csfid(f, [items[m["item"]]["target_id"] for m in members], stats)
    libraries = versions()
    payload["metric_info"] = {**payload.get("metric_info", {}),
                              **{k: {**v, "libraries": libraries} for k, v in info.items()}}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for s in payload["summary"] for k in s)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(payload["summary"])
    return write_together({folder / "scores.jsonl": "".join(json.dumps(s) + "\n" for s in scored),
                           folder / "summary.json": json.dumps(payload, indent=1) + "\n",
                           folder / "summary.csv": buffer.getvalue()})


def train_images(root: Path, per_class: int | None) -> list[tuple[Path, str]]:
    """(file, wnid) of ROOT/<wnid>/*.JPEG|*.jpg|*.png, by name, at most `per_class` per class."""
    if not root.is_dir():
        raise ParameterError(f"the ImageNet train folder {root} does not exist; it is ILSVRC2012_img_train.tar "
                             "from image-net.org unpacked into ROOT/<wnid>/ folders.")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    if not classes:
        raise ParameterError(f"{root} holds no class folders (ROOT/n01234567/...); unpack the train archive's "
                             "per-class tars into them.")
    files = []
    for c in classes:
        names = sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        files += [(p, c.name) for p in names[:per_class]]
    return files


def compute_stats(root, out, weights=None, per_class=None, batch=16, bar=True, device="cpu") -> Path:
    """The reference statistics of an ImageNet train folder (see the module docstring), the
    Inception network on `device`."""
    device = parse_device(device)   # refused before the network is built
    from diffedit.research.benchmarks.imagenet import read_queries
    from diffedit.research.scores import networks, sets
    if per_class is not None and per_class < 1:
        raise ParameterError(f"--per-class must be at least 1, got {per_class}.")
    sets.statistics_output(out)     # a folder or unwritable --out refused now, not after hours of features
    index = {r["path"].split("/")[0]: r["source_id"] for s in ("test", "dev") for r in read_queries(s)}
    files = train_images(user_path(root, ParameterError), per_class)
    inception, acc = networks.inception(weights).to(device), sets.Accumulator()
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        acc.add(sets.features(inception, [_open(p) for p, _ in chunk], batch),
                [index.get(w, -1) for _, w in chunk])
        if bar:
            print(f"\r{start + len(chunk)}/{len(files)} images", end="", flush=True)
    if bar:
        print()
    acc.class_sum.pop(-1, None), acc.class_count.pop(-1, None)   # classes outside FlexIT's: global only
    about = {"root": str(root), "images": len(files), "per_class": per_class, "classes": len({w for _, w in files}),
             "features": "Inception-v3 FID graph (torchmetrics NoTrainInceptionV3) pool3 2048-d",
             "crop": "shorter side 256, centre crop 256 (FlexIT)", "device": str(device),
             "libraries": versions()}
    return sets.save_statistics(acc.statistics(), out, about)
