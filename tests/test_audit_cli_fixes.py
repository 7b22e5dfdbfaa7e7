"""The command line's audit fixes: refusals that come before the model loads (--mask with
--mask-out, an output format too small for its image, a folder as --out, a ~user without a home
folder), the encoder's own failure named as such, the panel's size known before it is drawn, and
the help that states the image and step limits."""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
from PIL import Image

import diffedit.io.files as files
from diffedit import cli
from diffedit.errors import ImageInputError, OutputFileError
from diffedit.io.images import DEFAULT_MAX_PIXELS, load_image
from diffedit.io.saving import save_image
from diffedit.io.pictures import side_by_side
from reference_models import run_cli, snapshot

PROMPTS = ["--source", "a red circle", "--target", "a blue circle"]
NO_HOME = "~no_such_user_d1ffed1t"


@pytest.fixture
def no_model(monkeypatch):
    """Every refusal here comes before the model loads: loading it fails the test."""
    def load(args):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(cli, "load_pipeline", load)


def one_line_error(code: int, out: str, err: list[str], *phrases: str) -> str:
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("diffedit: error: "), (code, out, err)
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])
    return err[0]


def gray(path, size) -> str:
    Image.new("L", size, 255).save(path)
    return str(path)


# ---------------------------------------------------------------------- --mask with --mask-out

def test_mask_out_with_a_given_mask_is_refused(tmp_path, no_model, capsys):
    image, mask = gray(tmp_path / "in.png", (24, 16)), gray(tmp_path / "m.png", (24, 16))
    before = snapshot(tmp_path)
    code, out, err = run_cli(["edit", image, *PROMPTS, "--mask", mask, "--mask-out", tmp_path / "mm.png"], capsys)
    one_line_error(code, out, err, "--mask-out", "--mask", "none is computed", "leave out --mask-out")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- output size limits

@pytest.mark.parametrize("command, size, flag, name, phrases", [
    ("edit", (16400, 8), "--out", "e.webp", ["the edit output", "16400 x 8 pixels", "WebP", "16383"]),
    ("edit", (6000, 8), "--panel-out", "p.webp", ["the panel output", "WebP", "16383"]),   # three images wide
    ("edit", (65501, 8), "--mask-out", "m.jpg", ["the mask output", "65501 x 8 pixels", "JPEG", "65500"]),
    ("mask", (65501, 8), "--out", "m.jpeg", ["the mask output", "JPEG", "65500"]),
])
def test_output_too_large_for_its_format_is_refused_up_front(tmp_path, no_model, capsys, command, size, flag, name,
                                                             phrases):
    image = gray(tmp_path / "in.png", size)
    before = snapshot(tmp_path)
    code, out, err = run_cli([command, image, *PROMPTS, flag, tmp_path / name], capsys)
    line = one_line_error(code, out, err, *phrases, ".png name")
    assert "disk space" not in line
    assert snapshot(tmp_path) == before


def test_outputs_within_the_limits_pass():
    files.check_image_size("e.webp", (16383, 16383))
    files.check_image_size("e.jpg", (65500, 8))
    files.check_image_size("e.png", (200_000, 8))
    with pytest.raises(OutputFileError, match="more than WebP allows"):
        files.check_image_size("e.webp", (8, 16384))


def test_save_image_checks_the_size_before_writing(tmp_path):
    with pytest.raises(OutputFileError, match=r"16384 x 8 pixels, more than WebP allows \(16383"):
        save_image(Image.new("RGB", (16384, 8)), tmp_path / "wide.webp")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, size, reason", [("wide.webp", (16384, 8), "WebP limit"),
                                                ("wide.jpg", (65501, 8), "broken data stream")])
def test_encoder_failure_names_the_encoder_not_the_disk(tmp_path, monkeypatch, name, size, reason):
    monkeypatch.setattr(files, "MAX_SIDE", {})   # past the up-front check: the encoder itself refuses
    with pytest.raises(OutputFileError) as info:
        save_image(Image.new("RGB", size), tmp_path / name)
    message = str(info.value)
    assert "encoder could not write" in message and reason in message and "disk space" not in message, message
    assert message.count("; ") == 1 and info.value.__cause__ is None
    assert list(tmp_path.iterdir()) == []   # no temporary file left behind


@pytest.mark.parametrize("sizes, title", [([(53, 37)] * 3, "source: a cat\ntarget: a dog"),
                                          ([(6000, 8)] * 3, "source: (empty)\ntarget: x"),
                                          ([(300, 200), (64, 64), (9, 40)], None)])
def test_panel_size_is_known_before_drawing(sizes, title):
    from diffedit.io.pictures import side_by_side_size
    labels = cli.PANEL_LABELS
    panel = side_by_side([Image.new("RGB", s) for s in sizes], labels=labels, min_side=cli.PANEL_MIN_SIDE,
                         title=title)
    assert side_by_side_size(sizes, labels, min_side=cli.PANEL_MIN_SIDE, title=title) == panel.size


# ---------------------------------------------------------------------- paths

def test_out_that_is_a_folder_says_so(tmp_path, no_model, capsys):
    image = gray(tmp_path / "in.png", (24, 16))
    (tmp_path / "outdir").mkdir()
    code, out, err = run_cli(["edit", image, *PROMPTS, "--out", tmp_path / "outdir"], capsys)
    line = one_line_error(code, out, err, "outdir is a folder", "file name")
    assert "suffix" not in line


@pytest.mark.parametrize("where", ["image", "out", "mask", "mask-command"])
def test_home_of_an_unknown_user_is_one_sentence(tmp_path, no_model, capsys, where):
    image = gray(tmp_path / "in.png", (24, 16))
    argv = {"image": ["edit", f"{NO_HOME}/in.png", *PROMPTS],
            "out": ["edit", image, *PROMPTS, "--out", f"{NO_HOME}/e.png"],
            "mask": ["edit", image, *PROMPTS, "--mask", f"{NO_HOME}/m.png"],
            "mask-command": ["mask", image, *PROMPTS, "--out", f"{NO_HOME}/m.png"]}[where]
    code, out, err = run_cli(argv, capsys)
    one_line_error(code, out, err, f"starts with {NO_HOME}", "no home folder is known", "write the path out in full")


@pytest.mark.parametrize("argv", [["sweep", f"{NO_HOME}/cfg.json"], ["sweep", "merge", f"{NO_HOME}/run"],
                                  ["bench", "pairs", f"{NO_HOME}/pairs.csv"], ["bench", "report", f"{NO_HOME}/run"],
                                  ["eval", "shapes", "--out", f"{NO_HOME}/ev"], ["edit", "in.png", "--source", "a",
                                                                               "--target", "b", "--model", f"{NO_HOME}/m"]],
                         ids=["sweep", "merge", "bench-pairs", "bench-report", "eval-out", "model"])
def test_home_of_an_unknown_user_is_one_sentence_in_every_command(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    gray(tmp_path / "in.png", (24, 16))
    code, out, err = run_cli(argv, capsys)
    one_line_error(code, out, err, f"starts with {NO_HOME}", "no home folder is known")


def test_user_path_refusals_keep_their_error_class():
    with pytest.raises(ImageInputError, match="no home folder is known"):
        load_image(f"{NO_HOME}/in.png")
    with pytest.raises(OutputFileError, match="no home folder is known"):
        files.check_output(f"{NO_HOME}/out.png")


# ---------------------------------------------------------------------- the image size limit

@pytest.mark.parametrize("size", [(5000, 4000), (4097, 4097), (20000, 900), (900, 20000)])
def test_too_large_image_message_gives_a_size_that_fits(size):
    with pytest.raises(ImageInputError) as info:
        load_image(Image.new("L", size))
    message = str(info.value)
    assert "max_pixels" not in message, message          # not a setting the command line or pipeline exposes
    w, h = map(int, re.search(r"e\.g\. to (\d+) x (\d+)", message).groups())
    assert w * h <= DEFAULT_MAX_PIXELS and abs(w / h - size[0] / size[1]) < 0.01 * size[0] / size[1]
    load_image(np.zeros((h, w), np.uint8))                   # the advice is followed: accepted


# ---------------------------------------------------------------------- help

def subparser(command: str) -> argparse.ArgumentParser:
    return cli.build_parser(command)._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize("command", ["edit", "mask"])
def test_help_states_the_limits_and_steps_is_a_general_option(command):
    parser = subparser(command)
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert groups["num_inference_steps"] == groups["source"]            # with the prompts, not in the mask group
    steps = next(a for a in parser._actions if a.dest == "num_inference_steps")
    assert "encoding and the decoding" in steps.help and "999" in steps.help and "1000" in steps.help
    image = next(a for a in parser._actions if a.dest == "image").help
    side = math.isqrt(DEFAULT_MAX_PIXELS)
    assert "any size" not in image and f"{side} x {side}" in image and f"{DEFAULT_MAX_PIXELS / 1e6:.1f} MP" in image
    assert "at least 8 pixels" in image
