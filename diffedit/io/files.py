"""Output files that are never partial and never clobber what they must not.

    atomic_write(path, write_fn, overwrite=False, protected=[input])   # bytes through write_fn(f)
    atomic_write_text(path, text, ...)                                 # CSV, JSON, ...
    check_output(path, overwrite=False, protected=[input])             # the same refusals, up front
    check_image_size(path, (width, height))                            # the format's size limit, up front

A write goes to a temporary `.NAME.tmp-PID-XXXXXXXX` in the target's folder (hidden, and not
ending in an image suffix, so a glob for outputs never picks it up), is fsynced, then renamed
onto NAME (a hard link when overwriting is not allowed: a file created meanwhile is never
clobbered). NAME is never partial; a writer killed mid-write leaves at most that dot-file, which
the next write to NAME deletes once the process that made it is gone.

Refusals (OutputFileError, one sentence): the folder is missing, not a folder or not writable;
the target is one of the `protected` inputs (also through a symlink or hard link); the target is
a folder; the target exists and `overwrite` is False.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

from diffedit.errors import DiffEditError, OutputFileError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}   # pixels a side the encoders take (libjpeg, libwebp); PNG: no limit
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def user_path(path: str | os.PathLike, error: type[DiffEditError] = OutputFileError) -> Path:
    """Path(path) with a leading ~ or ~user expanded; a user without a known home folder is one
    sentence (an `error`), not pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = Path(path).parts[0]
        raise error(f"the path {path} starts with {head}, but no home folder is known for {head}; "
                    f"write the path out in full (./{path} for a folder named {head}).") from None


def resolves_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path`, followed through any symbolic link, lies inside `folder` (resolved alike)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format name for an output path, from its suffix (.png, .jpg/.jpeg, .webp)."""
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None and path_kind(path) == "dir":
        raise OutputFileError(f"{path} is a folder; give a file name inside it, such as {path / 'out.png'}.")
    if fmt is None:
        raise OutputFileError(f"cannot tell the image format of {path} from its suffix {path.suffix or '(none)'!r}; "
                              "end the name with .png, .jpg, .jpeg or .webp.")
    return fmt


def check_image_size(path: str | os.PathLike, size: tuple[int, int], name: str | None = None) -> None:
    """Raise OutputFileError if the format of `path` cannot hold an image of `size` (width, height);
    `name` says which output it is (default: the path)."""
    fmt = image_format(path)
    limit = MAX_SIDE.get(fmt)
    width, height = size
    if limit is not None and max(width, height) > limit:
        raise OutputFileError(f"{name or path} would be {width} x {height} pixels, more than {FORMAT_NAMES[fmt]} "
                              f"allows ({limit} pixels a side); give it a .png name.")


def is_temp_file(name: str | os.PathLike) -> bool:
    """True for the temporary files of `atomic_write` (`.NAME.tmp-PID-XXXXXXXX`)."""
    return TEMP_NAME.match(Path(name).name) is not None


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False,
                      protected: Iterable[str | os.PathLike] = (), encoding: str = "utf-8") -> Path:
    """Write text (CSV, JSON, ...) atomically."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite, protected=protected)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Any], Any], *, overwrite: bool = False,
                 protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Call write_fn(f) with a binary file opened on a temporary file next to `path`, fsync it,
    then move it onto `path`. On any failure (KeyboardInterrupt included) the temporary file is
    removed and `path` is untouched. Refuses to overwrite an existing file unless `overwrite`,
    and always refuses a path that is (or links to) one of `protected`."""
    path = user_path(path)
    check_output(path, overwrite=overwrite, protected=protected)
    temp = _stage(path, write_fn)
    try:
        _publish(temp, path, overwrite)
    except BaseException as e:
        _discard(temp, path, e)
    _fsync_folder(path.parent)
    return path


def write_all_or_none(writes: Iterable[tuple[str | os.PathLike, Callable[[], Any]]], *,
                      overwrite: bool = False) -> list[Path]:
    """Several outputs, all or none: each `write()` writes its path atomically, in order; if one
    fails (an error, Ctrl-C, SIGTERM), those already written are removed again, or put back as
    they were when `overwrite` replaced them (from a hard-linked backup), and an error of the
    project's family says that none was written. (SIGKILL leaves complete files only.)"""
    writes = [(user_path(path), write) for path, write in writes]
    done: list[tuple[Path, Path | None]] = []  # (path, backup of the file it replaced)
    try:
        for path, write in writes:
            backup = _backup(path) if overwrite else None
            try:
                write()
            except BaseException:
                if backup is not None:
                    with suppress(OSError):
                        os.unlink(backup)
                raise
            done.append((path, backup))
    except BaseException as e:
        for path, backup in reversed(done):
            with suppress(OSError):
                os.replace(backup, path) if backup is not None else os.unlink(path)
        if isinstance(e, DiffEditError) and len(writes) > 1:
            raise type(e)(f"{str(e).rstrip('.')}; none of the {len(writes)} outputs was written.") from None
        raise
    for _, backup in done:
        if backup is not None:
            with suppress(OSError):
                os.unlink(backup)
    return [path for path, _ in done]


def _backup(path: Path) -> Path | None:
    """A hard link to the file `path` names now (None if there is none or links are not possible)."""
    if not os.path.isfile(path):
        return None
    backup = path.parent / f"{_temp_prefix(path.name)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.link(path, backup)
    except OSError:
        return None
    return backup


def _stage(path: Path, write_fn: Callable[[Any], Any]) -> Path:
    """Write and fsync the temporary file of `path`; the temp is removed again on any failure."""
    folder = path.parent
    _remove_stale_temps(folder, path.name)
    temp = folder / f"{_temp_prefix(path.name)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise OutputFileError(f"cannot create a file in the output folder {folder} ({_reason(e)}); "
                              "choose another folder or fix its permissions.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _discard(temp, path, e)
    return temp


def _discard(temp: Path, path: Path, error: BaseException) -> NoReturn:
    """A write to `path` failed: remove its temporary file and raise (an OS error as one sentence)."""
    with suppress(OSError):
        os.unlink(temp)
    if isinstance(error, OSError) and not isinstance(error, DiffEditError):
        raise OutputFileError(f"could not write {path} ({_reason(error)}); check free disk space "
                              "and permissions.") from error
    raise error


def check_output(path: str | os.PathLike, *, overwrite: bool = False,
                 protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise OutputFileError if `atomic_write` would refuse `path`; call it before long work."""
    path = user_path(path)
    folder = path.parent
    if not path.name or path.name in (".", ".."):
        raise OutputFileError(f"the output path {str(path)!r} names no file; give a file name such as out.png.")
    if len(os.fsencode(path.name)) > 255:
        raise OutputFileError(f"the output file name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes "
                              "long, more than file systems allow (255); choose a shorter name.")
    folder_kind = path_kind(folder)
    if folder_kind == "missing":
        raise OutputFileError(f"the output folder {folder} does not exist; create it first.")
    if folder_kind != "dir":
        raise OutputFileError(f"{folder} is not a folder ({folder_kind}); choose an output path inside a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFileError(f"the output folder {folder} is not writable; choose another folder or fix "
                              "its permissions.")
    for source in protected:
        if _same_file(path, user_path(source)):
            raise OutputFileError(f"{path} is one of the inputs ({source}); choose another output name.")
    kind = path_kind(path)
    if kind == "dir":
        raise OutputFileError(f"{path} is a folder; give a file name for the output.")
    if kind not in ("file", "missing", "a broken symlink", "a symlink loop"):
        raise OutputFileError(f"{path} is {kind}, not a file; choose another output name.")
    if os.path.lexists(path) and not overwrite:
        raise OutputFileError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another name.")
    return path


def path_kind(path: str | os.PathLike) -> str:
    """What a path names, without raising: "dir", "file", "missing", or in words what else it is
    ("a FIFO (named pipe)", "a device", "a symlink loop", "a name too long for the file system"...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.lexists(path) else "missing"
    except NotADirectoryError:
        return "missing"
    except ValueError:
        return "not a valid path (it contains a NUL character)"
    except OSError as e:
        return {errno.ELOOP: "a symlink loop", errno.ENAMETOOLONG: "a name too long for the file system"}.get(
            e.errno, f"unreadable ({_reason(e)})")
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _same_file(a: Path, b: Path) -> bool:
    """Same file by inode (symlinks, hard links) when both exist, else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return a.resolve() == b.resolve()
        except (OSError, RuntimeError):
            return False


def _publish(temp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp onto path. Without overwrite, a hard link fails if path appeared
    since the check (no clobbering); file systems without hard links fall back to a rename."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        raise OutputFileError(f"{path} was created by someone else while writing; choose another name.") from None
    except OSError:
        if os.path.lexists(path):
            raise OutputFileError(f"{path} already exists; pass overwrite=True or choose another name.") from None
        os.replace(temp, path)
        return
    with suppress(OSError):
        os.unlink(temp)


def _temp_prefix(name: str) -> str:
    return f".{name[:200]}.tmp-"


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete `.NAME.tmp-PID-XXXXXXXX` files left by processes that no longer run."""
    pattern = re.compile(re.escape(_temp_prefix(name)) + r"(\d+)-[0-9a-f]{8}")
    with suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and not _process_alive(int(match.group(1))):
                with suppress(OSError):
                    os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate it: keep the temp
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process, or not a pid: keep
        pass
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).rstrip(".")
