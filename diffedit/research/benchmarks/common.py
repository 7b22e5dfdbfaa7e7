"""What a benchmark reader returns, and the seeded subset that `--limit N` takes.

A reader lists the protocol's rows, takes the subset, then decodes the images of the rows kept
(a broken file is reported before any model runs). Its items hold the files' paths, not their
pixels: a picture is read again when the run reaches its item (plan.Item)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from diffedit.errors import ParameterError
from diffedit.research.plan import Item


@dataclass
class Benchmark:
    """The items of one benchmark, in the protocol's order."""
    name: str                   # imagenet, pie-bench, pairs
    items: list[Item]           # the sweep engine's items: id, picture, source, target, truth
    info: list[dict]            # per item, the protocol's own fields (class ids, edit type, files)
    protocol: dict = field(default_factory=dict)   # how the items were made (split, template, quirk)

    def listing(self) -> list[dict]:
        """One entry per item: id, prompts and the protocol's fields (written to benchmark.json)."""
        return [{"id": it.id, "source": it.source, "target": it.target, "has_gt_mask": it.gt_mask is not None, **info}
                for it, info in zip(self.items, self.info)]


def subset(rows: list, limit: int | None, seed: int = 0) -> list:
    """`limit` rows drawn without replacement with random.Random(seed), kept in the protocol's
    order; all rows when `limit` is None or not smaller than their number. The same (limit, seed)
    gives the same rows on every machine and in every process. Readers take the subset of their
    rows before decoding any image."""
    if limit is None:
        return rows
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ParameterError(f"--limit must be a whole number of items, at least 1; got {limit!r}.")
    if limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
