"""The paper's benchmarks as readers of the user's own files (nothing is downloaded), each giving
the sweep engine's items (research/plan.py `Item`), so that `diffedit bench` runs, caches,
resumes and shards exactly as `diffedit sweep` does.

    imagenet.py    FlexIT's ImageNet class edits (the DiffEdit paper's ImageNet experiment)
    pie_bench.py   PIE-Bench (Ju et al., ICLR 2024): 700 edits with ground-truth masks
    pairs.py       any CSV / JSONL of image, source, target[, mask] rows
    common.py      what a reader returns (Benchmark) and the seeded subset of --limit
    command.py     `diffedit bench ...`: the methods and the r grid as a sweep, the copy baseline,
                   the summary per (method, r)

A reader is a function of a spec (a dict, recorded in the results as the sweep config's
"items"), so that every process of a sharded run reads the same items on its own.
"""

from __future__ import annotations

from diffedit.errors import ParameterError
from diffedit.research.benchmarks.common import Benchmark

NAMES = ("imagenet", "pie-bench", "pairs")


def read_benchmark(spec: dict) -> Benchmark:
    """The items of `spec` = {"benchmark": NAME, ... the reader's options ..., "limit": N or None,
    "subset_seed": S}: the whole benchmark, or the seeded subset of `limit` items (common.subset)."""
    name, limit, seed = spec.get("benchmark"), spec.get("limit"), spec.get("subset_seed", 0)
    if name == "imagenet":
        from diffedit.research.benchmarks.imagenet import read_imagenet
        bench = read_imagenet(spec["data"], split=spec.get("split", "test"), template=spec.get("template", "{}"),
                              ground_truth=spec.get("ground_truth"), limit=limit, seed=seed)
    elif name == "pie-bench":
        from diffedit.research.benchmarks.pie_bench import read_pie_bench
        bench = read_pie_bench(spec["data"], border_quirk=spec.get("border_quirk", True), limit=limit, seed=seed)
    elif name == "pairs":
        from diffedit.research.benchmarks.pairs import read_pairs
        bench = read_pairs(spec["data"], limit=limit, seed=seed)
    else:
        raise ParameterError(f"unknown benchmark {name!r}; use one of {', '.join(NAMES)}.")
    return bench
