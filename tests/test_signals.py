"""Issue 18, class 8: Ctrl-C and SIGTERM while the command line starts (the interpreter's start-up,
diffedit's imports, torch's import, the model load). Always the usual status (130, 143) and one
line, never a traceback or an abort, and nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reference_models import noise_image

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--mask-samples", "2"]


GUARDED_IMPORT = r"""
import builtins, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal: not ignored, as a background job
sys.argv = ["diffedit", "--help"]
real = builtins.__import__
def imp(name, *args, **kwargs):
    if name == "argparse":  # the first import after the start-up guard: the signal lands mid-import
        os.kill(os.getpid(), getattr(signal, sys.argv_signal))
    return real(name, *args, **kwargs)
builtins.__import__ = imp
from diffedit.cli import main
sys.exit(main())
"""


def deliver_ctrl_c() -> None:
    """In the child before it runs: Ctrl-C at its default, as from a terminal. A suite started as a
    background job inherits it ignored, and diffedit (rightly) keeps ignoring it then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signame, status, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_while_importing_is_one_line_and_the_usual_status(signame, status, word):
    code = GUARDED_IMPORT.replace("sys.argv_signal", repr(signame))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == status, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [f"diffedit: error: {word} while starting; nothing was written."]


SIGNAL_IN_TORCH_IMPORT = r"""
import builtins, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal
sys.argv = ["diffedit", "mask", *sys.argv[1:]]  # the command line, so its guards are on
real, fired = builtins.__import__, []
def imp(name, *args, **kwargs):
    if name.startswith("torch.") and not fired:  # deep inside torch's import, as a late Ctrl-C lands
        fired.append(name)
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)
builtins.__import__ = imp
from diffedit.cli import main
sys.exit(main())
"""


def test_ctrl_c_inside_the_import_of_torch_ends_at_once(tmp_path):
    """torch's import runs Python called from C++: a KeyboardInterrupt raised there once aborted the
    process (status -6, "terminate called after throwing pybind11::error_already_set"; CI, stop 26).
    During that import a signal ends the command at once: 130 and one line, nothing written."""
    image = tmp_path / "in.png"
    noise_image(24, 16).save(image)
    argv = [str(image), "--source", "a", "--target", "b", "--out", str(tmp_path / "m.png"), *FAST]
    run = subprocess.run([sys.executable, "-c", SIGNAL_IN_TORCH_IMPORT, *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == ["diffedit: error: interrupted while starting; nothing was written."]
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


SWALLOWED_CTRL_C = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from diffedit import cli
def run_swallowing(args):  # a library that catches the KeyboardInterrupt and carries on
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        pass
    return 0
import dataclasses
cli.COMMANDS["mask"] = dataclasses.replace(cli.COMMANDS["mask"], run=run_swallowing)
sys.exit(cli.main(["mask", "in.png", "--source", "a", "--target", "b"]))
"""


def test_a_swallowed_ctrl_c_still_ends_as_interrupted(tmp_path):
    run = subprocess.run([sys.executable, "-c", SWALLOWED_CTRL_C], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == ["diffedit: error: interrupted; no output file was left half-written."]


@pytest.mark.parametrize("delay", [0.08, 0.12, 0.2, 0.4, 0.7, 1.0])
def test_ctrl_c_soon_after_start_is_exit_130_and_one_line(delay, tmp_path):
    """`python -m diffedit` interrupted at several moments of its start (imports, argument checks,
    torch's import, the model load): always 130 and one line, never a traceback. The delay counts
    from the end of the interpreter's own start-up (its `site` import, which `-X importtime`
    reports; 20-40 ms on a quiet machine, over 80 ms on a busy one): a Ctrl-C before that is
    Python's to handle, not diffedit's, so it is not tested."""
    image = tmp_path / "in.png"
    noise_image(24, 16).save(image)
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "diffedit", "mask", str(image), "--source", "a",
                             "--target", "b", "--out", str(tmp_path / "m.png"), *FAST], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=deliver_ctrl_c)
    err_lines = []
    for line in proc.stderr:  # up to the end of Python's start-up
        err_lines.append(line)
        if line.rstrip().endswith("| site"):
            break
    drain = threading.Thread(target=lambda: err_lines.extend(proc.stderr))  # the pipe must never fill
    drain.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    drain.join()
    err = "".join(line for line in err_lines if not line.startswith("import time:"))
    if proc.returncode == 0:  # finished before the signal: nothing to check
        return
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [line for line in err.splitlines() if "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("diffedit: error: interrupted"), err
    assert not (tmp_path / "m.png").exists() and sorted(os.listdir(tmp_path)) == ["in.png"]


def test_a_failure_after_ctrl_c_ends_as_the_interrupt(monkeypatch, capsys):
    """Ctrl-C during numpy's import becomes an ImportError that torch swallows; the next import of
    numpy then fails with another ImportError. After a Ctrl-C any failure is exit 130, one line;
    without one, the same failure is not hidden."""
    import types
    from diffedit import cli, exits

    def run(args, interrupt=True):
        if interrupt:
            try:
                exits._raise_interrupted(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass  # swallowed by a library
        raise ImportError("cannot load module more than once per process")

    monkeypatch.setattr(exits, "_interrupted", False)
    monkeypatch.setattr(cli, "build_parser", lambda command: types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(run=lambda args: run(args, interrupt=False))))
    with pytest.raises(ImportError):
        cli.main(["mask"])
    monkeypatch.setattr(cli, "build_parser", lambda command: types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(run=run)))
    assert cli.main(["mask"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["diffedit: error: interrupted; no output file was left half-written."]
    monkeypatch.setattr(cli, "build_parser", lambda command: types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(run=lambda args: run(args, interrupt=False))))
    with pytest.raises(ImportError):  # the next call in this process starts without the old Ctrl-C
        cli.main(["mask"])
