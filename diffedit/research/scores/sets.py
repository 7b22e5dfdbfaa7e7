"""Scores of a set of edits from Inception features (torchmetrics' NoTrainInceptionV3, 2048-d
pool3, of FlexIT's 256 crops; the network resizes them to 299 inside):

    FID     torchmetrics' FrechetInceptionDistance: the Frechet distance with covariances, between
            the edits and the reference statistics (the user's ImageNet train images)
    SFID    FlexIT's "SFID": || mean(features of all edits) - mean(reference features) ||^2 --
            no covariance term, not an FID
    CSFID   FlexIT's "CSFID": the mean over target classes c of || mean(features of the edits of
            target c) - mean(reference features of class c) ||^2 -- no covariance, not an FID

SFID and CSFID checked against FlexIT's evaluation (facebookresearch/SemanticImageTranslation,
eval.py, the `fid` block of evaluate(): 'SFID(mean)' and 'CSFID(mean)', over the target classes
present, of the features of the 256 crops). FlexIT's Inception (utils/inception.py, pool3 block
3) is not in the published repository; it is the pytorch-fid port, whose resize to 299 differs
slightly from torch-fidelity's used here (same FID weights).

Reference statistics (`diffedit bench stats`) are saved as safetensors: the global mean,
covariance and count (for FID), and per class the mean and count (for CSFID). Per-class
covariances are not kept (1,000 x 2048 x 2048 float64 would be 34 GB; CSFID needs none).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from diffedit.errors import ModelLoadError, OutputFileError, ParameterError
from diffedit.io.files import atomic_write, check_output, user_path
from diffedit.research.scores.networks import device_of
from diffedit.research.scores.perceptual import flexit_crop

FEATURES = 2048


@torch.no_grad()
def features(module: torch.nn.Module, images: Iterable[Image.Image], batch: int = 16) -> torch.Tensor:
    """(N, 2048) float64 Inception features of FlexIT's 256 crops of `images` (uint8 in), computed
    on the module's device, returned on the CPU."""
    out, pending, device = [], [], device_of(module)

    def flush():
        if pending:
            out.append(module(torch.cat(pending).to(device)).double().cpu())
            pending.clear()
    for image in images:
        pending.append((flexit_crop(image) * 255).round().to(torch.uint8))
        if len(pending) == batch:
            flush()
    flush()
    return torch.cat(out) if out else torch.zeros(0, FEATURES, dtype=torch.float64)


class SpilledFeatures:
    """Each edit's (FEATURES,) float64 Inception features, written as they come to an unnamed
    scratch file in `folder` (gone when closed, or when the process dies) and read back one group
    at a time: memory does not grow with the number of edits (16 KiB an edit: 0.45 GB for a
    whole ImageNet grid held in memory)."""

    ROW = FEATURES * 8

    def __init__(self, folder: Path):
        try:
            self._file = tempfile.TemporaryFile(dir=folder)
        except OSError as e:
            raise OutputFileError(f"cannot write in {folder} ({e.strerror}); the scores are written there: make it "
                                  "writable.") from None
        self._rows: dict[str, int] = {}

    def add(self, key: str, row: torch.Tensor) -> None:
        self._rows[key] = len(self._rows)
        self._file.write(row.to(torch.float64).contiguous().numpy().tobytes())

    def group(self, keys: list[str]) -> torch.Tensor:
        """(len(keys), FEATURES) float64: the rows of these edits, in this order."""
        self._file.flush()
        out = torch.empty(len(keys), FEATURES, dtype=torch.float64)
        for i, key in enumerate(keys):
            self._file.seek(self._rows[key] * self.ROW)
            out[i] = torch.frombuffer(bytearray(self._file.read(self.ROW)), dtype=torch.float64)
        self._file.seek(0, 2)
        return out

    def close(self) -> None:
        self._file.close()


class Accumulator:
    """Running sums of features (global and per class): what torchmetrics' FID keeps as state."""

    def __init__(self, dim: int = FEATURES):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0
        self.class_sum: dict[int, torch.Tensor] = {}
        self.class_count: dict[int, int] = {}

    def add(self, feats: torch.Tensor, classes: list[int] | None = None) -> None:
        feats = feats.double()
        self.sum += feats.sum(0)
        self.outer += feats.T @ feats
        self.count += len(feats)
        for f, c in zip(feats, classes or []):
            self.class_sum[c] = self.class_sum.get(c, torch.zeros_like(f)) + f
            self.class_count[c] = self.class_count.get(c, 0) + 1

    def statistics(self) -> dict[str, torch.Tensor]:
        """mean, cov (unbiased, as torchmetrics), count; class_index, class_mean, class_count."""
        if self.count < 2:
            raise ParameterError("reference statistics need at least 2 images; check the folder.")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        classes = sorted(self.class_sum)
        stats = {"mean": mean, "cov": cov, "count": torch.tensor(self.count)}
        if classes:
            stats.update(class_index=torch.tensor(classes),
                         class_mean=torch.stack([self.class_sum[c] / self.class_count[c] for c in classes]),
                         class_count=torch.tensor([self.class_count[c] for c in classes]))
        return stats


def statistics_output(path: str | Path) -> Path:
    """The statistics file to write, its folder made and the path checked (not a folder, writable):
    called before hours of features, not after."""
    path = user_path(path, OutputFileError)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFileError(f"cannot create the folder {path.parent} ({e.strerror}); choose another --out.") from None
    return check_output(path, overwrite=True)


def save_statistics(stats: dict[str, torch.Tensor], path: str | Path, about: dict) -> Path:
    """Write the statistics as safetensors, atomically (a failed write leaves the old file)."""
    from safetensors.torch import save
    data = save({k: v.contiguous() for k, v in stats.items()}, metadata={"about": json.dumps(about)})
    return atomic_write(statistics_output(path), lambda f: f.write(data), overwrite=True)


def load_statistics(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the `about` record of a statistics file written by save_statistics."""
    from safetensors import safe_open
    path = user_path(path, ParameterError)
    if not path.is_file():
        raise ParameterError(f"the reference statistics {path} do not exist; compute them once with `diffedit bench "
                             "stats IMAGENET_TRAIN --out FILE`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            stats = {k: f.get_tensor(k) for k in f.keys()}
            about = json.loads((f.metadata() or {}).get("about", "{}"))
    except Exception:
        raise ModelLoadError(f"{path} is not a statistics file of `diffedit bench stats`; compute it again.") from None
    if not {"mean", "cov", "count"} <= stats.keys():
        raise ModelLoadError(f"{path} lacks the global mean, covariance or count; compute it again.")
    return stats, about


def fid(fake: torch.Tensor, stats: dict[str, torch.Tensor]) -> float:
    """torchmetrics' FID between the features `fake` (N, d) and the reference statistics: the
    metric's own state (feature sums, sums of outer products, counts) is set from both, then its
    compute() runs."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if len(fake) < 2:
        raise ParameterError("FID needs at least 2 edited images.")

    class Features(torch.nn.Module):   # the features are already computed: the metric never calls it
        num_features = fake.shape[1]

    metric = FrechetInceptionDistance(feature=Features())
    n, mean, cov = int(stats["count"]), stats["mean"].double(), stats["cov"].double()
    metric.real_features_sum = n * mean
    metric.real_features_cov_sum = (n - 1) * cov + n * torch.outer(mean, mean)
    metric.real_features_num_samples = torch.tensor(n)
    fake = fake.double()
    metric.fake_features_sum = fake.sum(0)
    metric.fake_features_cov_sum = fake.T @ fake
    metric.fake_features_num_samples = torch.tensor(len(fake))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # its state was set, not update()d: the metric's warning does not apply
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        return float(metric.compute())


def sfid(fake: torch.Tensor, stats: dict[str, torch.Tensor]) -> float:
    """FlexIT's SFID: squared distance of the mean features (no covariance)."""
    return float((fake.double().mean(0) - stats["mean"].double()).square().sum())


def check_classes(stats: dict[str, torch.Tensor], targets: list[int]) -> None:
    """Refuse statistics without a reference mean for every target class (CSFID needs them)."""
    if "class_mean" not in stats:
        raise ParameterError("CSFID needs per-class reference statistics; compute them from a class-folder ImageNet "
                             "train set with `diffedit bench stats`.")
    missing = sorted(set(targets) - set(stats["class_index"].tolist()))
    if missing:
        raise ParameterError(f"the reference statistics have no images of class {missing[0]}; compute them over "
                             "every target class.")


def csfid(fake: torch.Tensor, targets: list[int], stats: dict[str, torch.Tensor]) -> float:
    """FlexIT's CSFID: the mean over target classes of the squared distance between the mean
    features of the edits into that class and the reference mean of that class."""
    check_classes(stats, targets)
    row = {int(c): i for i, c in enumerate(stats["class_index"].tolist())}
    distances = []
    for c in sorted(set(targets)):
        members = fake[[i for i, t in enumerate(targets) if t == c]].double()
        distances.append((members.mean(0) - stats["class_mean"][row[c]].double()).square().sum())
    return float(torch.stack(distances).mean())


SET_INFO = {
    "fid": "torchmetrics FrechetInceptionDistance against the reference statistics (with covariance)",
    "sfid": "FlexIT SFID: squared distance of mean Inception features, no covariance (not an FID)",
    "csfid": "FlexIT CSFID: mean over target classes of the squared distance of class-mean features (not an FID)",
}
