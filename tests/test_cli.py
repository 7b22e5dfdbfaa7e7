"""The `diffedit` command line: edit and mask end to end on a tiny random model, outputs at the
input's size, the input never touched, --overwrite, one line and exit status 2 for user errors,
and runs killed (SIGKILL) or interrupted (SIGINT) mid-write that leave no partial output.

The model is a random "tiny" one built by tests/reference_models.py (16 px working size), so a
whole edit takes about a second; the pixels mean nothing, the files and sizes do."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffedit.io.saving as image_io
from diffedit import cli
from diffedit.io.files import is_temp_file
from reference_models import assert_png, noise_image, run_cli, snapshot

FAST = ["--steps", "4", "--mask-samples", "2"]
W, H = 53, 37  # not multiples of 8


# ---------------------------------------------------------------------- helpers

def assert_one_line_error(code: int, out: str, err: list[str], *phrases: str) -> str:
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith("diffedit: error: ") and "Traceback" not in err[0], err
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])
    assert out == ""
    return err[0]


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def workdir(tmp_path) -> Path:
    noise_image(W, H).save(tmp_path / "cat.png")
    return tmp_path


# ---------------------------------------------------------------------- end to end

def test_edit_end_to_end(workdir, tiny_model_folder, capsys):
    before = snapshot(workdir)
    code, out, err = run_cli(["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog",
                              "--model", tiny_model_folder, *FAST], capsys)
    assert code == 0, err
    assert err == []  # stderr is not a terminal: no progress bar
    names = {kind: workdir / f"cat.{kind}.png" for kind in ("edit", "mask", "panel")}
    assert out.splitlines() == [f"{kind}: {path}" for kind, path in names.items()]
    assert sorted(os.listdir(workdir)) == sorted(["cat.png"] + [p.name for p in names.values()])
    assert snapshot(workdir)["cat.png"] == before["cat.png"]  # the input is untouched

    assert_png(names["edit"], (W, H), "RGB")
    mask = np.asarray(assert_png(names["mask"], (W, H), "L"))
    assert set(np.unique(mask)) <= {0, 255} and mask.any()
    panel = assert_png(names["panel"])
    k = -(-cli.PANEL_MIN_SIDE // min(W, H))                   # small inputs are enlarged k times, nearest neighbour
    assert panel.width == 3 * k * W + 2 * 8 and panel.height > k * H  # input | mask | edit, 8 px apart, text lines
    pixels, expected = np.asarray(panel.convert("RGB")), np.asarray(noise_image(W, H))
    assert any(np.array_equal(pixels[y:y + k * H:k, :k * W:k], expected)    # the first picture is the input
               for y in range(panel.height - k * H + 1))                     # itself, under the title lines


def test_outputs_are_deterministic_and_mask_command_agrees(workdir, tiny_model_folder, capsys):
    common = ["--source", "a cat", "--target", "a dog", "--model", tiny_model_folder, *FAST, "--seed", "7"]
    for tag in ("a", "b"):
        code, _, err = run_cli(["edit", workdir / "cat.png", *common, "--out", workdir / f"{tag}.png",
                                "--mask-out", workdir / f"{tag}.mask.png", "--panel-out", workdir / f"{tag}.panel.png",
                                "--quiet"], capsys)
        assert code == 0, err
    code, out, err = run_cli(["mask", workdir / "cat.png", *common, "--out", workdir / "m.png"], capsys)
    assert code == 0 and out.strip() == f"mask: {workdir / 'm.png'}", err
    pixels = {name: np.asarray(Image.open(workdir / name)) for name in ("a.png", "b.png", "a.mask.png", "b.mask.png",
                                                                        "m.png")}
    assert np.array_equal(pixels["a.png"], pixels["b.png"])
    assert np.array_equal(pixels["a.mask.png"], pixels["b.mask.png"])
    assert np.array_equal(pixels["a.mask.png"], pixels["m.png"])  # one seed, one mask, whichever command


def test_edit_with_out_alone_writes_the_mask_and_panel_beside_it(workdir, tiny_model_folder, capsys):
    """--out alone used to send the mask and the panel into the input's folder (a dataset, maybe
    read-only: then the run was refused unless --mask-out and --panel-out were given too)."""
    results = workdir / "results"
    results.mkdir()
    code, _, err = run_cli(["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog", "--model",
                            tiny_model_folder, *FAST, "--out", results / "run1.edit.png", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(workdir)) == ["cat.png", "results"]
    assert sorted(os.listdir(results)) == ["run1.edit.png", "run1.mask.png", "run1.panel.png"]
    assert_png(results / "run1.mask.png", (W, H), "L")


@pytest.mark.parametrize("out, mask, panel", [
    ("res.png", "res.mask.png", "res.panel.png"), ("cat.edit.png", "cat.mask.png", "cat.panel.png"),
    ("a.b.jpg", "a.b.mask.png", "a.b.panel.png"), (".edit.png", ".edit.mask.png", ".edit.panel.png")])
def test_default_mask_and_panel_names_follow_out(tmp_path, out, mask, panel):
    plan = cli.plan_outputs(tmp_path / "in" / "cat.png", {"edit": str(tmp_path / out), "mask": None, "panel": None},
                            overwrite=False, protected=[])
    assert plan == {"edit": tmp_path / out, "mask": tmp_path / mask, "panel": tmp_path / panel}
    inside = cli.plan_outputs(tmp_path / "cat.png", {"edit": None, "mask": None, "panel": None}, False, [])
    assert inside == {kind: tmp_path / f"cat.{kind}.png" for kind in ("edit", "mask", "panel")}  # no --out: as before


def test_mask_command_default_name(workdir, tiny_model_folder, capsys):
    code, out, err = run_cli(["mask", workdir / "cat.png", "--source", "", "--target", "a dog", "--model",
                              tiny_model_folder, *FAST], capsys)
    assert code == 0, err
    assert sorted(os.listdir(workdir)) == ["cat.mask.png", "cat.png"]
    assert_png(workdir / "cat.mask.png", (W, H), "L")


def test_overwrite(workdir, tiny_model_folder, capsys):
    argv = ["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog", "--model", tiny_model_folder, *FAST,
            "--quiet"]
    assert run_cli(argv, capsys)[0] == 0
    first = snapshot(workdir)

    code, out, err = run_cli(argv, capsys)  # everything exists: refused before any work
    assert_one_line_error(code, out, err, "cat.edit.png already exists", "--overwrite")
    assert snapshot(workdir) == first

    (workdir / "cat.edit.png").unlink()  # one output missing, two existing: still refused, nothing written
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, out, err, "cat.mask.png already exists")
    assert "cat.edit.png" not in os.listdir(workdir)

    time.sleep(0.01)
    code, _, err = run_cli(argv + ["--seed", "3", "--overwrite"], capsys)
    assert code == 0, err
    after = snapshot(workdir)
    assert after["cat.png"] == first["cat.png"]
    assert after["cat.mask.png"][1] != first["cat.mask.png"][1]  # rewritten
    assert sorted(after) == sorted(first)  # and nothing else


@pytest.mark.parametrize("target", ["input", "symlink", "hardlink"])
def test_input_is_never_overwritten(workdir, tiny_model_folder, capsys, target):
    path = {"input": workdir / "cat.png", "symlink": workdir / "link.png", "hardlink": workdir / "hard.png"}[target]
    if target == "symlink":
        path.symlink_to(workdir / "cat.png")
    elif target == "hardlink":
        os.link(workdir / "cat.png", path)
    before = snapshot(workdir)
    code, out, err = run_cli(["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog", "--model",
                              tiny_model_folder, "--out", path, "--overwrite"], capsys)
    assert_one_line_error(code, out, err, "is one of the inputs", "choose another output name")
    assert snapshot(workdir) == before


# ---------------------------------------------------------------------- user errors: exit 2, one line

EDIT = ["edit", "cat.png", "--source", "a cat", "--target", "a dog", "--model", "MODEL"]
USER_ERRORS = [
    # id, argv (MODEL: the tiny model), phrases of the one stderr line
    ("no-command", [], ["required: COMMAND"]),
    ("unknown-command", ["paint"], ["invalid choice: 'paint'"]),
    ("unknown-option", EDIT + ["--colour", "red"], ["unrecognized arguments: --colour red"]),
    ("missing-target", EDIT[:4], ["required: --target"]),
    ("steps-zero", EDIT + ["--steps", "0"], ["--steps", "an integer >= 1"]),
    ("steps-not-int", EDIT + ["--steps", "ten"], ["--steps", "'ten' is not an integer"]),
    ("strength-zero", EDIT + ["--strength", "0"], ["--strength", "(0, 1]"]),
    ("strength-nan", EDIT + ["--strength", "nan"], ["--strength", "a finite number"]),
    ("threshold", EDIT + ["--threshold", "1.5"], ["--threshold", "[0, 1]"]),
    ("guidance", EDIT + ["--guidance", "-1"], ["--guidance", "a number >= 0"]),
    ("mask-samples", EDIT + ["--mask-samples", "0"], ["--mask-samples", "an integer in [1, 100000]"]),
    ("seed", EDIT + ["--seed", "-1"], ["--seed"]),
    ("dtype", EDIT + ["--dtype", "int8"], ["unknown dtype 'int8'", "fp32, bf16 or fp16"]),
    ("device", EDIT + ["--device", "tpu"], ["unknown device 'tpu'"]),
    ("out-suffix", EDIT + ["--out", "edit.bmp"], ["'.bmp'", ".png"]),
    ("same-outputs", EDIT + ["--out", "x.png", "--mask-out", "x.png"], ["would both be", "x.png"]),
    ("missing-image", ["mask", "nothing.png", *EDIT[2:]], ["nothing.png does not exist"]),
    ("eval-no-benchmark", ["eval"], ["required: benchmark", "diffedit eval --help"]),
    ("sweep-no-config", ["sweep"], ["required: config", "diffedit sweep --help"]),
]


@pytest.mark.parametrize("argv, phrases", [e[1:] for e in USER_ERRORS], ids=[e[0] for e in USER_ERRORS])
def test_user_errors_exit_2_with_one_line(workdir, tiny_model_folder, capsys, monkeypatch, argv, phrases):
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    code, out, err = run_cli([tiny_model_folder if a == "MODEL" else a for a in argv], capsys)
    assert_one_line_error(code, out, err, *phrases)
    assert snapshot(workdir) == before


def test_commands_come_from_the_table(capsys, monkeypatch):
    """A command is one COMMANDS entry; a name without an entry is refused in one line."""
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command("say hello", lambda p: p.add_argument("--name"),
                                                           lambda args: print(f"hello {args.name}") or 0))
    assert run_cli(["hello", "--name", "DiffEdit"], capsys)[:2] == (0, "hello DiffEdit\n")
    monkeypatch.delitem(cli.COMMANDS, "eval")
    code, out, err = run_cli(["eval", "shapes"], capsys)
    assert_one_line_error(code, out, err, "invalid choice: 'eval'", "--help")


def console_command() -> list[str]:
    script = Path(sys.executable).parent / "diffedit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "diffedit.cli"]


def test_console_script_user_error_no_traceback(workdir):
    run = subprocess.run(console_command() + ["edit", "missing.png", "--source", "a", "--target", "b"],
                         cwd=workdir, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["diffedit: error: the image file missing.png does not exist; check the path."]
    assert run.stdout == ""


# ---------------------------------------------------------------------- progress

class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_and_erases():
    from diffedit.io.progress import progress_bar
    stream = FakeTerminal()
    bar = progress_bar(40, "UNet samples", stream=stream, description="mask")
    bar.update(10)
    bar.refresh()
    bar.set_description_str("decode")
    bar.update(30)
    bar.refresh()
    bar.close()
    text = stream.getvalue()
    assert "mask:  25%" in text and "10/40" in text, text
    assert "decode: 100%" in text and "40/40" in text, text
    assert text.endswith("\r") or text.endswith("\x1b[A") or text.rstrip(" ").endswith("\r"), repr(text[-20:])
    silent = io.StringIO()  # not a terminal: nothing at all
    bar = progress_bar(40, "UNet samples", stream=silent)
    bar.update(20)
    bar.close()
    assert silent.getvalue() == ""


def test_progress_counts_every_unet_sample(workdir, tiny_model_folder, capsys, monkeypatch):
    """The bar's total (2n + k + 2k UNet samples) is what the run really spends: the decode phase
    ends exactly at total/total. --quiet draws nothing."""
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = cli.main(["edit", str(workdir / "cat.png"), "--source", "a cat", "--target", "a dog", "--model",
                     str(tiny_model_folder), "--steps", "5", "--strength", "0.6", "--mask-samples", "3"])
    assert code == 0
    total = 2 * 3 + 3 + 2 * 3
    text = terminal.getvalue()
    for label, done in (("mask", 0), ("encode", 6), ("encode", 9), ("decode", 11), ("decode", 15)):
        assert f"{label}: " in text and f"{done}/{total} [" in text, (label, done, text)
    assert "UNet samples" in text
    terminal.seek(0)
    terminal.truncate()
    code = cli.main(["mask", str(workdir / "cat.png"), "--source", "a cat", "--target", "a dog", "--model",
                     str(tiny_model_folder), *FAST, "--out", str(workdir / "quiet.png"), "--quiet"])
    assert code == 0 and terminal.getvalue() == ""


# ---------------------------------------------------------------------- interrupted runs

# The CLI with image_io.atomic_write (io/saving.py) made slow: each output is written in 20 flushed chunks
# `delay` seconds apart, announced on stdout, so a signal can land in the middle of a write.
SLOW_WRITES = textwrap.dedent("""
    import io, sys, time
    from pathlib import Path
    import diffedit.io.saving as image_io
    from diffedit.cli import main

    delay, argv = float(sys.argv[1]), sys.argv[2:]
    real_atomic_write = image_io.atomic_write

    def slow_atomic_write(path, write_fn, **kwargs):
        def slowly(f):
            buffer = io.BytesIO()
            write_fn(buffer)
            data = buffer.getvalue()
            print("writing", Path(path).name, flush=True)
            step = max(1, len(data) // 20)
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(delay)
        return real_atomic_write(path, slowly, **kwargs)

    image_io.atomic_write = slow_atomic_write
    sys.exit(main(argv))
""")


def start_slow_cli(workdir: Path, model: Path, delay: float, *extra: str) -> subprocess.Popen:
    argv = ["edit", "cat.png", "--source", "a cat", "--target", "a dog", "--model", str(model), *FAST, *extra]
    return subprocess.Popen([sys.executable, "-c", SLOW_WRITES, str(delay), *argv], cwd=workdir, env=ONE_THREAD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, wanted: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the CLI ended before {wanted!r}: {process.stderr.read()}")
        if line.strip() == wanted:
            return
    raise AssertionError(f"no {wanted!r} within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()
    process.stderr.close()


def leftovers(workdir: Path) -> list[str]:
    return sorted(n for n in os.listdir(workdir) if n not in ("cat.png", "cat.edit.png", "cat.mask.png", "cat.panel.png"))


def test_sigkill_mid_write_leaves_no_partial_output(workdir, tiny_model_folder, capsys):
    """SIGKILL (no handler can run) while the second output, the mask, is half written."""
    process = start_slow_cli(workdir, tiny_model_folder, 0.05)
    try:
        wait_for_line(process, "writing cat.mask.png")
        time.sleep(0.3)  # about 6 of the 20 chunks are on disk
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=120) == -signal.SIGKILL
    finally:
        stop(process)
    assert_png(workdir / "cat.edit.png", (W, H), "RGB")  # written before the kill: complete
    assert not (workdir / "cat.mask.png").exists() and not (workdir / "cat.panel.png").exists()
    temps = leftovers(workdir)  # at most the killed writer's temporary file, clearly named
    assert len(temps) == 1 and is_temp_file(temps[0]), temps
    assert temps[0].startswith(".cat.mask.png.tmp-") and f".tmp-{process.pid}-" in temps[0]
    assert (workdir / temps[0]).stat().st_size > 0  # it really was killed mid-write
    assert not any(is_temp_file(p) for p in workdir.glob("*.png"))  # a glob for outputs never sees it

    # The next run, without --overwrite, does not take the temp for an existing cat.mask.png, and
    # deletes it (its writer is dead).
    code, _, err = run_cli(["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog", "--model",
                            tiny_model_folder, *FAST, "--out", workdir / "again.png", "--mask-out", workdir / "cat.mask.png",
                            "--panel-out", workdir / "cat.panel.png", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(workdir)) == ["again.png", "cat.edit.png", "cat.mask.png", "cat.panel.png", "cat.png"]
    assert_png(workdir / "cat.mask.png", (W, H), "L")


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_write_cleans_up(workdir, tiny_model_folder, capsys, monkeypatch, signum, status, word):
    """Ctrl-C (SIGINT) or SIGTERM delivered to this process while the edit is half written: the
    handler runs, the temporary file is removed, exit status 130 / 143 and one line."""
    real = image_io.atomic_write

    def signalled(path, write_fn, **kwargs):
        def half(f):
            f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
            f.flush()
            signal.raise_signal(signum)
            time.sleep(5)  # never reached: the handler raises first
        return real(path, half, **kwargs)
    monkeypatch.setattr(image_io, "atomic_write", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    # A background job of a non-interactive shell inherits SIGINT ignored; Ctrl-C comes from a
    # terminal, where Python's own handler is installed: install it for this test.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = run_cli(["edit", workdir / "cat.png", "--source", "a cat", "--target", "a dog", "--model",
                                  tiny_model_folder, *FAST], capsys)
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert code == status and out == ""
    assert err == [f"diffedit: error: {word}; no output file was left half-written."]
    assert sorted(os.listdir(workdir)) == ["cat.png"]  # not even a temporary file
    assert signal.getsignal(signal.SIGTERM) is handler  # main() put the previous handler back


@pytest.mark.slow
def test_sigkill_at_random_times(workdir, tiny_model_folder):
    """Kill the CLI at random moments of a whole run (loading, computing, any write): every output
    is either absent or a complete valid PNG of the input's size, and any other file is a temp."""
    process = start_slow_cli(workdir, tiny_model_folder, 0.02)
    start = time.monotonic()
    try:
        assert process.wait(timeout=600) == 0
    finally:
        stop(process)
    duration = time.monotonic() - start
    rng = random.Random(1234)
    for delay in sorted(rng.uniform(0.2, duration) for _ in range(4)):
        for name in leftovers(workdir) + ["cat.edit.png", "cat.mask.png", "cat.panel.png"]:
            (workdir / name).unlink(missing_ok=True)
        process = start_slow_cli(workdir, tiny_model_folder, 0.02)
        try:
            time.sleep(delay)
            process.kill()
            process.wait(timeout=120)
        finally:
            stop(process)
        for name in ("cat.edit.png", "cat.mask.png"):
            if (workdir / name).exists():
                assert_png(workdir / name, (W, H))
        if (workdir / "cat.panel.png").exists():
            assert_png(workdir / "cat.panel.png")
        assert all(is_temp_file(name) for name in leftovers(workdir)), leftovers(workdir)
