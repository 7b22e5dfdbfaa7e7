"""Build and load diffedit's C kernels (cpu_attention*.c, cpu_linear_fp32.c, cpu_geglu.c; the
headers beside them) on first use.

The system's C compiler ($CC, else `cc`) with -O3 -march=native -fopenmp (without -fopenmp if the
compiler has no OpenMP: then one thread), once per source, compiler, flags and CPU kind, into a
shared library cached under $DIFFEDIT_CACHE (else $XDG_CACHE_HOME/diffedit, else
~/.cache/diffedit); compiled from a private copy of the very text hashed, written to a temporary
name and renamed, so concurrent processes never load a half-written file. Loaded after torch, a library shares torch's OpenMP runtime and threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
SERIAL_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")   # where the compiler has no OpenMP: one thread
BUILD_SECONDS = 300   # a compiler that takes longer is taken for hung

_lock = threading.Lock()
_loaded: dict[Hashable, ctypes.CDLL | str] = {}  # key -> the library, or why it could not be built


def once(key: Hashable, build: Callable[[], ctypes.CDLL]) -> ctypes.CDLL:
    """`build()`'s library, built once per process and key (a failure is remembered too, so the
    compiler is not run again); RuntimeError with the reason when it cannot be built."""
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = build()
            except (RuntimeError, OSError) as error:
                _loaded[key] = str(error)
        if isinstance(_loaded[key], str):
            raise RuntimeError(_loaded[key])
        return _loaded[key]


def cpu_kind() -> str:
    """Model and flags of the first CPU in /proc/cpuinfo: -march=native code is for this kind only."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return os.uname().machine
    keep = ("vendor_id", "cpu family", "model", "model name", "flags")
    return "\n".join(line for line in lines if line.split(":")[0].strip() in keep)


def cache_dir() -> Path:
    if os.environ.get("DIFFEDIT_CACHE"):
        return Path(os.environ["DIFFEDIT_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffedit" / "kernels"


def load(source: Path, what: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` (or find it in the cache) and load it; `what` names the kernel in errors;
    `extra_flags` e.g. ("-DPORTABLE_ONLY",). RuntimeError when it cannot be built."""
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]   # e.g. CC="ccache gcc"
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        raise RuntimeError(f"no C compiler ({' '.join(compiler)!r}) to build the {what}") from None
    try:
        return _compiled(source, what, compiler, version, FLAGS + tuple(extra_flags))
    except RuntimeError:
        return _compiled(source, what, compiler, version, SERIAL_FLAGS + tuple(extra_flags))


def _compiled(source: Path, what: str, compiler: list[str], version: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    files = {source.name: source.read_text()} | {h.name: h.read_text() for h in sorted(source.parent.glob("*.h"))}
    text = "\0".join([*files.values(), *compiler, version, *flags, cpu_kind()])   # source first, then headers
    key = hashlib.sha256(text.encode()).hexdigest()
    target = cache_dir() / f"{source.stem}-{key[:16]}.so"
    if target.is_file():
        try:
            return _opened(target)
        except OSError:   # unreadable (another user's cache, a damaged file): built again below
            pass
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".building-", dir=target.parent) as folder:
            for name, content in files.items():   # the very text hashed, even if the files change meanwhile
                Path(folder, name).write_text(content)
            partial = Path(folder, target.name)
            done = subprocess.run([*compiler, *flags, str(Path(folder, source.name)), "-o", str(partial)],
                                  capture_output=True, text=True, timeout=BUILD_SECONDS)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["no message"]
                raise RuntimeError(f"{' '.join(compiler)} could not build the {what}: "
                                   f"{next((line for line in lines if 'error' in line), lines[-1])}")
            os.replace(partial, target)   # made by the compiler itself: readable as any new executable
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(compiler)} took more than {BUILD_SECONDS} s to build the {what}") from None
    except OSError as error:
        raise RuntimeError(f"cannot build the {what} into the cache {target.parent} ({error.strerror or error}); "
                           "set DIFFEDIT_CACHE to a writable folder") from None
    return _opened(target)


def _opened(target: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(target))
    library.kernel_path.restype = ctypes.c_char_p
    return library
