"""FlexIT's ImageNet class edits (Couairon et al., CVPR 2022), the DiffEdit paper's ImageNet
experiment, read from the user's own ImageNet validation images and the query list shipped here.

The protocol: each row of `diffedit/research/data/flexit_queries.csv` (MIT, FlexIT's
dataset/queries.csv) is one edit: an ImageNet *validation* image of class `source`, to be edited
into class `target`. The method receives (image, source class name, target class name): FlexIT
passes the bare class names, which is this reader's default template "{}". Another template
(e.g. "a photo of a {}") is applied to both names and recorded in the results. `is_test` splits
the 2,184 rows into 1,092 test and 1,092 dev rows (273 target classes, 4 images each).

Where the images are (the user's ImageNet val, never downloaded):
  - class-folder layout: ROOT/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG (as torchvision's ImageFolder
    and FlexIT expect it), the query's `path` read as is;
  - flat layout: ROOT/ILSVRC2012_val_XXXXXXXX.JPEG as the archive unpacks, with a ground-truth
    file that says each image's class, checked against the query's class folder:
    LOC_val_solution.csv (ImageId,PredictionString, the class id first) or a text file of one
    wnid per line, line n for image n (the devkit's ground truth with its class numbers mapped
    to wnids, e.g. imagenet_2012_validation_synset_labels.txt). Found in ROOT under those
    names, or given with --ground-truth.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from diffedit.errors import ParameterError
from diffedit.io.files import user_path
from diffedit.io.images import load_image
from diffedit.research.benchmarks.common import Benchmark, subset
from diffedit.research.plan import Item

QUERIES = Path(__file__).resolve().parents[1] / "data" / "flexit_queries.csv"
SPLITS = ("test", "dev")
GROUND_TRUTH_NAMES = ("LOC_val_solution.csv", "imagenet_2012_validation_synset_labels.txt")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
WHERE = ("ImageNet's validation images come from image-net.org (ILSVRC2012_img_val.tar), unpacked into class "
         "folders ROOT/<wnid>/ or flat with a ground-truth file")


def read_queries(split: str = "test", path: str | Path = QUERIES) -> list[dict]:
    """The rows of FlexIT's query list of one split, in file order: id (FlexIT's row id), path,
    source, source_id, target, target_id (ImageNet class names and indices)."""
    if split not in SPLITS:
        raise ParameterError(f"--split must be test or dev (FlexIT's two halves of 1,092 edits), got {split!r}.")
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ParameterError(f"cannot read the query list {path} ({e.strerror}); it ships with diffedit "
                             "(diffedit/research/data/flexit_queries.csv), reinstall the package.") from None
    wanted = "True" if split == "test" else "False"
    try:
        return [{"id": int(r[""]), "path": r["path"], "source": r["source"], "source_id": int(r["source_id"]),
                 "target": r["target"], "target_id": int(r["target_id"])} for r in rows if r["is_test"] == wanted]
    except (KeyError, ValueError):
        raise ParameterError(f"{path} is not FlexIT's query list (columns ,path,source,source_id,target,"
                             "target_id,is_test); use the file shipped with diffedit.") from None


def prompt(template: str, class_name: str) -> str:
    """The prompt of a class name: the template with "{}" replaced by the name."""
    return template.replace("{}", class_name)


def check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ParameterError(f"--template must contain {{}} exactly once (where the class name goes), e.g. "
                             f"'{{}}' or 'a photo of a {{}}'; got {template!r}.")
    return template


def read_imagenet(root: str | Path, split: str = "test", template: str = "{}", ground_truth: str | None = None,
                  limit: int | None = None, seed: int = 0, queries: str | Path = QUERIES) -> Benchmark:
    """The FlexIT edits of `split` on the ImageNet validation images under `root` (see the module
    docstring for the two layouts), or `limit` of them (common.subset). Item ids are
    `flexit-<row id>`, the query's own number."""
    template = check_template(template)
    root = user_path(root, ParameterError)
    if not root.is_dir():
        raise ParameterError(f"the ImageNet validation folder {root} does not exist; {WHERE}.")
    rows = read_queries(split, queries)
    first = rows[0]["path"].split("/")[0]
    flat = not (root / first).is_dir() and any(root.glob("ILSVRC2012_val_*.JPEG"))
    classes = _ground_truth(root, ground_truth) if flat else None
    items, info = [], []
    for row in subset(rows, limit, seed):
        wnid, name = row["path"].split("/")
        if flat:
            file = root / name
            number = int(VAL_NAME.fullmatch(name).group(1))
            if classes.get(number) != wnid:
                raise ParameterError(f"the ground truth gives {name} the class {classes.get(number)}, the query list "
                                     f"{wnid}; give the ground-truth file of ImageNet 2012 validation.")
        else:
            file = root / wnid / name
        if not file.is_file():
            layout = "flat" if flat else "class-folder"
            raise ParameterError(f"the ImageNet validation image {file} is missing (read as the {layout} layout); "
                                 f"{WHERE}.")
        load_image(file)   # checked now, read again when the run reaches the edit
        items.append(Item(f"flexit-{row['id']}", file, prompt(template, row["source"]),
                          prompt(template, row["target"])))
        info.append({"query": row["id"], "file": row["path"], "wnid": wnid, "source_class": row["source"],
                     "source_id": row["source_id"], "target_class": row["target"], "target_id": row["target_id"]})
    protocol = {"protocol": "FlexIT (Couairon et al. 2022) ImageNet class edits", "split": split,
                "template": template, "layout": "flat" if flat else "class-folder", "queries": QUERIES.name}
    return Benchmark("imagenet", items, info, protocol)


def _ground_truth(root: Path, given: str | None) -> dict[int, str]:
    """Validation image number -> wnid, from LOC_val_solution.csv or a one-wnid-per-line file."""
    candidates = [user_path(given, ParameterError)] if given else [root / n for n in GROUND_TRUTH_NAMES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ParameterError(f"{root} holds validation images without class folders, and no ground-truth file "
                             f"({' or '.join(str(p) for p in candidates)}); pass --ground-truth FILE or unpack "
                             "the images into ROOT/<wnid>/ folders.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        raise ParameterError(f"cannot read the ground-truth file {path} as text; check it.") from None
    if lines and lines[0].startswith("ImageId"):
        return _solution_classes(path, lines)
    if not all(re.fullmatch(r"n\d{8}", line.strip()) for line in lines if line.strip()):
        raise ParameterError(f"{path} is neither LOC_val_solution.csv nor one wnid (n01234567) per line; the devkit's "
                             "numeric ground truth must be mapped to wnids first (its meta.mat gives the map).")
    return {i + 1: line.strip() for i, line in enumerate(lines) if line.strip()}


def _solution_classes(path: Path, lines: list[str]) -> dict[int, str]:
    """Kaggle's LOC_val_solution.csv (ImageId,PredictionString): each image's first box's class."""
    classes = {}
    for number, r in enumerate(csv.DictReader(lines), start=2):
        name = VAL_NAME.fullmatch(f"{r.get('ImageId')}.JPEG")
        if name is None:
            continue
        boxes = (r.get("PredictionString") or "").split()
        if not boxes or not re.fullmatch(r"n\d{8}", boxes[0]):
            raise ParameterError(f"line {number} of {path} ({r['ImageId']}) has no class id (n01234567) first in its "
                                 "PredictionString; use Kaggle's LOC_val_solution.csv as it ships.")
        classes[int(name.group(1))] = boxes[0]
    return classes
