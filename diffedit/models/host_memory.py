"""The C allocator (glibc's malloc) while a model is loaded and its weights are repacked.

glibc serves a request above its "mmap threshold" with a mapping of its own, which goes back to
the system when it is freed; smaller requests come from the heap, whose freed space is kept for
reuse and is returned to the system only from its top. The threshold starts at 128 KiB and rises
(up to 32 MiB) to the size of each mapped block that is freed.

Loading a model allocates each weight; repacking it for oneDNN (packed_linear.py) allocates the
packed copy and frees the plain one, and oneDNN allocates and frees work buffers on the way. With
the moving threshold many of those blocks land in the heap, where the freed ones leave holes that
later blocks of other sizes cannot fill: the process ends up holding several hundred MB more
than the weights (measured figures: benchmarks/README.md, "Memory").

`big_blocks_mapped()` is a context for loading and for every (re)packing of weights, also the
convolutions' lazy re-packs between model calls. Inside it the threshold is fixed at 1 MiB, so
every weight-sized block is a mapping of its own and a freed plain weight is returned at once. On
exit the threshold is fixed at 32 MiB (glibc's own ceiling) and the trim threshold at twice that
(glibc's own rule), so the activations of model calls are reused from the heap as before (a 1 MiB
threshold there would map and fault in every activation again on every call). `release_free_heap()`
hands the heap's free pages back (malloc_trim), once loading is done. Where the C library is
not glibc, neither does anything.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LOADING_THRESHOLD = 2**20
RUNNING_THRESHOLD = 32 * 2**20


def _glibc():
    """The process's glibc, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


@contextmanager
def big_blocks_mapped():
    """Blocks of 1 MiB or more are mappings of their own inside; the heap serves up to 32 MiB after."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(M_MMAP_THRESHOLD, RUNNING_THRESHOLD)
            _LIBC.mallopt(M_TRIM_THRESHOLD, 2 * RUNNING_THRESHOLD)


def release_free_heap() -> None:
    """Return the free pages of the heap to the system (glibc's malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
