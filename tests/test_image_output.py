"""Image output: mask pictures and panels, and atomic outputs (refusals, failures midway, a writer
killed with SIGKILL, stale temporary files of dead processes).

Inputs are tested in test_image_input.py and test_image_refusals.py."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffedit.io.images as image_io
from diffedit.errors import OutputFileError, ParameterError
from diffedit.io.files import atomic_write, atomic_write_text
from diffedit.io.images import Geometry
from diffedit.io.saving import save_image
from diffedit.io.pictures import mask_to_pil, overlay_mask, side_by_side
from reference_models import noise_image, snapshot

pytestmark = pytest.mark.usefixtures("fresh_image_warnings")

REPO = Path(__file__).resolve().parents[1]
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


# ---------------------------------------------------------------------- masks and panels


def test_binary_mask_nearest():
    mask = torch.tensor([[True, False], [False, True]])
    out = np.asarray(mask_to_pil(mask, (4, 4)))
    np.testing.assert_array_equal(out, np.kron([[255, 0], [0, 255]], np.ones((2, 2), int)))
    assert mask_to_pil(mask.float()[None, None], (4, 4)).tobytes() == out.tobytes()
    assert mask_to_pil(np.array([[255, 0], [0, 255]], np.uint8), (4, 4)).tobytes() == out.tobytes()


def test_soft_map_bilinear_then_threshold():
    soft = torch.tensor([[0.0, 0.2], [0.6, 1.0]])
    geometry = Geometry(original_size=(30, 20), working_size=(16, 16))
    smooth = mask_to_pil(soft, geometry)
    assert smooth.mode == "L" and smooth.size == (30, 20)
    values = np.asarray(smooth)
    assert len(np.unique(values)) > 10 and values.min() == 0 and values.max() == 255
    hard = np.asarray(mask_to_pil(soft, geometry, threshold=0.5))
    assert set(np.unique(hard)) == {0, 255}
    disagree = (hard == 255) != (values > 127.5)
    assert (np.abs(values[disagree].astype(int) - 127.5) <= 1).all()          # only rounding ties


@pytest.mark.parametrize("mask, words", [
    (torch.tensor([[0.0, 2.0]]), "lie in [0, 1]"),
    (torch.tensor([[float("nan"), 0.0]]), "lie in [0, 1]"),
    (torch.zeros(2, 3, 3), "(2, 3, 3)"),
    (torch.zeros(0, 0), "(0, 0)"),
])
def test_bad_masks(mask, words):
    with pytest.raises(ParameterError) as info:
        mask_to_pil(mask, (8, 8))
    assert words in str(info.value)


def test_overlay_mask():
    image = Image.new("RGB", (8, 8), (0, 100, 200))
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    out = overlay_mask(image, mask, colour=(255, 0, 0), alpha=0.5)
    assert out.getpixel((1, 1)) == (128, 50, 100) and out.getpixel((6, 6)) == (0, 100, 200)
    with pytest.raises(ParameterError):
        overlay_mask(image, mask, alpha=1.5)
    with pytest.raises(ParameterError):
        overlay_mask(image, mask, colour=(300, 0, 0))


def test_side_by_side():
    a, b, c = Image.new("RGB", (10, 12), "red"), Image.new("L", (6, 8), 255), Image.new("RGB", (10, 12), "blue")
    panel = side_by_side([a, b, c], gap=4)
    assert panel.size == (10 + 4 + 6 + 4 + 10, 12)
    assert panel.getpixel((0, 0)) == (255, 0, 0) and panel.getpixel((14, 6)) == (255, 255, 255)
    assert panel.getpixel((12, 6)) == (255, 255, 255) and panel.getpixel((29, 11)) == (0, 0, 255)
    labelled = side_by_side([a, b, c], ["input", "mask", "edit"], gap=4)
    assert labelled.width == panel.width and labelled.height > panel.height
    assert np.asarray(labelled)[12:].min() < 100                   # some dark label text was drawn
    big = side_by_side([a, b, c], ["input", "mask", "edit"], gap=4, min_side=30, title="a -> b")
    assert big.width == 3 * 10 + 4 + 5 * 6 + 4 + 3 * 10              # whole factors: 3, 5 (ceil(30 / 6)), 3
    assert np.asarray(big)[:, :30].reshape(-1, 3).tolist().count([255, 0, 0]) == 30 * 36   # every pixel a 3x3 block
    assert big.height > 5 * 8 and np.asarray(big)[:8].min() < 100    # the title line, dark text on top
    strip = side_by_side([Image.new("RGB", (3000, 2)), Image.new("RGB", (300, 8))], gap=0, min_side=256)
    assert strip.size == (3000 + 300 * 6, 6 * 8)   # never enlarged past MAX_ENLARGED_SIDE (2048 // 300 = 6)
    with pytest.raises(ParameterError, match="2 labels for 3 images"):
        side_by_side([a, b, c], ["x", "y"])
    with pytest.raises(ParameterError, match="at least one"):
        side_by_side([])


# ---------------------------------------------------------------------- atomic outputs


@pytest.mark.parametrize("name, fmt", [("o.png", "PNG"), ("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")])
def test_save_image_formats(tmp_path, name, fmt):
    image = Image.new("RGB", (16, 8), (10, 120, 240))
    assert save_image(image, tmp_path / name) == tmp_path / name
    with Image.open(tmp_path / name) as saved:
        assert saved.format == fmt and saved.size == (16, 8)
        assert np.abs(np.asarray(saved.convert("RGB")).astype(int) - (10, 120, 240)).max() <= 6
    assert sorted(os.listdir(tmp_path)) == [name]


def test_save_image_keeps_masks_gray_and_flattens_for_jpeg(tmp_path):
    save_image(Image.new("L", (8, 8), 255), tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "L"
    save_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").convert("RGB").getpixel((4, 4)) >= (250, 250, 250)
    save_image(torch.zeros(3, 8, 8), tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").getpixel((1, 1)) == (0, 0, 0)


def _link_to_input(tmp):
    (tmp / "view.png").symlink_to(tmp / "input.png")
    return tmp / "view.png"


def _hardlink_to_input(tmp):
    os.link(tmp / "input.png", tmp / "hard.png")
    return tmp / "hard.png"


def _unwritable(tmp, monkeypatch):
    monkeypatch.setattr(image_io.os, "access", lambda *a, **k: False)
    return tmp / "out.png"


def _temp_not_creatable(tmp, monkeypatch):
    real_open = os.open

    def refuse_temps(path, *args, **kwargs):
        if ".tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image_io.os, "open", refuse_temps)
    return tmp / "out.png"


BAD_OUTPUTS = [
    # id, make the target, save kwargs, the words the message must contain
    ("exists", lambda t, m: t / "existing.png", {}, ["already exists", "overwrite"]),
    ("is-input", lambda t, m: t / "input.png", {"overwrite": True}, ["is one of the inputs"]),
    ("is-input-relative", lambda t, m: t / "sub" / ".." / "input.png", {"overwrite": True}, ["inputs"]),
    ("symlink-to-input", lambda t, m: _link_to_input(t), {"overwrite": True}, ["inputs"]),
    ("hardlink-to-input", lambda t, m: _hardlink_to_input(t), {"overwrite": True}, ["inputs"]),
    ("missing-folder", lambda t, m: t / "nowhere" / "out.png", {}, ["nowhere", "does not exist", "create it"]),
    ("folder-is-a-file", lambda t, m: t / "existing.png" / "out.png", {}, ["is not a folder"]),
    ("target-is-folder", lambda t, m: t / "sub.png", {"overwrite": True}, ["is a folder"]),
    ("unknown-suffix", lambda t, m: t / "out.bmp", {}, ["'.bmp'", ".png, .jpg"]),
    ("no-suffix", lambda t, m: t / "out", {}, ["(none)"]),
    ("not-writable", _unwritable, {}, ["not writable"]),
    ("temp-not-creatable", _temp_not_creatable, {}, ["cannot create a file", "Permission denied"]),
]


@pytest.mark.parametrize("make, kwargs, words", [b[1:] for b in BAD_OUTPUTS], ids=[b[0] for b in BAD_OUTPUTS])
def test_bad_outputs_refused(tmp_path, monkeypatch, make, kwargs, words):
    noise_image(16, 16, seed=1).save(tmp_path / "input.png")
    noise_image(16, 16, seed=2).save(tmp_path / "existing.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub.png").mkdir()
    target = make(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    with pytest.raises(OutputFileError) as info:
        save_image(noise_image(16, 16, seed=3), target, protected=[tmp_path / "input.png"], **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert message.endswith(".") and "\n" not in message
    assert snapshot(tmp_path) == before


def test_overwrite_allowed(tmp_path):
    noise_image(16, 16, seed=2).save(tmp_path / "existing.png")
    new = noise_image(16, 16, seed=3)
    save_image(new, tmp_path / "existing.png", overwrite=True, protected=[tmp_path / "other.png"])
    assert Image.open(tmp_path / "existing.png").tobytes() == new.tobytes()
    assert os.listdir(tmp_path) == ["existing.png"]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error, expected", [
    (Boom("midway"), Boom),
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), OutputFileError),
])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_nothing(tmp_path, error, expected, existing):
    target = tmp_path / "table.csv"
    if existing:
        target.write_text("old,content\n")
    before = snapshot(tmp_path)

    def write_then_fail(f):
        f.write(b"x" * 100_000)
        raise error

    with pytest.raises(expected) as info:
        atomic_write(target, write_then_fail, overwrite=True)
    if expected is OutputFileError:
        assert "No space left on device" in str(info.value)
    assert snapshot(tmp_path) == before


def test_file_created_meanwhile_is_not_clobbered(tmp_path):
    target = tmp_path / "out.json"

    def racing_writer(f):
        target.write_text("someone else's")
        f.write(b"mine")

    with pytest.raises(OutputFileError, match="created by someone else"):
        atomic_write(target, racing_writer)
    assert target.read_text() == "someone else's" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "r.json", '{"é": 1}\n')
    assert (tmp_path / "r.json").read_bytes() == '{"é": 1}\n'.encode()
    with pytest.raises(OutputFileError, match="already exists"):
        atomic_write_text(tmp_path / "r.json", "{}")
    atomic_write_text(tmp_path / "r.json", "{}", overwrite=True)
    assert (tmp_path / "r.json").read_text() == "{}" and os.listdir(tmp_path) == ["r.json"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_processes_cleaned(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.csv.tmp-{dead}-0123abcd"
    busy = tmp_path / f".out.csv.tmp-{alive}-0123abcd"          # a writer that still runs: kept
    other = tmp_path / f".other.csv.tmp-{dead}-0123abcd"        # another target's temp: not ours to judge
    lookalike = tmp_path / ".out.csv.tmp-notes"
    for p in (stale, busy, other, lookalike):
        p.write_text("partial")
    atomic_write_text(tmp_path / "out.csv", "a,b\n")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.csv", busy.name, other.name, lookalike.name])


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from diffedit.io.files import atomic_write

    def write(f):
        chunk = b"x" * (1 << 20)
        for i in range(10_000):
            f.write(chunk)
            f.flush()
            if i == 8:
                print("writing", flush=True)
            time.sleep(0.005)

    atomic_write(sys.argv[1], write, overwrite=True)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_midway_leaves_no_partial_output(tmp_path, existing):
    target = tmp_path / "big.bin"
    if existing:
        target.write_bytes(b"previous result")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()
    if existing:
        assert target.read_bytes() == b"previous result"
    else:
        assert not target.exists()
    leftovers = [n for n in os.listdir(tmp_path) if n != "big.bin"]
    assert len(leftovers) == 1
    match = TEMP_NAME.match(leftovers[0])
    assert match and match["name"] == "big.bin" and int(match["pid"]) == writer.pid
    assert (tmp_path / leftovers[0]).stat().st_size >= 9 << 20          # it really was killed mid-write
    atomic_write(target, lambda f: f.write(b"next run"), overwrite=True)
    assert target.read_bytes() == b"next run" and os.listdir(tmp_path) == ["big.bin"]
