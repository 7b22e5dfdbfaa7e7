"""Issue 8, every misuse in one table: bad images, prompts, parameters, models, numerics and
files. Each case runs the `diffedit edit` command line (in this process, on the tiny random
model) and checks
  - the answer: a refusal is exit status 2 and ONE line on stderr holding the case's key phrase;
    an accepted oddity succeeds, says what it did (a warning line) when it changed something, and
    its outputs have the input's (displayed) size;
  - the folder: a snapshot (size, mtime, sha256 of every file) before and after shows that no file
    other than the intended outputs appeared or changed.
test_misuse_api.py shows that the Python API raises the same exception, with the same sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffedit.io.saving as image_io
import diffedit.pipeline as pipeline_module
from diffedit import errors
from diffedit.pipeline import DiffEditPipeline
from reference_models import assert_png, noise_image, run_cli, snapshot

FAST = ["--steps", "4", "--mask-samples", "2"]
OUTPUTS = ("in.edit.png", "in.mask.png", "in.panel.png")


# ---------------------------------------------------------------------- builders of bad inputs

def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def rgb(w: int = 53, h: int = 37) -> Image.Image:
    return noise_image(w, h, seed=1)


def truncated(path: Path, fmt: str) -> Path:
    rgb(64, 48).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def rgba() -> Image.Image:
    image = rgb().convert("RGBA")
    alpha = np.full((37, 53), 255, np.uint8)
    alpha[:, :20] = 0
    image.putalpha(Image.fromarray(alpha))
    return image


def exif_rotated(path: Path) -> Path:
    """40 x 24 stored, EXIF orientation 6 (displayed rotated 90 degrees clockwise: 24 x 40), the
    stored top rows red: displayed, they are the right-hand columns."""
    a = np.asarray(rgb(40, 24)).copy()
    a[:4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def mask_file(path: Path, w: int, h: int, gray: bool = False, black: bool = False) -> Path:
    a = np.zeros((h, w), np.uint8)
    if not black:
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        if gray:
            a[h // 4, w // 4: 3 * w // 4] = 128
    Image.fromarray(a).save(path)
    return path


def model_variant(tmp: Path, base: Path, component: str, change: Callable[[Path], None]) -> Path:
    """A copy of the base model whose `component` is changed (copies, not links: a link out of a
    model folder is refused)."""
    folder = tmp / "model"
    shutil.copytree(base, folder)
    change(folder / component)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensor(path: Path, key: str, fn) -> None:
    tensors = load_file(path)
    tensors[key] = fn(tensors[key])
    save_file(tensors, path)


def one_inf(w: torch.Tensor) -> torch.Tensor:
    """A weight with one infinite entry: an overflow the decoder turns into NaN everywhere."""
    w = w.clone()
    w.view(-1)[0] = float("inf")
    return w


def corrupt_header(folder: Path) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[9:40] = b"\xff" * 31
    path.write_bytes(bytes(data))


def truncate_weights(folder: Path) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def evil_checkpoint(tmp: Path, base: Path) -> Path:
    weights = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save({"state_dict": weights, "callback": Payload(tmp / "pwned")}, tmp / "model.ckpt")
    return tmp / "model.ckpt"


# ---------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    make: Callable[[Path, Path], list]  # (folder, tiny model) -> argv after "edit", building files in folder
    refused: str | None = None          # the exception class name, None when the run must succeed
    phrases: tuple[str, ...] = ()       # in the error line; on success, in the warning lines
    size: tuple[int, int] = (53, 37)    # outputs' size on success
    outputs: tuple[str, ...] = OUTPUTS  # files a successful run writes
    patch: Callable | None = None       # (monkeypatch, folder) -> None, before the run
    check: Callable | None = None       # (folder) -> None, after the run


def image_args(name: str, prompts=("a cat", "a dog")) -> list:
    return [name, "--source", prompts[0], "--target", prompts[1], *FAST]


def with_image(build: Callable[[Path], object], *extra, prompts=("a cat", "a dog")) -> Callable:
    def make(d: Path, model: Path) -> list:
        build(d)
        return [*image_args(str(d / "in.png"), prompts), "--model", model, *extra]
    return make


def plain(*extra, prompts=("a cat", "a dog")) -> Callable:
    return with_image(lambda d: save(rgb(), d / "in.png"), *extra, prompts=prompts)


def with_model(build: Callable[[Path, Path], Path], *extra) -> Callable:
    def make(d: Path, model: Path) -> list:
        save(rgb(), d / "in.png")
        return [*image_args(str(d / "in.png")), "--model", build(d, model), *extra]
    return make


def nan_at_decoding_step(step: int) -> Callable:
    """Make the UNet answer NaN at the given decoding step (counting only the calls made inside
    DiffEditPipeline.edit, outside any inversion it runs)."""
    def patch(monkeypatch, folder):
        real_predict, real_edit, real_invert = DiffEditPipeline.predict_noise, DiffEditPipeline.edit, \
            DiffEditPipeline.invert
        state = {"decoding": False, "calls": 0}

        def poisoned(self, x_t, t, context, *args, **kwargs):
            eps = real_predict(self, x_t, t, context, *args, **kwargs)
            if state["decoding"]:
                state["calls"] += 1
                if state["calls"] == step:
                    return eps * float("nan")
            return eps

        def flagged(flag: bool, real):
            def wrapper(self, *args, **kwargs):
                before, state["decoding"] = state["decoding"], flag
                try:
                    return real(self, *args, **kwargs)
                finally:
                    state["decoding"] = before
            return wrapper
        monkeypatch.setattr(DiffEditPipeline, "predict_noise", poisoned)
        monkeypatch.setattr(DiffEditPipeline, "edit", flagged(True, real_edit))
        monkeypatch.setattr(DiffEditPipeline, "invert", flagged(False, real_invert))
    return patch


def interrupt_mask_write(monkeypatch, folder):
    """Ctrl-C while the mask file is half written."""
    real = image_io.atomic_write

    def interrupted(path, write_fn, **kwargs):
        def half(f):
            f.write(b"\x89PNG\r\n\x1a\n half")
            raise KeyboardInterrupt
        return real(path, half if Path(path).name == "in.mask.png" else write_fn, **kwargs)
    monkeypatch.setattr(image_io, "atomic_write", interrupted)


def no_payload_ran(folder: Path) -> None:
    assert not (folder / "pwned").exists()


def displayed_upright(folder: Path) -> None:
    from diffedit.cli import PANEL_MIN_SIDE

    panel = np.asarray(Image.open(folder / "in.panel.png").convert("RGB")).astype(int)
    k = -(-PANEL_MIN_SIDE // 24)  # the panel's first picture: the input as displayed (24 x 40), enlarged k times
    lefts = [panel[y:y + 40 * k:k, :24 * k:k] for y in range(panel.shape[0] - 40 * k + 1)]  # under the title
    upright = [(left[:, -3:, 0] > 180).all() and (left[:, -3:, 1] < 90).all()                # red on the right,
               and (left[:, :4, 0] < 250).any() and not (left[:, :4, 1] < 90).all() for left in lefts]  # not left
    assert any(upright)


LONG = " ".join(["a red cat sitting on a blue chair"] * 12)  # 96 words, more than 75 tokens

CASES = [
    # ---- images
    Case("image-missing", lambda d, m: [*image_args(str(d / "missing.png")), "--model", m], "ImageInputError",
         ("missing.png does not exist", "check the path")),
    Case("image-is-folder", with_image(lambda d: (d / "in.png").mkdir()), "ImageInputError",
         ("is a folder, not an image file",)),
    Case("image-empty-file", with_image(lambda d: (d / "in.png").write_bytes(b"")), "ImageInputError",
         ("is empty (0 bytes)",)),
    Case("image-not-an-image", with_image(lambda d: (d / "in.png").write_text("hello, not pixels")),
         "ImageInputError", ("is not an image Pillow can read",)),
    Case("image-truncated-png", with_image(lambda d: truncated(d / "in.png", "PNG")), "ImageInputError",
         ("truncated or corrupt", "re-export or re-download")),
    Case("image-truncated-jpeg", with_image(lambda d: truncated(d / "in.png", "JPEG")), "ImageInputError",
         ("truncated or corrupt",)),
    Case("image-grayscale", with_image(lambda d: save(rgb().convert("L"), d / "in.png"))),
    Case("image-rgba", with_image(lambda d: save(rgba(), d / "in.png")), None,
         ("has transparency", "composited onto white", "said once")),
    Case("image-16-bit", with_image(lambda d: save(Image.fromarray(
        np.random.default_rng(0).integers(0, 65536, (37, 53), dtype=np.uint16)), d / "in.png"))),
    Case("image-palette", with_image(lambda d: save(rgb().quantize(16), d / "in.png"))),
    Case("image-exif-rotated", with_image(lambda d: exif_rotated(d / "in.png")), size=(24, 40),
         check=displayed_upright),
    Case("image-tiny", with_image(lambda d: save(rgb(5, 30), d / "in.png")), "ImageInputError",
         ("5 x 30 pixels, smaller than one latent cell (8 x 8)",)),
    Case("image-huge", with_image(lambda d: save(Image.new("L", (5000, 4000)), d / "in.png")), "ImageInputError",
         ("5000 x 4000", "above the limit of 4096 x 4096", "downscale it first, e.g. to 4578 x 3663")),
    Case("image-not-multiple-of-8", with_image(lambda d: save(rgb(61, 13), d / "in.png")), size=(61, 13)),
    # ---- prompts
    Case("prompt-target-empty", plain(prompts=("a cat", "")), "PromptError", ("the target prompt is empty",)),
    Case("prompt-target-whitespace", plain(prompts=("a cat", " \t \n ")), "PromptError",
         ("the target prompt is empty",)),
    Case("prompt-source-empty", plain(prompts=("", "a dog"))),  # the paper's empty reference text
    Case("prompt-source-whitespace", plain(prompts=("   ", "a dog"))),
    Case("prompt-too-long", plain(prompts=("a cat", LONG)), None, ("prompt truncated to 77 tokens", "tokens dropped")),
    Case("prompt-non-ascii", plain(prompts=("un chat élégant", "一只狗 🐶, ñandú"))),
    Case("prompt-source-equals-target", plain(prompts=("a cat", "a cat")), "PromptError",
         ("the source and target prompts read the same to the text encoder", "the mask would be empty")),
    Case("prompt-equal-up-to-spaces", plain(prompts=("a  cat ", "a cat")), "PromptError", ("read the same",)),
    # the tokenizer lower-cases: the two embeddings would be equal
    Case("prompt-equal-up-to-case", plain(prompts=("A Cat", "a cat")), "PromptError", ("read the same",)),
    # equal up to the 75th token; what differs is cut by the text encoder's limit
    Case("prompt-equal-up-to-truncation", plain(prompts=(LONG + " cat", LONG + " dog")), "PromptError",
         ("read the same", "past its token limit")),
    # ---- parameters
    Case("strength-zero", plain("--strength", "0"), "UsageError", ("--strength", "(0, 1]")),
    Case("strength-above-one", plain("--strength", "1.5"), "UsageError", ("--strength", "(0, 1]", "1.5")),
    Case("steps-zero", plain("--steps", "0"), "UsageError", ("--steps", "an integer >= 1")),
    Case("steps-more-than-schedule", plain("--steps", "2000"), "ParameterError",
         ("between 1 and 1000 (the schedule's length), got 2000",)),
    Case("steps-past-last-timestep", plain("--steps", "1000"), "ParameterError",
         ("past the schedule's last timestep 999", "use fewer steps")),
    Case("steps-times-strength-below-one", plain("--steps", "2", "--strength", "0.3"), "ParameterError",
         ("--strength 0.3 leaves no step out of 2", "raise --strength or the number of steps")),
    Case("mask-samples-zero", plain("--mask-samples", "0"), "UsageError", ("--mask-samples", "an integer in [1, 100000]")),
    Case("threshold-negative", plain("--threshold", "-0.1"), "UsageError", ("--threshold", "[0, 1]")),
    Case("threshold-above-one", plain("--threshold", "1.01"), "UsageError", ("--threshold", "[0, 1]")),
    Case("guidance-negative", plain("--guidance", "-0.5"), "UsageError", ("--guidance", "a number >= 0")),
    Case("user-mask-other-shape", with_image(lambda d: (save(rgb(), d / "in.png"), mask_file(d / "m.png", 37, 53)),
                                             "--mask", "DIR/m.png"), "ParameterError",
         ("is 37 x 53 pixels but the image is 53 x 37, another shape",)),
    Case("user-mask-other-size", with_image(lambda d: (save(rgb(), d / "in.png"), mask_file(d / "m.png", 106, 74)),
                                            "--mask", "DIR/m.png"), None,
         ("is 106 x 74 pixels; it was resized to the image's 53 x 37",), outputs=("in.edit.png", "in.panel.png")),
    Case("user-mask-not-binary", with_image(lambda d: (save(rgb(), d / "in.png"), mask_file(d / "m.png", 53, 37, True)),
                                            "--mask", "DIR/m.png"), None,
         ("is not black and white", "thresholded at 50%"), outputs=("in.edit.png", "in.panel.png")),
    Case("user-mask-black", with_image(lambda d: (save(rgb(), d / "in.png"), mask_file(d / "m.png", 53, 37, black=True)),
                                       "--mask", "DIR/m.png"), "ParameterError", ("is black everywhere",)),
    Case("dtype-unknown", plain("--dtype", "fp8"), "ParameterError", ("unknown dtype 'fp8'; use fp32, bf16 or fp16",)),
    Case("device-unknown", plain("--device", "gpu0"), "ParameterError", ("unknown device 'gpu0'",)),
    Case("device-cuda-missing", plain("--device", "cuda"), "ParameterError",
         ("CUDA was asked for but this machine has no CUDA device", "use the CPU (device='cpu', --device cpu)")),
    Case("dtype-fp16-on-cpu", plain("--dtype", "fp16", "--device", "cpu"), "ParameterError",
         ("fp16 is not supported on the CPU", "use bf16 for speed or fp32")),
    # ---- models
    Case("model-missing-folder", with_model(lambda d, m: d / "no-such-model"), "ModelLoadError",
         ("neither an existing folder or file nor a hub id",)),
    Case("model-missing-component", with_model(lambda d, m: model_variant(d, m, "vae", shutil.rmtree)),
         "ModelLoadError", ("not a complete diffusers-layout model: missing vae/",)),
    Case("model-corrupt-safetensors", with_model(lambda d, m: model_variant(d, m, "unet", corrupt_header)),
         "ModelLoadError", ("is not a valid safetensors file", "download it again")),
    Case("model-truncated-safetensors", with_model(lambda d, m: model_variant(d, m, "unet", truncate_weights)),
         "ModelLoadError", ("is truncated", "download it again")),
    Case("model-sd2-config-sd1-weights", with_model(lambda d, m: model_variant(
        d, m, "unet", lambda f: edit_json(f / "config.json", use_linear_projection=True))), "ModelLoadError",
         ("the UNet weights do not fit its config", "proj_in.weight", "another architecture")),
    Case("model-sdxl", with_model(lambda d, m: model_variant(d, m, "unet", lambda f: edit_json(
        f / "config.json", addition_embed_type="text_time", cross_attention_dim=2048))), "ModelLoadError",
         ("this UNet looks like SDXL",)),
    Case("model-inpainting", with_model(lambda d, m: model_variant(
        d, m, "unet", lambda f: edit_json(f / "config.json", in_channels=9))), "ModelLoadError",
         ("looks like an inpainting model",)),
    Case("model-pickle-runs-code", with_model(evil_checkpoint, "--preset", "tiny"), "UnsafeCheckpointError",
         ("asks to run code", "refused and nothing was executed"), check=no_payload_ran),
    Case("model-embedded-missing", lambda d, m: (save(rgb(), d / "in.png"), image_args(str(d / "in.png")))[1],
         "ModelLoadError", ("the embedded model", "is not installed", "(--model on the command line)"),
         patch=lambda mp, d: mp.setattr(pipeline_module, "EMBEDDED_MODEL", d / "weights" / "shapes-64")),
    # ---- numerics
    Case("nan-in-vae-decoding", with_model(lambda d, m: model_variant(d, m, "vae", lambda f: edit_tensor(
        f / "diffusion_pytorch_model.safetensors", "decoder.conv_in.weight", one_inf))), "ModelLoadError",
         ("the VAE weight decoder.conv_in.weight holds NaN or inf values", "download it again")),  # issue 18: at load
    Case("nan-at-a-decoding-step", plain(), "NumericalError",
         ("NaN or inf appeared in the decoding latents at step 2", "precision is not the cause"),  # fp32 (issue 18)
         patch=nan_at_decoding_step(2)),
    # ---- files
    Case("out-is-the-input", plain("--out", "IN", "--overwrite"), "OutputFileError", ("is one of the inputs",)),
    Case("out-exists", with_image(lambda d: (save(rgb(), d / "in.png"), save(rgb(), d / "in.edit.png"))),
         "OutputFileError", ("in.edit.png already exists", "--overwrite")),
    Case("out-folder-missing", plain("--out", "DIR/nowhere/x.png"), "OutputFileError",
         ("nowhere does not exist; create it first",)),
    Case("out-folder-not-writable", plain(), "OutputFileError", ("is not writable",),
         patch=lambda mp, d: mp.setattr(os, "access", lambda *a, **k: False)),
    Case("out-unknown-suffix", plain("--panel-out", "DIR/panel.tiff"), "OutputFileError",
         ("cannot tell the image format", "'.tiff'")),
    Case("out-two-outputs-one-file", plain("--mask-out", "DIR/same.png", "--panel-out", "DIR/same.png"),
         "OutputFileError", ("the mask and the panel outputs would both be",)),
    Case("interrupted-mid-write", plain(), "KeyboardInterrupt", ("interrupted; no output file was left half-written",),
         outputs=(), patch=interrupt_mask_write),  # all or none (issue 18): the finished edit is taken back
]


def materialise(argv: list, folder: Path) -> list[str]:
    """Placeholders: IN = the input image, DIR/... = inside the case's folder."""
    out = []
    for a in argv:
        a = str(a)
        a = str(folder / "in.png") if a == "IN" else a
        out.append(str(folder / a[4:]) if a.startswith("DIR/") else a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_misuse(case: Case, tmp_path, tiny_model_folder, capsys, monkeypatch, fresh_image_warnings):
    argv = ["edit", *materialise(case.make(tmp_path, tiny_model_folder), tmp_path)]
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    monkeypatch.undo()
    after = snapshot(tmp_path)
    if case.refused is None:
        assert code == 0, err
        warnings = [line for line in err if line.startswith("diffedit: warning: ")]
        assert warnings == err, err  # nothing but warnings on stderr
        for phrase in case.phrases:
            assert any(phrase in line for line in warnings), (phrase, err)
        if not case.phrases:
            assert err == []
        for name in case.outputs:
            assert_png(tmp_path / name, case.size if not name.endswith("panel.png") else None)
    else:
        expected_status = 130 if case.refused == "KeyboardInterrupt" else 2
        assert code == expected_status, (code, err)
        assert len(err) == 1 and err[0].startswith("diffedit: error: "), err
        assert out.splitlines() == [f"{name.split('.')[1]}: {tmp_path / name}" for name in case.outputs
                                    if case.refused == "KeyboardInterrupt"]  # the files finished before
        for phrase in case.phrases:
            assert phrase in err[0], (phrase, err[0])
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert sorted(set(after) - set(before)) == sorted(case.outputs if case.refused in (None, "KeyboardInterrupt")
                                                      else [])
    if case.check is not None:
        case.check(tmp_path)


def test_every_table_case_names_its_exception_class():
    names = {c.refused for c in CASES} - {None, "KeyboardInterrupt", "UsageError"}
    assert all(issubclass(getattr(errors, name), errors.DiffEditError) for name in names)


def test_alpha_is_said_once_per_process(tmp_path, tiny_model_folder, capsys, fresh_image_warnings):
    save(rgba(), tmp_path / "in.png")
    lines = []
    for out in ("a.png", "b.png"):
        code, _, err = run_cli(["edit", tmp_path / "in.png", "--source", "a cat", "--target", "a dog", "--model",
                                tiny_model_folder, *FAST, "--out", tmp_path / out, "--mask-out", tmp_path / f"m{out}",
                                "--panel-out", tmp_path / f"p{out}", "--quiet"], capsys)
        assert code == 0
        lines.append(err)
    assert len(lines[0]) == 1 and "has transparency" in lines[0][0] and lines[1] == []


def test_hub_id_offline_not_in_cache(tmp_path):
    save(rgb(), tmp_path / "in.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    before = snapshot(tmp_path)
    run = subprocess.run([sys.executable, "-m", "diffedit.cli", "edit", "in.png", "--source", "a cat", "--target",
                          "a dog", "--model", "nobody/not-in-cache"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert "cannot get 'nobody/not-in-cache': it is not in the Hugging Face cache" in run.stderr
    assert "`hf download nobody/not-in-cache`" in run.stderr
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("hf/")} == before
