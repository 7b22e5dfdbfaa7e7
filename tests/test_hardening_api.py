"""Issue 18, the API and command-line side, one table per class (the model files are in
test_hardening_models.py). Every public method of the pipeline checks its arguments at the door
(diffedit.arguments.door: the settings table plus the non-setting arguments), so a wrong argument
raises the project's own exception with one sentence naming the parameter, before any work.

Classes: 5 silent misbehaviour (NaN/negative settings, --out "", a failed third output), 6 wrong
or misleading messages (NaN/inf in fp32 blamed on precision, internal names, the mask noise called
"strength"), 7 API types (class 8, signals at start-up, is test_signals.py); and the decisions of
README "Inputs" (animated images: first frame and one warning; resolution: a multiple of 8)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import arguments, errors
from diffedit.io import files
from diffedit.pipeline import DiffEditPipeline
from reference_models import noise_image, run_cli, snapshot

REPO = Path(__file__).resolve().parents[1]
IMAGE = str(REPO / "weights" / "examples" / "red-circle.png")
FAST = ["--steps", "4", "--mask-samples", "2"]


@pytest.fixture(scope="module")
def pipe() -> DiffEditPipeline:
    return DiffEditPipeline.from_pretrained()


@pytest.fixture(scope="module")
def inversion(pipe):
    return pipe.invert(IMAGE, strength=0.5, num_inference_steps=4)


meta = torch.empty(3, 8, 8, device="meta")
nan_mask = torch.full((8, 8), float("nan"))


@dataclass(frozen=True)
class Call:
    id: str
    method: str
    args: tuple
    kwargs: dict
    error: type
    phrase: str


def M(id, *args, error=errors.ParameterError, phrase="", **kwargs):  # generate_mask
    return Call(id, "generate_mask", args if args else (IMAGE, "a red circle", "a red square"), kwargs, error, phrase)


CLASS_7_TYPES = [
    M("source-none", IMAGE, None, "b", error=errors.PromptError, phrase="source_prompt must be a string"),
    M("target-int", IMAGE, "a", 5, error=errors.PromptError, phrase="target_prompt must be a string"),
    M("target-empty-list", IMAGE, "a", [], error=errors.PromptError, phrase="target_prompt must be a string"),
    M("target-list-with-int", IMAGE, "a", ["b", 3], error=errors.PromptError, phrase="target_prompt"),
    M("target-bytes", IMAGE, "a", b"b", error=errors.PromptError, phrase="target_prompt"),
    M("steps-float", num_inference_steps=10.0, phrase="num_inference_steps must be an integer"),
    M("steps-string", num_inference_steps="10", phrase="num_inference_steps must be an integer"),
    M("steps-bool", num_inference_steps=True, phrase="num_inference_steps must be an integer"),
    M("image-empty-list", [], "a", "b", error=errors.ImageInputError, phrase="image is an empty list"),
    M("image-int", 5, "a", "b", error=errors.ImageInputError, phrase="not int 5"),
    M("image-none", None, "a", "b", error=errors.ImageInputError, phrase="not NoneType None"),
    M("image-dict", {"a": 1}, "a", "b", error=errors.ImageInputError, phrase="image must be a path"),
    M("image-meta-tensor", meta, "a", "b", error=errors.ImageInputError, phrase="meta device"),
    M("image-empty-tensor", torch.ones(3, 0, 0), "a", "b", error=errors.ImageInputError, phrase="empty tensor"),
    M("image-nan-tensor", torch.full((3, 16, 16), float("nan")), "a", "b", error=errors.ImageInputError,
      phrase="NaN"),
    M("image-list-with-none", [IMAGE, None], "a", "b", error=errors.ImageInputError, phrase="NoneType"),
    M("generator-int", generator=5, phrase="generator must be a torch.Generator"),
    M("generator-string", generator="cpu", phrase="generator must be a torch.Generator"),
    M("noise-list", noise=[[0.0]], phrase="noise must be a tensor"),
    M("noise-meta", noise=torch.empty(1, 2, 4, 8, 8, device="meta"), phrase="meta device"),
    M("noise-nan", noise=torch.full((1, 2, 4, 8, 8), float("nan")), phrase="noise contains NaN"),
    M("dilate-float", dilate=1.5, phrase="dilate must be an integer"),
    M("dilate-negative", dilate=-1, phrase="dilate must be an integer in [0, 1024]"),
    M("blur-inf", blur=math.inf, phrase="blur must be a finite number"),
    M("blur-string", blur="1", phrase="blur must be a finite number"),
    M("chunk-zero", chunk_size=0, phrase="chunk_size"),
    M("samples-zero", num_samples=0, phrase="num_samples"),
    M("samples-absurd", num_samples=10 ** 9, phrase="num_samples must be an integer in [1, 100000]"),
    M("threshold-nan", threshold=math.nan, phrase="threshold must be a finite number"),
    M("normalization-unknown", normalization="max", phrase="normalization must be one of"),
    M("resolution-zero", resolution=0, phrase="resolution must be a multiple of 8"),
    M("resolution-not-multiple-of-8", resolution=100, phrase="resolution must be a multiple of 8"),
    M("resolution-negative", resolution=-64, phrase="resolution must be a multiple of 8"),
    M("resolution-string", resolution="64", phrase="resolution must be a multiple of 8"),
    M("resolution-huge", resolution=10 ** 6, phrase="resolution must be a multiple of 8"),
    M("per-sample-string", return_per_sample="yes", phrase="return_per_sample must be True, False or None"),
    M("negative-prompt-int", source_negative_prompt=5, error=errors.PromptError, phrase="source_negative_prompt"),
    M("unknown-keyword", samples=3, phrase="generate_mask(): got an unexpected keyword argument 'samples'"),
    Call("edit-inversion-none", "edit", (None, torch.ones(8, 8), "a red square"), {}, errors.ParameterError,
         "inversion must be the Inversion that invert() returned"),
    Call("edit-inversion-path", "edit", (IMAGE, torch.ones(8, 8), "a red square"), {}, errors.ParameterError,
         "inversion must be the Inversion"),
    Call("edit-mask-empty", "edit", ("INV", torch.ones(0, 0), "a red square"), {}, errors.ParameterError,
         "mask is an empty tensor"),
    Call("edit-mask-meta", "edit", ("INV", torch.empty(8, 8, device="meta"), "a red square"), {},
         errors.ParameterError, "mask is a tensor on the meta device"),
    Call("edit-mask-int", "edit", ("INV", 5, "a red square"), {}, errors.ParameterError, "mask must be a MaskResult"),
    Call("edit-mask-5d", "edit", ("INV", torch.ones(1, 1, 1, 8, 8), "a red square"), {}, errors.ParameterError,
         "mask must be (h, w)"),
    Call("edit-prompt-none", "edit", ("INV", torch.ones(8, 8), None), {}, errors.PromptError,
         "prompt must be a string"),
    Call("edit-callback-int", "edit", ("INV", torch.ones(8, 8), "a red square"), {"callback": 5},
         errors.ParameterError, "callback must be a function"),
    Call("edit-blend-unknown", "edit", ("INV", torch.ones(8, 8), "a red square"), {"blend": "average"},
         errors.ParameterError, "blend must be one of"),
    Call("invert-prompt-none", "invert", (IMAGE,), {"prompt": None}, errors.PromptError, "prompt must be a string"),
    Call("invert-strength-zero", "invert", (IMAGE,), {"strength": 0}, errors.ParameterError, "strength must be"),
    Call("invert-sample-posterior-string", "invert", (IMAGE,), {"sample_posterior": "no"}, errors.ParameterError,
         "sample_posterior must be True"),
    Call("call-mask-string-list", "__call__", (IMAGE, "a", "b"), {"mask": [1, 2]}, errors.ParameterError,
         "mask must be a MaskResult"),
    Call("encode-image-resolution", "encode_image", (IMAGE,), {"resolution": 12}, errors.ParameterError,
         "resolution must be a multiple of 8"),
]

CLASS_5_SETTINGS = [  # settings that used to give an all-zero map and an empty mask
    M("clamp-std-negative", clamp_std=-1, phrase="clamp_std must be a number > 0"),
    M("clamp-std-zero", clamp_std=0, phrase="clamp_std must be a number > 0"),
    M("clamp-std-nan", clamp_std=math.nan, phrase="clamp_std must be a finite number"),
    M("mean-ratio-nan", normalization="mean_ratio", mean_ratio=math.nan, phrase="mean_ratio must be a finite number"),
    M("mean-ratio-negative", normalization="mean_ratio", mean_ratio=-2, phrase="mean_ratio must be a number > 0"),
    M("guidance-inf", guidance_scale=math.inf, phrase="guidance_scale must be a finite number"),
    # a blur's kernel spans 6 sigma: 1e9 cells asked for 24 GB and the process was killed
    M("blur-huge", blur=1e9, phrase="blur must be a number in [0, 1024]"),
    M("dilate-huge", dilate=2 ** 62, phrase="dilate must be an integer in [0, 1024]"),
]

CLASS_6_NAMES = [  # messages name the user's own parameter, not an internal one
    M("mask-noise-named-as-such", num_inference_steps=4, noise_strength=0.1,
      phrase="noise_strength 0.1 leaves no step out of 4"),
    Call("call-mask-noise-named-as-such", "__call__", (IMAGE, "a", "b"),
         {"num_inference_steps": 4, "mask_noise_strength": 0.1}, errors.ParameterError,
         "mask_noise_strength 0.1 leaves no step out of 4"),
    M("resolution-not-max-side", resolution=4, phrase="resolution must be"),
]

TABLE = CLASS_7_TYPES + CLASS_5_SETTINGS + CLASS_6_NAMES


@pytest.mark.parametrize("call", TABLE, ids=[c.id for c in TABLE])
def test_wrong_argument_is_refused_at_the_door(call: Call, pipe, inversion):
    args = tuple(inversion if a == "INV" else a for a in call.args)
    before = pipe.counters.as_dict()
    with pytest.raises(call.error) as raised:
        getattr(pipe, call.method)(*args, **call.kwargs)
    message = str(raised.value)
    assert call.phrase in message, message
    assert "\n" not in message and message.endswith((".", ")")), message
    assert "max_side" not in message and "strength 0.1" not in message.replace(call.phrase, "")
    assert pipe.counters.as_dict() == before  # refused before any model call


def test_max_mask_samples_is_the_settings_limit():
    from diffedit.settings import MAX_MASK_SAMPLES, TABLE as SETTINGS
    assert SETTINGS["mask_samples"].high == MAX_MASK_SAMPLES == 100_000


# ---------------------------------------------------------------------- per-sample maps (class 3, the API)

def test_per_sample_maps_kept_only_when_asked_or_small(pipe):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    small = pipe.generate_mask(IMAGE, "a red circle", "a red square", num_samples=3, num_inference_steps=10,
                               generator=g())
    off = pipe.generate_mask(IMAGE, "a red circle", "a red square", num_samples=3, num_inference_steps=10,
                             generator=g(), return_per_sample=False)
    assert small.per_sample.shape == (1, 3, *small.soft.shape[1:]) and off.per_sample is None
    assert torch.equal(small.soft, off.soft)
    torch.testing.assert_close(small.per_sample.mean(dim=1), small.difference)
    big = pipe.generate_mask(IMAGE, "a red circle", "a red square", num_samples=65, num_inference_steps=10,
                             generator=g(), chunk_size=8)
    assert big.per_sample is None  # above PER_SAMPLE_UP_TO: not kept unless return_per_sample=True


def test_streamed_mask_equals_the_full_reduction(pipe):
    """The streamed running sum gives what mask_maps gives on the full (B, n, C, h, w) predictions."""
    from diffedit import method
    from diffedit.mask_maps import mask_maps
    n, g = 5, torch.Generator().manual_seed(3)
    result = pipe.generate_mask(IMAGE, "a red circle", "a red square", num_samples=n, num_inference_steps=10,
                                generator=torch.Generator().manual_seed(3), chunk_size=3)
    x0 = result.encoded.latents
    noise = torch.randn((1, n, *x0.shape[1:]), generator=g)
    eps_t, eps_s = method.mask_noise_predictions(pipe.predict_noise, pipe.scheduler, x0, noise, result.timestep,
                                                 pipe.encode_prompt(["a red circle"]),
                                                 pipe.encode_prompt(["a red square"]), chunk_size=2)
    full = mask_maps(eps_t, eps_s)
    torch.testing.assert_close(result.difference, full.difference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.soft, full.soft, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- class 6: NaN/inf messages

def test_nan_in_fp32_is_not_blamed_on_precision():
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(errors.NumericalError) as fp32:
        arguments.check_finite(x, "the decoding latents", torch.float32)
    assert "precision is not the cause" in str(fp32.value) and "bf16" not in str(fp32.value)
    with pytest.raises(errors.NumericalError) as bf16:
        arguments.check_finite(x, "the decoding latents", torch.bfloat16)
    assert "overflowed in this precision" in str(bf16.value)


def test_huge_guidance_in_fp32_is_not_blamed_on_precision(pipe):
    with pytest.raises(errors.NumericalError) as raised:
        pipe(IMAGE, "a red circle", "a red square", guidance_scale=1e308, num_inference_steps=4, num_mask_samples=2)
    assert "precision is not the cause" in str(raised.value) and "guidance scale" in str(raised.value)


def test_nan_mask_tensor_is_named(pipe, inversion):
    with pytest.raises(errors.ParameterError, match="mask contains NaN"):
        pipe.edit(inversion, nan_mask, "a red square")
    from diffedit.io.pictures import latent_mask_of
    with pytest.raises(errors.ParameterError, match="mask contains NaN"):
        latent_mask_of(nan_mask, inversion.encoded.latents, soft=True)


def test_huge_noise_in_fp32_names_the_inputs(pipe):
    noise = torch.full((1, 2, *pipe.encode_image(IMAGE).latents.shape[1:]), 3e38)
    with pytest.raises(errors.NumericalError, match="while running in float32, so the precision is not the cause"):
        pipe.generate_mask(IMAGE, "a red circle", "a red square", noise=noise, num_inference_steps=10)


# ---------------------------------------------------------------------- command line: classes 5, 6

def _edit(tmp_path, *extra):
    image = tmp_path / "in.png"
    if not image.exists():
        noise_image(40, 24).save(image)
    return ["edit", image, "--source", "a circle", "--target", "a square", *FAST, *extra]


@pytest.mark.parametrize("argv, phrase", [
    (["--out", ""], "--out is empty"),
    (["--out", "  "], "--out is empty"),
    (["--mask-out", ""], "--mask-out is empty"),
    (["--panel-out", ""], "--panel-out is empty"),
    (["--out", "x" * 300 + ".png"], "more than file systems allow"),
    (["--panel-out", "fifo.png"], "is a FIFO (named pipe), not a file"),
    (["--guidance", "1e308"], "while running in float32, so the precision is not the cause"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--mask-noise", "0.1"], "--mask-noise 0.1 leaves no step out of 4"),
    (["--strength", "0.1"], "--strength 0.1 leaves no step out of 4"),
    (["--steps", "5000"], "--steps must be between 1 and 1000"),
])
def test_edit_refusals_are_one_line_and_write_nothing(argv, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "fifo.png" in argv:
        os.mkfifo(tmp_path / "fifo.png")
    args = _edit(tmp_path, *argv)
    before = snapshot(tmp_path)
    code, out, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("diffedit: error: "), err
    assert phrase in err[0], err[0]
    assert snapshot(tmp_path) == before


def test_mask_command_refuses_empty_out(tmp_path, capsys):
    image = tmp_path / "in.png"
    noise_image(24, 16).save(image)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["mask", image, "--source", "a", "--target", "b", "--out", "", *FAST], capsys)
    assert code == 2 and len(err) == 1 and "--out is empty" in err[0], err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fail_at", ["write", "publish"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_edit_writes_all_three_outputs_or_none(fail_at, overwrite, tmp_path, capsys, monkeypatch):
    """The third output fails (disk full while writing it, or its rename): none of the three is left,
    and with --overwrite the previous outputs are back, byte for byte."""
    args = _edit(tmp_path, *(["--overwrite"] if overwrite else []))
    outputs = [tmp_path / f"in.{kind}.png" for kind in ("edit", "mask", "panel")]
    if overwrite:
        for path in outputs:
            noise_image(8, 8, seed=7).save(path)
    before = snapshot(tmp_path)
    real_stage, real_publish = files._stage, files._publish

    def stage(path, write_fn):
        if fail_at == "write" and path.name == "in.panel.png":
            def full(f):
                raise OSError(28, "No space left on device")
            return real_stage(path, full)
        return real_stage(path, write_fn)

    def publish(temp, path, overwrite):
        if fail_at == "publish" and path.name == "in.panel.png":
            raise OSError(28, "No space left on device")
        return real_publish(temp, path, overwrite)

    monkeypatch.setattr(files, "_stage", stage)
    monkeypatch.setattr(files, "_publish", publish)
    code, out, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert "no output was written" in err[0] or "none of the 3 outputs was written" in err[0], err[0]
    assert snapshot(tmp_path) == before  # nothing new, nothing changed, no temporary file left
    assert out == ""


def test_out_of_memory_by_any_name_is_one_line(tmp_path, capsys, monkeypatch):
    from diffedit import cli
    for error in (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
                  MemoryError(), OSError(12, "Cannot allocate memory"), RuntimeError("std::bad_alloc")):
        def boom(args, error=error):
            raise error
        monkeypatch.setattr(cli, "load_pipeline", boom)
        code, _, err = run_cli(_edit(tmp_path), capsys)
        assert code == 2 and len(err) == 1 and "ran out of memory" in err[0], (error, err)


# ---------------------------------------------------------------------- README "Inputs": animated images

@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_is_edited_on_its_first_frame_with_one_warning(fmt, tmp_path):
    import warnings

    from diffedit.io import images
    frames = [Image.new("RGB", (32, 24), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    images._warned.discard("animated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = images.load_image(path)
        images.load_image(path)
    said = [w for w in caught if "animated" in str(w.message)]
    assert len(said) == 1 and "only its first frame is edited" in str(said[0].message)
    r, g, b = np.asarray(first).mean(axis=(0, 1))
    assert r > 200 and b < 50



@pytest.mark.parametrize("which, phrase", [
    ("image", "File name too long"),
    ("mask", "File name too long"),
    ("out-folder", "is not a folder (a name too long for the file system)"),
    ("model", "a name too long for the file system"),
])
def test_too_long_paths_are_one_line(which, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "n" * 300
    image = tmp_path / "in.png"
    noise_image(24, 16).save(image)
    argv = {"image": ["edit", long + ".png"], "mask": ["edit", image, "--mask", long + ".png"],
            "out-folder": ["edit", image, "--out", f"{long}/x.png"],
            "model": ["edit", image, "--model", long]}[which]
    before = snapshot(tmp_path)
    code, _, err = run_cli([*argv, "--source", "a", "--target", "b", *FAST], capsys)
    assert code == 2 and len(err) == 1 and phrase in err[0], err
    assert snapshot(tmp_path) == before


def test_zero_terminal_snr_at_full_strength_is_refused(pipe, inversion, monkeypatch):
    """With alpha_bar_999 = 0 (rescale_betas_zero_snr, trailing spacing) a decode from t = 999 would
    divide 0 by 0 to get pred_x0 from a noise prediction (NaN everywhere): refused, named; below 1 it runs."""
    import dataclasses
    from diffedit.sampler import DDIM
    zero_snr = DDIM(dataclasses.replace(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    assert float(zero_snr.alpha_bar_at(999)) == 0.0
    monkeypatch.setattr(pipe, "scheduler", zero_snr)
    with pytest.raises(errors.ParameterError, match="no signal left at timestep 999.*strength below 1"):
        pipe.edit(inversion, torch.ones(8, 8), "a red square", strength=1.0, num_inference_steps=4)
    full = pipe.invert(IMAGE, strength=1.0, num_inference_steps=4)   # the inversion may reach t = 999
    assert bool(torch.isfinite(full.latents).all())
    result = pipe.edit(full, torch.ones(8, 8), "a red square", strength=0.75)
    assert bool(torch.isfinite(result.latents).all())


def test_numpy_numbers_are_taken_as_python_numbers(pipe, inversion):
    """np.int64(4) is an integer and np.float32(0.5) a number (they were refused as neither), and
    the results hold plain Python numbers (JSON-ready)."""
    import json
    import numpy as np
    result = pipe.edit(inversion, torch.ones(8, 8), "a red square", num_inference_steps=np.int64(4),
                       strength=np.float32(0.5), guidance_scale=np.float64(2.0), soft_mask=np.bool_(False))
    assert result.settings["num_inference_steps"] == 4 and type(result.settings["num_inference_steps"]) is int
    assert type(result.settings["strength"]) is float and type(result.settings["soft_mask"]) is bool
    json.dumps(result.settings)
    with pytest.raises(errors.ParameterError, match="num_inference_steps must be an integer"):
        pipe.edit(inversion, torch.ones(8, 8), "a red square", num_inference_steps=np.float32(4))


def test_dilation_wider_than_the_map_is_the_whole_map():
    from diffedit.mask_maps import dilate
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[0, 1, 2] = True
    assert torch.equal(dilate(mask, 1024), dilate(mask, 7)) and dilate(mask, 1024)[0].all()
    assert not dilate(mask, 1024)[1].any()


def test_helpers_refuse_wrong_inputs_in_one_sentence(pipe):
    assert pipe.encode_prompt("a red circle").shape[0] == 1       # a string is one prompt, not its letters
    with pytest.raises(errors.ParameterError, match=r"latents must be a tensor \(batch, 4,"):
        pipe.decode_latents("x")
    with pytest.raises(errors.ParameterError, match=r"got \(1, 3, 16, 16\)"):
        pipe.decode_latents(torch.zeros(1, 3, 16, 16))
    with pytest.raises(errors.ParameterError, match="pack_convolutions must be True or False"):
        DiffEditPipeline.from_pretrained(pack_convolutions="no")


def test_load_model_reads_dtype_names():
    from diffedit import load_model
    from diffedit.pipeline import EMBEDDED_MODEL
    assert load_model(EMBEDDED_MODEL, dtype="fp32").unet.conv_in.weight.dtype == torch.float32
    with pytest.raises(errors.ParameterError, match="unknown dtype 'fp64'"):
        load_model(EMBEDDED_MODEL, dtype="fp64")


def test_an_empty_mask_is_said_once(pipe, inversion, tmp_path, capsys):
    with pytest.warns(UserWarning, match="the mask is empty"):
        pipe.edit(inversion, torch.zeros(8, 8), "a red square")
    # the command line: an empty generated mask (threshold 1) is said once, by edit()
    code, _, err = run_cli(["edit", IMAGE, "--source", "a red circle", "--target", "a red square", *FAST,
                            "--threshold", "1", "--out", tmp_path / "e.png", "--mask-out", tmp_path / "m.png",
                            "--panel-out", tmp_path / "p.png"], capsys)
    assert code == 0 and sum("the mask is empty" in line for line in err) == 1, err


def test_bf16_without_native_bf16_is_said_once_on_the_command_line(tmp_path, capsys, monkeypatch):
    from diffedit import devices
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    code, _, err = run_cli(["edit", IMAGE, "--source", "a red circle", "--target", "a red square", *FAST,
                            "--dtype", "bf16", "--out", tmp_path / "e.png", "--mask-out", tmp_path / "m.png",
                            "--panel-out", tmp_path / "p.png"], capsys)
    assert code == 0 and sum("no native bf16" in line for line in err) == 1, err
    assert any("--dtype fp32" in line for line in err)


def test_numbers_too_big_for_a_float_are_refused_in_one_sentence(tmp_path, capsys):
    """math.isfinite(10 ** 400) raises OverflowError, which argparse does not catch."""
    from diffedit.settings import check
    for name in ("num_inference_steps", "guidance_scale", "strength"):
        with pytest.raises(errors.ParameterError, match=r"must be a finite number, got 1000000.*\(401 characters\)"):
            check(name, 10 ** 400)
    code, _, err = run_cli(["edit", IMAGE, "--source", "a", "--target", "b", "--steps", "1" + "0" * 400], capsys)
    assert code == 2 and len(err) == 1 and "--steps: must be a finite number" in err[0], err


def test_the_prompt_cache_keeps_the_last_prompts_only(pipe, monkeypatch):
    """A sweep over many prompts must not grow the pipeline's memory; prompts in use stay encoded once."""
    from diffedit import pipeline
    monkeypatch.setattr(pipeline, "PROMPTS_KEPT", 4)
    monkeypatch.setattr(pipe, "_prompt_cache", type(pipe._prompt_cache)())
    before = pipe.counters.text_encodes
    for i in range(10):
        states = pipe.encode_prompt(["a red circle", f"a blue square {i}", "a red circle"])
        assert states.shape[0] == 3 and torch.equal(states[0], states[2])
    assert len(pipe._prompt_cache) == 4
    assert pipe.counters.text_encodes - before == 11          # "a red circle" once, each square once
    big = pipe.encode_prompt([f"prompt {i}" for i in range(6)])   # a batch larger than the cache still works
    assert big.shape[0] == 6 and len(pipe._prompt_cache) == 4
