"""How a `diffedit` command ends: its exit status, and every failure as one line on stderr.

    status          cause
    0               done
    2               an error of the project's family (diffedit.errors), a refused argument, or
                    memory ran out: one line that says what to change
    130             Ctrl-C            143   SIGTERM   (no output is ever left half-written)
    (traceback)     anything else: a bug, shown in full

`handled_signals()` is the frame of one command: warnings become one line, SIGTERM is raised like
Ctrl-C (so temporary files are removed on the way out) and a Ctrl-C is remembered. Inside it,
`signals_end_at_once()` frames the import of the compiled libraries (torch above all): there a
signal ends the command line at once, as during the package's own start-up. `status_of(e)`
turns a failure into its status after printing its line; None means "not ours, let it raise".
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from diffedit import is_command_line
from diffedit.errors import DiffEditError
from diffedit.io.progress import is_terminal

PROG = "diffedit"
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143
INTERRUPTED = "interrupted; no output file was left half-written."
TERMINATED = "terminated; no output file was left half-written."
OUT_OF_MEMORY = "ran out of memory; use a smaller image, fewer --mask-samples or --dtype bf16."


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that temporary files are removed on the way out."""


def one_line(message: str) -> str:
    return " ".join(message.splitlines()).strip() or "unknown error"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    erase = "\r\x1b[K" if is_terminal(sys.stderr) else ""  # a progress bar may be on this line
    print(f"{erase}{PROG}: warning: {one_line(str(message))}", file=sys.stderr, flush=True)


def _raise_terminated(signum, frame):
    raise Terminated()


_interrupted = False  # set by Ctrl-C: whatever fails after it failed because of it


def _raise_interrupted(signum, frame):
    """Ctrl-C: KeyboardInterrupt, remembered. A library may turn it into another error (numpy's
    import, interrupted, becomes an ImportError that torch swallows, and the next import of numpy
    fails): after a Ctrl-C every failure ends as the interrupt, exit 130 and one line."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextmanager
def handled_signals() -> Iterator[None]:
    """The frame of one command; everything it changes is put back when the command ends."""
    global _interrupted
    _interrupted = False  # a Ctrl-C of an earlier command in this process is not this one's
    old_show, old_term = warnings.showwarning, signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    warnings.showwarning = _show_warning
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
        if old_int is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
            signal.signal(signal.SIGINT, _raise_interrupted)  # KeyboardInterrupt from here on
    except ValueError:  # not the main thread: leave the signals alone
        old_term = None
    try:
        yield
    finally:
        warnings.showwarning = old_show
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)


@contextmanager
def signals_end_at_once() -> Iterator[None]:
    """Ctrl-C or SIGTERM ends the command line at once, with one line and its usual status, while
    this frame runs. For the import of torch: its C++ calls back into Python, and a KeyboardInterrupt
    raised in such a callback can reach C++ where no exception may pass (the process aborts, status
    -6), or be swallowed by an `except` of the library (the command then runs on as if nothing
    happened). Nothing is written yet at that point, so ending at once loses nothing. A program
    calling main() keeps the usual KeyboardInterrupt."""
    if not is_command_line():
        yield
        return
    from diffedit import _guard_start_up
    replaced = _guard_start_up()
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def was_interrupted() -> bool:
    """A Ctrl-C arrived during this command, even if a library swallowed its KeyboardInterrupt."""
    return _interrupted


def status_of(e: BaseException) -> int | None:
    """The exit status of a command that raised `e`, its one line printed; None for a bug."""
    if isinstance(e, DiffEditError):
        return _fail(str(e), EXIT_USER_ERROR)
    if isinstance(e, KeyboardInterrupt) or (_interrupted and isinstance(e, Exception)):
        return _stop(_fail(INTERRUPTED, EXIT_INTERRUPTED))
    if isinstance(e, Terminated):
        return _stop(_fail(TERMINATED, EXIT_TERMINATED))
    if isinstance(e, (MemoryError, RuntimeError, OSError)) and is_allocation_failure(e):
        return _fail(OUT_OF_MEMORY, EXIT_USER_ERROR)  # torch's OutOfMemoryError is a RuntimeError
    return None


_ALLOCATION = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
               "not enough memory", "allocation failed", "bad_alloc", "std::bad_alloc")


def is_allocation_failure(e: BaseException) -> bool:
    """A failed allocation, whatever the allocator calls it (MemoryError, torch's "out of memory",
    "DefaultCPUAllocator: can't allocate memory", an ENOMEM from the system)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    if isinstance(e, OSError):
        import errno
        return e.errno == errno.ENOMEM
    return any(phrase in str(e).lower() for phrase in _ALLOCATION)


def _stop(status: int) -> int:
    """The command line ends an interrupted run at once with its status: an interrupt that landed
    inside a C extension's own Python call would otherwise make the interpreter re-raise SIGINT
    at exit (status -2 instead of 130). A program calling main() gets the status back."""
    if is_command_line():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return status
