"""DiffEdit on Stable Diffusion, from scratch.

    from diffedit import DiffEditPipeline
    pipe = DiffEditPipeline.from_pretrained()      # the embedded model, or a folder / file / hub id
"""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"


def is_command_line() -> bool:
    """True when this process is the `diffedit` command: the console script or `python -m diffedit`."""
    argv = list(getattr(_sys, "orig_argv", []))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "diffedit":
        return True
    return bool(_sys.argv) and _os.path.basename(_sys.argv[0] or "") in ("diffedit", "diffedit.exe", "diffedit-script.py")


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C or SIGTERM before the command line's main() takes over (its imports): nothing was
    written yet, so one line and the usual status at once, no KeyboardInterrupt traceback."""
    word, status = ("interrupted", 130) if signum == _signal.SIGINT else ("terminated", 143)
    _os.write(2, f"diffedit: error: {word} while starting; nothing was written.\n".encode())
    _os._exit(status)


def _guard_start_up() -> dict:
    """Ctrl-C and SIGTERM (unless ignored, as in a background job) end the process at once through
    _interrupted_while_starting; returns the handlers it replaced, for whoever puts them back."""
    replaced = {}
    try:
        for signum in (_signal.SIGINT, _signal.SIGTERM):
            if _signal.getsignal(signum) is not _signal.SIG_IGN:
                replaced[signum] = _signal.signal(signum, _interrupted_while_starting)
    except ValueError:  # not the main thread
        pass
    return replaced


if is_command_line():  # the first code of the package to run: guard the imports that follow
    _guard_start_up()

_EXPORTS = {
    "DiffEditPipeline": "pipeline",
    "load_model": "checkpoints.loading",
    "DiffEditError": "errors",
    "MaskResult": "results", "Inversion": "results", "EditResult": "results", "DiffEditResult": "results",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Import on first use, so `import diffedit` stays cheap (no torch until needed)."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")
