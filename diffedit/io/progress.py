"""Progress bars: tqdm, as everywhere in this ecosystem, on stderr, drawn only on a terminal.

    with progress_bar(total, "runs") as bar: ... bar.update(1)
    work = UNetProgress(pipe, total)      # a bar counting the pipeline's UNet samples, the unit of
    pipe.invert(..., callback=work.phase("encode"))   # the method's cost (mask: 2n, encode: k, ...)

`enabled=False` (the commands' --quiet) or a stream that is not a terminal draws nothing, so logs
and pipes stay clean. A bar is erased when it closes, so what follows starts on a clean line.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, unit: str, *, initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 description: str = "") -> tqdm:
    """A tqdm bar of `total` `unit`s with rate and ETA; off when not enabled or not on a terminal."""
    stream = stream if stream is not None else sys.stderr
    return tqdm(total=total, initial=initial, unit=f" {unit}", desc=description, file=stream, leave=False,
                disable=not (enabled and is_terminal(stream)), dynamic_ncols=True, mininterval=0.2)


class UNetProgress:
    """A bar over one command's UNet samples, read from the pipeline's counter at every step callback
    (the mask has no per-step callback: the bar moves once, at its end)."""

    def __init__(self, pipe, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.pipe, self.start = pipe, pipe.counters.unet_samples
        self.bar = progress_bar(total, "UNet samples", enabled=enabled, stream=stream)

    def update(self, label: str) -> None:
        self.bar.set_description_str(label, refresh=False)
        self.bar.n = min(self.pipe.counters.unet_samples - self.start, self.bar.total)
        self.bar.refresh()

    def phase(self, label: str) -> Callable:
        """Move the bar to the work done so far under `label`; returns the step callback of that phase."""
        self.update(label)
        return lambda *_: self.update(label)

    def close(self) -> None:
        self.bar.close()
