"""Issue 18, the model side, one table per class. Each case damages a copy of the embedded model
(weights/shapes-64: configs, weights, shard indexes, tokenizer files) or names a bad --model, then
runs `diffedit mask` in this process and checks
  - exit status 2 and ONE line on stderr that holds the case's key phrase (the file or key named);
  - the API (`DiffEditPipeline.from_pretrained`) raises the case's exception class, same sentence;
  - a snapshot of the whole test folder before and after: nothing was written anywhere.

Classes: 1 paths built from data (shard indexes) stay inside their folder; 4 configs of wrong
types or shapes, damaged weights, path errors, hub ids the Hub rejects; 6 messages that name the
real cause (damaged .ckpt files are not "pickles that run code", existing local paths are not hub
ids, a NaN weight is not a precision problem); a --preset on a folder (README "Inputs")."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit import errors
from diffedit.pipeline import EMBEDDED_MODEL, DiffEditPipeline
from reference_models import noise_image, run_cli, snapshot

FAST = ["--steps", "4", "--mask-samples", "2"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """One copy of the embedded model; each case hard-links it and replaces the files it damages."""
    folder = tmp_path_factory.mktemp("hardening") / "shapes-64"
    shutil.copytree(EMBEDDED_MODEL, folder)
    return folder


def model_copy(base: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(base, folder, copy_function=os.link)
    return folder


def replace_file(path: Path, data: bytes | str) -> None:
    """Write a new file (never through a hard link to the shared base copy)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    replace_file(path, json.dumps(data))


DELETE = object()


def config(component: str, **changes) -> Callable[[Path, Path], Path]:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"

    def make(model: Path, tmp: Path) -> Path:
        set_json(model / component / name, **changes)
        return model
    return make


def whole_file(relative: str, text: str) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        replace_file(model / relative, text)
        return model
    return make


def safetensors_header(header) -> Callable[[Path, Path], Path]:
    """The UNet's weights replaced by a file whose JSON header is `header`."""
    def make(model: Path, tmp: Path) -> Path:
        raw = json.dumps(header).encode()
        replace_file(model / "unet" / "diffusion_pytorch_model.safetensors",
                     struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
        return model
    return make


def tensor_change(component: str, fn) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        file = model / component / ("model.safetensors" if component == "text_encoder"
                                    else "diffusion_pytorch_model.safetensors")
        tensors = load_file(file)
        fn(tensors)
        file.unlink()
        save_file(tensors, file)
        return model
    return make


def first_weight(tensors: dict) -> str:
    return sorted(k for k, v in tensors.items() if v.dim() >= 2)[0]


def sharded(weight_map, text: str | None = None) -> Callable[[Path, Path], Path]:
    """The UNet as a sharded checkpoint whose index names `weight_map` (or whose text is `text`)."""
    def make(model: Path, tmp: Path) -> Path:
        unet = model / "unet"
        (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model-00001-of-00001.safetensors")
        index = unet / "diffusion_pytorch_model.safetensors.index.json"
        wm = weight_map(tmp) if callable(weight_map) else weight_map
        index.write_text(text if text is not None else json.dumps({"metadata": {}, "weight_map": wm}))
        return model
    return make


def outside_file(tmp: Path) -> dict:
    """A "secret" safetensors file outside the model folder, named by a ../ path from the index."""
    secret = tmp / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, secret)
    return {"conv_in.weight": "../../secret.safetensors"}


def ckpt_file(data: bytes | Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        path = tmp / "model.ckpt"
        data(path) if callable(data) else path.write_bytes(data)
        return path
    return make


def empty_zip(path: Path) -> None:
    zipfile.ZipFile(path, "w").close()


def zip_without_pickle(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3\n")


def special(kind: str) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        path = tmp / "special"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "loop":
            os.symlink(path, path)
        elif kind == "device":
            os.symlink("/dev/null", path)
        elif kind == "broken":
            os.symlink(tmp / "nowhere", path)
        return path
    return make


def named(name: str) -> Callable[[Path, Path], str]:
    return lambda model, tmp: name


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], Path | str]   # (model copy, tmp folder) -> the --model argument
    phrase: str                                 # must appear in the one-line message
    error: type = errors.ModelLoadError
    extra: tuple = ()                           # more command-line arguments


CLASS_1_PATHS_FROM_DATA = [
    Case("index-dotdot-system-file", sharded({"conv_in.weight": "../../../../../../../../etc/passwd"}),
         "not a file name inside"),
    Case("index-dotdot-real-safetensors", sharded(outside_file), "'../../secret.safetensors'"),
    Case("index-absolute", sharded({"conv_in.weight": "/etc/passwd"}), "not a file name inside"),
    Case("index-subfolder-escape", sharded({"conv_in.weight": "sub/../../x.safetensors"}), "not a file name inside"),
    Case("index-backslashes", sharded({"conv_in.weight": "..\\..\\x.safetensors"}), "not a file name inside"),
    Case("index-dot", sharded({"conv_in.weight": "."}), "not a file name inside"),
    Case("index-number", sharded({"conv_in.weight": 5}), "not a file name inside"),
    Case("index-list", sharded({"conv_in.weight": ["a.safetensors"]}), "not a file name inside"),
]

CLASS_4_CONFIGS = [
    Case("unet-layers-per-block-string", config("unet", layers_per_block="one"), "layers_per_block is 'one'"),
    Case("unet-layers-per-block-zero", config("unet", layers_per_block=0), "layers_per_block is 0"),
    Case("unet-layers-per-block-bool", config("unet", layers_per_block=True), "layers_per_block is True"),
    Case("unet-groups-do-not-divide", config("unet", norm_num_groups=7), "norm_num_groups 7 does not divide"),
    Case("unet-heads-do-not-divide", config("unet", attention_head_dim=5), "5 attention heads do not divide"),
    Case("unet-heads-per-level-count", config("unet", attention_head_dim=[4]), "1 head counts for 2"),
    Case("unet-heads-string", config("unet", attention_head_dim="4"), "attention_head_dim is '4'"),
    Case("unet-widths-number", config("unet", block_out_channels=48), "block_out_channels is 48"),
    Case("unet-widths-empty", config("unet", block_out_channels=[]), "block_out_channels is []"),
    Case("unet-widths-strings", config("unet", block_out_channels=["48", "96"]), "block_out_channels is '48'"),
    Case("unet-sample-size-zero", config("unet", sample_size=0), "sample_size is 0"),
    Case("unet-cross-dim-null", config("unet", cross_attention_dim=None), "cross_attention_dim is None"),
    Case("unet-block-types-string", config("unet", down_block_types="CrossAttnDownBlock2D"), "down_block_types"),
    Case("unet-block-types-count", config("unet", down_block_types=["DownBlock2D"]), "one per level"),
    Case("unet-norm-eps-negative", config("unet", norm_eps=-1), "norm_eps is -1"),
    Case("unet-config-list", whole_file("unet/config.json", "[1, 2]"), "holds a JSON list"),
    Case("unet-config-number", whole_file("unet/config.json", "3"), "holds a JSON int"),
    Case("unet-config-null", whole_file("unet/config.json", "null"), "holds a JSON NoneType"),
    Case("unet-config-not-json", whole_file("unet/config.json", "{'a': 1"), "is not valid JSON"),
    Case("unet-config-deep", whole_file("unet/config.json", "[" * 100_000), "is not valid JSON"),
    Case("vae-scaling-zero", config("vae", scaling_factor=0), "scaling_factor is 0"),
    Case("vae-scaling-negative", config("vae", scaling_factor=-0.18), "scaling_factor is -0.18"),
    Case("vae-scaling-string", config("vae", scaling_factor="0.18"), "scaling_factor is '0.18'"),
    Case("vae-groups-do-not-divide", config("vae", norm_num_groups=6), "norm_num_groups 6 does not divide"),
    Case("vae-latent-channels-zero", config("vae", latent_channels=0), "latent_channels is 0"),
    Case("vae-config-list", whole_file("vae/config.json", "[]"), "holds a JSON list"),
    Case("text-heads-do-not-divide", config("text_encoder", num_attention_heads=3),
         "num_attention_heads 3 does not divide hidden_size 128"),
    Case("text-width-null", config("text_encoder", hidden_size=None), "hidden_size is None"),
    Case("text-positions-one", config("text_encoder", max_position_embeddings=1), "max_position_embeddings is 1"),
    Case("text-layers-float", config("text_encoder", num_hidden_layers=2.5), "num_hidden_layers is 2.5"),
    Case("scheduler-zero-timesteps", config("scheduler", num_train_timesteps=0), "num_train_timesteps is 0"),
    Case("scheduler-beta-start-null", config("scheduler", beta_start=None), "beta_start is None"),
    Case("scheduler-beta-end-two", config("scheduler", beta_end=2), "beta_end is 2"),
    Case("scheduler-beta-start-string", config("scheduler", beta_start="0.001"), "beta_start is '0.001'"),
    Case("scheduler-unknown-schedule", config("scheduler", beta_schedule="cubic"), "beta_schedule is 'cubic'"),
    Case("scheduler-spacing-number", config("scheduler", timestep_spacing=5), "timestep_spacing is 5"),
    Case("scheduler-offset-negative", config("scheduler", steps_offset=-1), "steps_offset is -1"),
    Case("scheduler-trained-betas-string", config("scheduler", trained_betas="0.1"), "trained_betas"),
    Case("scheduler-trained-betas-count", config("scheduler", trained_betas=[0.1, 0.2]), "trained_betas has 2"),
    Case("scheduler-config-list", whole_file("scheduler/scheduler_config.json", "[]"), "holds a JSON list"),
    Case("vocab-list", whole_file("tokenizer/vocab.json", '["a", "b"]'), "holds a JSON list"),
    Case("vocab-string-ids", whole_file("tokenizer/vocab.json", '{"a": "1"}'), "is not a vocabulary"),
    Case("vocab-bool-ids", whole_file("tokenizer/vocab.json", '{"a": true}'), "is not a vocabulary"),
    Case("tokenizer-config-list", whole_file("tokenizer/tokenizer_config.json", "[]"), "holds a JSON list"),
    Case("special-tokens-list", whole_file("tokenizer/special_tokens_map.json", "[1]"), "holds a JSON list"),
    Case("max-length-nan", whole_file("tokenizer/tokenizer_config.json", '{"model_max_length": NaN}'),
         "model_max_length nan"),
]

CLASS_4_WEIGHTS = [
    Case("header-list", safetensors_header([1, 2]), "header is a JSON list"),
    Case("header-number", safetensors_header(12345), "header is a JSON int"),
    Case("header-string-offsets", safetensors_header({"conv_in.weight": {"dtype": "F32", "shape": [1],
                                                                         "data_offsets": ["0", "4"]}}),
         "entry 'conv_in.weight' is malformed"),
    Case("header-string-shape", safetensors_header({"conv_in.weight": {"dtype": "F32", "shape": ["1"],
                                                                       "data_offsets": [0, 4]}}),
         "entry 'conv_in.weight' is malformed"),
    Case("header-bool-offsets", safetensors_header({"conv_in.weight": {"dtype": "F32", "shape": [1],
                                                                       "data_offsets": [False, True]}}),
         "entry 'conv_in.weight' is malformed"),
    Case("header-entry-list", safetensors_header({"conv_in.weight": [1, 2]}), "entry 'conv_in.weight' is malformed"),
    Case("header-unknown-dtype", safetensors_header({"conv_in.weight": {"dtype": "F33", "shape": [1],
                                                                        "data_offsets": [0, 4]}}),
         "entry 'conv_in.weight' is malformed"),
    Case("int-weights", tensor_change("unet", lambda t: t.update({first_weight(t): t[first_weight(t)].long()})),
         "not floating point"),
    Case("bool-weights", tensor_change("vae", lambda t: t.update({first_weight(t): t[first_weight(t)] > 0})),
         "not floating point"),
    Case("int8-text-weights", tensor_change("text_encoder",
                                            lambda t: t.update({first_weight(t): t[first_weight(t)].to(torch.int8)})),
         "not floating point"),
    Case("nan-weight", tensor_change("unet", lambda t: t[first_weight(t)].view(-1).__setitem__(0, float("nan"))),
         "holds NaN or inf values"),
    Case("inf-weight", tensor_change("vae", lambda t: t[first_weight(t)].view(-1).__setitem__(3, float("inf"))),
         "holds NaN or inf values"),
    Case("index-not-json", sharded(None, text="{not json"), "is not valid JSON"),
    Case("index-json-list", sharded(None, text="[]"), "holds a JSON list"),
    Case("index-no-weight-map", sharded(None, text='{"metadata": {}}'), "has no weight_map"),
    Case("index-empty-weight-map", sharded({}), "has no weight_map"),
    Case("index-weight-map-list", sharded(None, text='{"weight_map": ["a"]}'), "has no weight_map"),
    Case("ckpt-text-file", ckpt_file(b"hello world, not a checkpoint\n"), "is not a readable PyTorch checkpoint"),
    Case("ckpt-random-bytes", ckpt_file(bytes(range(256)) * 20), "is not a readable PyTorch checkpoint"),
    Case("ckpt-empty", ckpt_file(b""), "is not a readable PyTorch checkpoint"),
    Case("ckpt-empty-zip", ckpt_file(empty_zip), "is not a readable PyTorch checkpoint"),
    Case("ckpt-zip-without-pickle", ckpt_file(zip_without_pickle), "is not a readable PyTorch checkpoint"),
    Case("ckpt-truncated-pickle", ckpt_file(b"\x80\x02}q\x00(X\x01\x00\x00"), "is not a readable PyTorch checkpoint"),
]

CLASS_4_PATHS = [
    Case("model-name-too-long", named("m" * 300), "a name too long for the file system"),
    Case("model-path-too-long", lambda model, tmp: str(tmp.joinpath(*["d" * 250] * 20)), "too long"),
    Case("model-nul", named("bad\0name"), "NUL"),
    Case("hub-id-dotdot", named("org/name.."), "is not a valid hub id"),
    Case("hub-id-double-dash", named("org--x/name"), "is not a valid hub id"),
    Case("hub-id-trailing-dash", named("org/name-"), "is not a valid hub id"),
    Case("hub-id-leading-dot", named("org/.name"), "is not a valid hub id"),
    Case("hub-id-too-long", named("org/" + "n" * 120), "is not a valid hub id"),
]

CLASS_6_MESSAGES = [
    Case("unsafe-pickle-still-unsafe", ckpt_file(lambda p: p.write_bytes(
        b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01cposix\nsystem\nq\x02X\x02\x00\x00\x00idq\x03\x85q\x04Rq\x05s.")),
         "asks to run code", errors.UnsafeCheckpointError),
    Case("fifo-is-not-a-hub-id", special("fifo"), "is a FIFO (named pipe)"),
    Case("symlink-loop-is-not-a-hub-id", special("loop"), "is a symlink loop"),
    Case("device-is-not-a-hub-id", special("device"), "is a device"),
    Case("broken-symlink-is-not-a-hub-id", special("broken"), "is a broken symlink"),
    Case("preset-on-folder", lambda model, tmp: model, "applies only to a single checkpoint file", extra=("--preset", "sd1")),
    Case("preset-on-hub-id", named("org/name"), "applies only to a single checkpoint file", extra=("--preset", "sd2-v")),
]

TABLE = CLASS_1_PATHS_FROM_DATA + CLASS_4_CONFIGS + CLASS_4_WEIGHTS + CLASS_4_PATHS + CLASS_6_MESSAGES


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_bad_model_is_one_sentence_and_writes_nothing(case: Case, base_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model = case.make(model_copy(base_model, tmp_path), tmp_path)
    image = tmp_path / "in.png"
    noise_image(24, 16).save(image)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["mask", image, "--source", "a circle", "--target", "a square", "--model", model,
                              "--out", tmp_path / "mask.png", *FAST, *case.extra], capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("diffedit: error: "), err
    assert case.phrase in err[0], err[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing changed (the secret file unread)
    with pytest.raises(case.error) as raised:
        DiffEditPipeline.from_pretrained(model, preset=case.extra[1] if case.extra else None)
    assert str(raised.value) in err[0]


def test_a_good_sharded_index_still_loads(base_model, tmp_path):
    """The control of class 1: plain shard names in the model's own folder are read as before."""
    model = sharded(lambda tmp: {k: "diffusion_pytorch_model-00001-of-00001.safetensors"
                                 for k in load_file(base_model / "unet" / "diffusion_pytorch_model.safetensors")})(
        model_copy(base_model, tmp_path), tmp_path)
    pipe = DiffEditPipeline.from_pretrained(model)
    reference = DiffEditPipeline.from_pretrained(base_model)
    for (name, a), b in zip(pipe.unet.state_dict().items(), reference.unet.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- single original-layout files

def tiny_single_file(path: Path, damage) -> Path:
    """A random "tiny" preset model as one original-layout .safetensors file, then `damage`d."""
    from diffedit.checkpoints.single_file import to_original_checkpoint
    from diffedit.models.clip import TextEncoder
    from diffedit.models.config import PRESETS
    from diffedit.models.unet import UNet
    from diffedit.models.vae import AutoencoderKL
    config = PRESETS["tiny"]
    torch.manual_seed(0)
    state = to_original_checkpoint({"unet": UNet(config.unet).state_dict(), "vae": AutoencoderKL(config.vae).state_dict(),
                                    "text_encoder": TextEncoder(config.text_encoder).state_dict()})
    state = {k: v.contiguous().clone() for k, v in state.items()}
    damage(state)
    save_file(state, path)
    return path


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
MID_K = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
SINGLE_FILE = [
    ("control", lambda s: None, None),
    ("measured-weight-1d", lambda s: s.update({MID_K: torch.zeros(32)}), "has shape (32,), not that of a matrix"),
    ("measured-weight-5d", lambda s: s.update({MID_K: torch.zeros(1, 1, 1, 1, 32)}), "not that of a matrix"),
    ("measured-weight-empty", lambda s: s.update({CONV_IN: torch.zeros(0, 4, 3, 3)}), "has shape (0, 4, 3, 3)"),
    ("measured-weight-missing", lambda s: s.pop("model.diffusion_model.out.2.weight"), "out.2.weight is missing"),
    ("int-weight", lambda s: s.update({CONV_IN: s[CONV_IN].to(torch.int32)}), "not floating point"),
    ("nan-weight", lambda s: s[CONV_IN].view(-1).__setitem__(0, float("nan")), "holds NaN or inf values"),
]


@pytest.mark.parametrize("damage, phrase", [c[1:] for c in SINGLE_FILE], ids=[c[0] for c in SINGLE_FILE])
def test_damaged_single_file_is_one_sentence(damage, phrase, tmp_path):
    path = tiny_single_file(tmp_path / "model.safetensors", damage)
    if phrase is None:
        DiffEditPipeline.from_pretrained(path, preset="tiny")
        return
    with pytest.raises(errors.ModelLoadError) as raised:
        DiffEditPipeline.from_pretrained(path, preset="tiny")
    assert phrase in str(raised.value) and "\n" not in str(raised.value)
