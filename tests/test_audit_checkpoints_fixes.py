"""Audit fixes of the model reader and writer: no file read through a link out of the model folder
(Hugging Face cache snapshots still load), export never deletes what it did not write nor loses the
old model when stopped, corrupt safetensors files and oversized configs are refused in one
sentence, and an unknown ~user is named."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit.checkpoints.export import save_pretrained, unet_dict, vae_dict, text_encoder_dict
from diffedit.checkpoints.loading import load_model
from diffedit.checkpoints.model_io import read_state_dict
from diffedit.errors import ModelLoadError, OutputFileError
from diffedit.models.config import PRESETS, TextEncoderConfig, UNetConfig, VAEConfig
from reference_models import fake_hub_cache

MODEL = Path(__file__).resolve().parents[1] / "weights" / "shapes-64"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tmp_path) -> Path:
    """A private copy of the embedded model, for a test to break (a copy, not hard links: a test
    writing into a file in place must not reach the shipped weights)."""
    return Path(shutil.copytree(MODEL, tmp_path / "model"))


def one_sentence_error(*args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message
    return message


# ---------------------------------------------------------------- 1. links out of the model folder

def link_out(model: Path, relative: str, outside: Path) -> None:
    """Replace MODEL/RELATIVE (a file or a folder) by a symbolic link to a copy outside the model."""
    target, path = outside / relative, model / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target)
        shutil.rmtree(path)
    else:
        shutil.copy(path, target)
        path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("relative", [UNET_FILE, "vae", "unet/config.json", "scheduler/scheduler_config.json",
                                      "tokenizer/vocab.json", "tokenizer/special_tokens_map.json"])
def test_a_link_out_of_the_model_folder_is_refused(model, tmp_path, relative):
    link_out(model, relative, tmp_path / "outside")
    message = one_sentence_error(model)
    assert "outside the model folder" in message and str(tmp_path / "outside") in message


def test_a_plain_shard_name_that_links_out_is_refused(model, tmp_path):
    keys = load_file(model / UNET_FILE)
    (model / UNET_FILE).rename(model / "unet/shard-1.safetensors")
    link_out(model, "unet/shard-1.safetensors", tmp_path / "outside")
    (model / (UNET_FILE + ".index.json")).write_text(json.dumps({"weight_map": {k: "shard-1.safetensors" for k in keys}}))
    assert "unet/shard-1.safetensors leads through a symbolic link" in one_sentence_error(model)


def test_links_inside_the_model_folder_and_a_linked_model_folder_still_load(model, tmp_path):
    (model / "shared").mkdir()
    (model / UNET_FILE).rename(model / "shared/unet.safetensors")
    (model / UNET_FILE).symlink_to("../shared/unet.safetensors")
    (tmp_path / "alias").symlink_to(model)
    assert load_model(tmp_path / "alias").unet is not None


def test_a_hub_cache_snapshot_loads_but_not_a_link_out_of_its_repository(tmp_path):
    """huggingface_hub's snapshots are links to ../../blobs/<sha>, inside models--org--name."""
    snapshot = fake_hub_cache(tmp_path / "hf", "org/name", MODEL)
    assert (snapshot / UNET_FILE).is_symlink()
    reference, cached = load_model(MODEL), load_model(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(reference.unet.state_dict().values(),
                                                 cached.unet.state_dict().values()))
    other = fake_hub_cache(tmp_path / "hf", "org/other", MODEL)  # another repository of the same cache
    (snapshot / "unet/config.json").unlink()
    (snapshot / "unet/config.json").symlink_to(os.path.realpath(other / "unet/config.json"))
    assert "outside the model folder" in one_sentence_error(snapshot)


# ---------------------------------------------------------------- 2. export

@pytest.fixture(scope="module")
def parts():
    m = load_model(MODEL)
    return m.config, m.tokenizer, m.text_encoder, m.vae, m.unet


def test_export_refuses_a_folder_it_did_not_write(parts, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "my_notes.txt").write_text("x")
    with pytest.raises(OutputFileError, match="not a model exported by diffedit"):
        save_pretrained(dest, *parts)
    assert [p.name for p in tmp_path.rglob("*")] == ["dest", "my_notes.txt"]  # nothing written, nothing lost


def test_export_replaces_its_own_model_and_fills_an_empty_folder(parts, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    save_pretrained(dest, *parts, extra_files={"README.md": "one"})
    save_pretrained(dest, *parts, extra_files={"README.md": "two"})
    assert (dest / "README.md").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no staging or old copy left
    load_model(dest)


@pytest.mark.parametrize("stop_at", [1, 2], ids=["after-setting-the-old-model-aside", "in-moving-the-new-one-in"])
def test_an_interrupted_export_keeps_the_old_model(parts, tmp_path, monkeypatch, stop_at):
    """Ctrl-C right after the swap's first rename (old model aside), or in its second (new model
    in), puts the old model back and leaves nothing else."""
    dest = tmp_path / "dest"
    save_pretrained(dest, *parts, extra_files={"README.md": "old"})
    rename, calls = Path.rename, []

    def interrupted(self, target):
        calls.append(self)
        if len(calls) == stop_at == 2:
            raise KeyboardInterrupt
        result = rename(self, target)
        if len(calls) == stop_at == 1:
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(dest, *parts, extra_files={"README.md": "new"})
    monkeypatch.undo()
    assert (dest / "README.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    load_model(dest)


# ---------------------------------------------------------------- 3. corrupt safetensors files

def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, phrase", [
    ({"a": entry(0, 8), "b": entry(4, 12)}, 12, "entry 'b' overlaps another"),
    ({"a": entry(0, 8), "b": entry(0, 8)}, 8, "overlaps another"),
    ({"a": entry(0, 4), "b": entry(8, 12)}, 12, "entry 'b' leaves a gap"),
    ({"a": entry(4, 8)}, 8, "entry 'a' leaves a gap"),
    ({"a": entry(0, 8)}, 12, "4 bytes follow its last tensor"),
    ({"a": entry(0, 8)}, 6, "is truncated"),
    ({"a": entry(0, 0, [2 ** 32, 2 ** 32, 0])}, 0, "impossible shape"),
    ({"a": entry(0, 8, [2 ** 62, 2 ** 2, 0])}, 8, "impossible shape"),
    ({"a": entry(0, 8, [2 ** 64 + 2, 0])}, 8, "impossible shape"),
])
def test_corrupt_safetensors_are_refused(tmp_path, header, data, phrase):
    path = write_safetensors(tmp_path / "bad.safetensors", header, bytes(data))
    with pytest.raises(ModelLoadError, match=phrase) as info:
        read_state_dict(path, lazy=True)
    assert str(path) in str(info.value)


def test_overlapping_weights_in_a_model_are_refused(model):
    """The audit's case: two weights of the UNet read from the same bytes loaded as if valid."""
    path, raw = model / UNET_FILE, (model / UNET_FILE).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    second = next(k for k in header if k not in (first, "__metadata__") and header[k]["shape"] == header[first]["shape"])
    header[second]["data_offsets"] = header[first]["data_offsets"]
    path.unlink()
    write_safetensors(path, header, raw[8 + size:])
    assert "overlaps another" in one_sentence_error(model)


def test_a_file_truncated_after_it_was_indexed_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0), "b": torch.ones(1000)}, path)
    index = read_state_dict(path, lazy=True)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    assert torch.equal(index["a"].load(), torch.arange(6.0))
    with pytest.raises(ModelLoadError, match="is truncated") as info:
        index["b"].load()
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- 4. config bounds

@pytest.mark.parametrize("file, changes, field", [
    ("text_encoder/config.json", {"num_hidden_layers": 100_000}, "num_hidden_layers is 100000"),
    ("text_encoder/config.json", {"vocab_size": 10 ** 7}, "vocab_size is 10000000"),
    ("unet/config.json", {"transformer_layers_per_block": 10 ** 7}, "transformer_layers_per_block is 10000000"),
    ("unet/config.json", {"block_out_channels": [2 ** 40, 2 ** 41]}, "block_out_channels is 1099511627776"),
    ("unet/config.json", {"block_out_channels": [10 ** 30, 10 ** 30]}, "block_out_channels is 1000000000000000"),
    ("unet/config.json", {"block_out_channels": [32] * 1000}, "not a list of 1 to 8 integers"),
    ("unet/config.json", {"attention_head_dim": 10 ** 6}, "attention_head_dim is 1000000"),
    ("vae/config.json", {"layers_per_block": 10 ** 5}, "layers_per_block is 100000"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10 ** 10}, "num_train_timesteps is 10000000000"),
])
def test_oversized_configs_are_refused_at_once(model, file, changes, field):
    path = model / file
    config = {**json.loads(path.read_text()), **changes}
    path.unlink()
    path.write_text(json.dumps(config))
    message = one_sentence_error(model)
    assert message.startswith(f"{path}: ") and field in message, message


@pytest.mark.parametrize("preset", ["sd1", "sd2-base", "sd2-v"])
def test_real_sd_configs_are_within_the_bounds(preset):
    config = PRESETS[preset]
    assert UNetConfig.from_dict(unet_dict(config.unet)) == config.unet
    assert VAEConfig.from_dict(vae_dict(config.vae, config.resolution)) == config.vae
    tokenizer = type("T", (), {"bos_id": 49406, "eos_id": 49407, "pad_id": 0})
    assert TextEncoderConfig.from_dict(text_encoder_dict(config.text_encoder, tokenizer)) == config.text_encoder


# ---------------------------------------------------------------- 5. ~user

def test_an_unknown_user_in_the_model_path_is_one_sentence():
    message = one_sentence_error("~no-such-user-xq/model")
    assert "starts with ~no-such-user-xq, but no home folder is known" in message
