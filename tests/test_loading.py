"""Loading is strict, safe and explicit: every way a checkpoint can be wrong gives one
ModelLoadError sentence that says what is wrong (naming the key, the file or the architecture it
looks like) and what to do. Also: original-layout single files and hub ids through a fake
Hugging Face cache, all without network.

Weights come from tests/reference_models.py (tiny random models saved by diffusers/transformers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit.models.config import PRESETS
from diffedit.errors import ModelLoadError, UnsafeCheckpointError
from diffedit.checkpoints.loading import load_model
from diffedit.checkpoints.architecture import OPEN_CLIP
from diffedit.checkpoints.single_file import to_original_checkpoint
from reference_models import build_reference

REPO = Path(__file__).resolve().parents[1]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_reference("tiny", tmp_path_factory.mktemp("tiny"), seed=3)[0]


@pytest.fixture(scope="module")
def tiny_v(tmp_path_factory) -> Path:
    return build_reference("tiny-v", tmp_path_factory.mktemp("tiny-v"), seed=4)[0]


@pytest.fixture
def folder(tiny, tmp_path) -> Path:
    """A private copy of the tiny model folder, for a test to break."""
    return shutil.copytree(tiny, tmp_path / "model")


def load_error(*args, error=ModelLoadError, **kwargs) -> str:
    """The message of the error load_model raises, checked to be one sentence."""
    with pytest.raises(error) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"\.\s+[A-Z]", message), f"more than one sentence: {message}"
    return message


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_safetensors(path: Path, drop=(), add=None) -> None:
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    save_file({**tensors, **(add or {})}, path)


def same_weights(a, b) -> bool:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if sorted(sa) != sorted(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


# ---------------------------------------------------------------- paths, folders, files

def test_missing_path(tmp_path):
    assert "neither an existing folder or file nor a hub id" in load_error(tmp_path / "no-such-model")
    (tmp_path / "notes.txt").write_text("not weights")
    assert "is not a checkpoint file (expected one of .safetensors" in load_error(tmp_path / "notes.txt")


def test_missing_component(folder):
    shutil.rmtree(folder / "vae")
    assert re.search(r"not a complete diffusers-layout model: missing vae/", load_error(folder))


def test_missing_weights_and_config(folder):
    (folder / UNET_FILE).unlink()
    assert re.search(r"no weights in .*unet; expected diffusion_pytorch_model\.safetensors", load_error(folder))
    (folder / "vae" / "config.json").unlink()
    assert re.search(r"vae/config\.json is missing", load_error(folder))


def test_missing_variant(folder):
    assert "no 'fp16' variant: try without variant" in load_error(folder, variant="fp16")


@pytest.mark.parametrize("file, drop, add, expected", [
    (UNET_FILE, ["conv_in.bias"], None, r"the UNet weights do not fit its config \(missing: conv_in\.bias\)"),
    (UNET_FILE, [], {"extra_block.weight": torch.zeros(3)}, r"UNet .*\(unexpected: extra_block\.weight\)"),
    (UNET_FILE, ["conv_in.weight"], {"conv_in.weight": torch.zeros(32, 4, 1, 1)},
     r"UNet .*\(wrong shape: conv_in\.weight \(32, 4, 1, 1\) \(expected \(32, 4, 3, 3\)\)\)"),
    ("vae/diffusion_pytorch_model.safetensors", ["decoder.conv_out.weight"], None,
     r"the VAE weights .*missing: decoder\.conv_out\.weight"),
    ("text_encoder/model.safetensors", [], {"encoder.layers.2.mlp.fc1.weight": torch.zeros(64, 32)},
     r"the text encoder weights .*unexpected: layers\.2\.mlp\.fc1\.weight"),
], ids=["missing", "unexpected", "shape", "vae-missing", "text-unexpected"])
def test_strict_keys(folder, file, drop, add, expected):
    edit_safetensors(folder / file, drop, add)
    message = load_error(folder)
    assert re.search(expected, message), message
    assert "the checkpoint is of another architecture or the config is wrong" in message


def test_many_missing_keys_are_counted(folder):
    keys = [k for k in load_file(folder / UNET_FILE) if k.startswith("up_blocks.")]
    edit_safetensors(folder / UNET_FILE, drop=keys)
    assert f"({len(keys)} in all)" in load_error(folder)


def test_corrupt_header(folder):
    data = bytearray((folder / UNET_FILE).read_bytes())
    data[9:40] = b"\xff" * 31  # inside the JSON header
    (folder / UNET_FILE).write_bytes(bytes(data))
    assert re.search(r"is not a valid safetensors file \(unreadable header.*download it again", load_error(folder))
    (folder / UNET_FILE).write_bytes(b"\x00" * 4)
    assert "bad header length" in load_error(folder)


def test_truncated_file(folder):
    data = (folder / UNET_FILE).read_bytes()
    (folder / UNET_FILE).write_bytes(data[:len(data) // 2])
    assert re.search(r"diffusion_pytorch_model\.safetensors is truncated \([\d,]+ bytes, its header needs [\d,]+\); "
                     r"download it again", load_error(folder))


def test_truncated_bin(folder):
    torch.save(load_file(folder / UNET_FILE), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / UNET_FILE).unlink()
    data = (folder / "unet" / "diffusion_pytorch_model.bin").read_bytes()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(data[:len(data) // 3])
    assert "is not a readable PyTorch checkpoint (corrupt or truncated" in load_error(folder)


# ---------------------------------------------------------------- configs of other architectures

def test_sd2_config_with_sd1_weights(folder, tiny_v):
    """SD 2-style UNet config (linear projections, attention on both levels) over SD 1-style weights."""
    shutil.copy(tiny_v / "unet" / "config.json", folder / "unet" / "config.json")
    message = load_error(folder)
    assert re.search(r"the UNet weights do not fit its config \(missing: down_blocks\.1\.attentions", message)
    assert re.search(r"wrong shape: .*proj_in\.weight \(32, 32, 1, 1\) \(expected \(32, 32\)\)", message)


def test_text_width_mismatch(folder):
    edit_json(folder / "unet" / "config.json", cross_attention_dim=1024)
    assert "the UNet attends to 1024-wide text states but the text encoder gives 32" in load_error(folder)


@pytest.mark.parametrize("changes, looks_like", [
    (dict(addition_embed_type="text_time", cross_attention_dim=2048), "SDXL"),
    (dict(in_channels=9), "an inpainting model"),
    (dict(in_channels=8), "an instruct-pix2pix model"),
])
def test_unsupported_unet_configs(folder, changes, looks_like):
    edit_json(folder / "unet" / "config.json", **changes)
    message = load_error(folder)
    assert f"this UNet looks like {looks_like}" in message and "only SD 1.x/2.x" in message


# ---------------------------------------------------------------- pickles that run code

class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("layout", ["folder .bin", "single .ckpt"])
def test_pickle_that_runs_code_is_refused(folder, tmp_path, layout):
    marker = tmp_path / "pwned"
    weights = load_file(folder / UNET_FILE)
    if layout == "folder .bin":
        (folder / UNET_FILE).unlink()
        path, target = folder / "unet" / "diffusion_pytorch_model.bin", folder
    else:
        path = target = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "callback": Payload(marker)}, path)

    message = load_error(target, error=UnsafeCheckpointError)
    assert "asks to run code" in message and "refused and nothing was executed" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is live when unpickled unsafely
    assert marker.exists()


# ---------------------------------------------------------------- single original-layout files

def original_file(model, path: Path, text_layout: str = "openai") -> Path:
    """Our model's weights written as an original (CompVis/Stability) single file; for an SD 2
    text tower, with the parts OpenCLIP has and SD 2 never runs (last block, projection)."""
    components = {name: getattr(model, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    original = to_original_checkpoint(components, text_layout)
    if text_layout == "openclip":
        layers, g = model.config.text_encoder.layers, torch.Generator().manual_seed(0)
        last = f"{OPEN_CLIP}transformer.resblocks.{layers - 1}."
        for key in [k for k in original if k.startswith(last)]:
            original[key.replace(f".{layers - 1}.", f".{layers}.")] = torch.randn(original[key].shape, generator=g)
        width = model.config.text_encoder.width
        original[OPEN_CLIP + "text_projection"] = torch.randn(width, width, generator=g)
        original[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6)
    original["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # training buffers every original file carries
    save_file({k: v.contiguous() for k, v in original.items()}, path)
    return path


@torch.no_grad()
def assert_same_outputs(a, b) -> None:
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, a.config.text_encoder.width, generator=g)
    assert torch.equal(a.unet(latents, 500, context), b.unet(latents, 500, context))
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(a.vae.encode(images).mean, b.vae.encode(images).mean)
    assert torch.equal(a.vae.decode(latents[:1]), b.vae.decode(latents[:1]))
    ids = a.tokenizer(["a photo of a cat", ""])
    assert torch.equal(ids, b.tokenizer(["a photo of a cat", ""]))
    assert torch.equal(a.text_encoder(ids), b.text_encoder(ids))


def test_single_file_sd1_layout_loads_like_the_folder(tiny, tmp_path):
    from_folder = load_model(tiny)
    path = original_file(from_folder, tmp_path / "tiny.safetensors")
    from_file = load_model(path, preset="tiny")
    assert from_file.config.unet == PRESETS["tiny"].unet
    assert same_weights(from_file, from_folder)
    assert_same_outputs(from_file, from_folder)


def test_single_file_sd2_layout_needs_a_preset(tiny_v, tmp_path, monkeypatch):
    from_folder = load_model(tiny_v)
    path = original_file(from_folder, tmp_path / "tiny-v.safetensors", text_layout="openclip")
    message = load_error(path)
    assert "SD 2.x checkpoint's weights do not say whether it predicts epsilon" in message
    assert "preset='sd2-base' or preset='sd2-v'" in message
    monkeypatch.setitem(PRESETS, "tiny-v", from_folder.config)  # a preset for these tiny shapes
    from_file = load_model(path, preset="tiny-v")
    assert from_file.tokenizer.pad_token == "!"
    assert same_weights(from_file, from_folder)
    assert_same_outputs(from_file, from_folder)


@pytest.mark.parametrize("edit, looks_like", [
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
     "an inpainting model"),
    (lambda sd: sd.update({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(32)}),
     "SDXL"),
], ids=["inpainting", "sdxl"])
def test_single_file_of_other_architectures(tiny, tmp_path, edit, looks_like):
    path = original_file(load_model(tiny), tmp_path / "other.safetensors")
    state_dict = load_file(path)
    edit(state_dict)
    save_file(state_dict, path)
    message = load_error(path, preset="tiny")
    assert f"this checkpoint looks like {looks_like}" in message and "only SD 1.x and 2.x" in message


# ---------------------------------------------------------------- hub ids, offline

HUB_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    from pathlib import Path
    import torch
    from diffedit.errors import ModelLoadError
    from diffedit.checkpoints.loading import load_model
    from reference_models import fake_hub_cache

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")
    socket.socket.connect = refuse  # any network use fails loudly

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    hf_home, repo_id, local = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    result = {"cache_existed": hf_home.exists()}
    try:
        load_model(repo_id)
    except ModelLoadError as e:
        result["error"] = str(e)
    fake_hub_cache(hf_home, repo_id, local)
    cached = load_model(repo_id)
    result["source"] = cached.source
    result["same"] = all(same(getattr(cached, n), getattr(load_model(local), n)) for n in ("unet", "vae", "text_encoder"))
    print(json.dumps(result))
""")


def test_hub_id_offline(tiny, tmp_path):
    """HF_HUB_OFFLINE=1, an empty HF_HOME of our own, sockets disabled: the hub id gives one
    sentence saying how to get the weights; once in the cache, it loads from there."""
    hf_home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(hf_home), "example-org/tiny-sd", str(tiny)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["cache_existed"]
    message = result["error"]
    assert "cannot get 'example-org/tiny-sd': it is not in the Hugging Face cache" in message
    assert "`hf download example-org/tiny-sd`" in message
    assert "\n" not in message and message.endswith(".")
    assert result["source"] == "example-org/tiny-sd" and result["same"]


# ---------------------------------------------------------------- weights/known_checkpoints.json

def test_known_checkpoints_table():
    table = json.loads((REPO / "weights" / "known_checkpoints.json").read_text())
    entries = table["checkpoints"]
    assert len(entries) >= 5
    for entry in entries:
        assert set(entry) >= {"id", "layout", "prediction_type", "resolution", "preset", "supported", "notes"}, entry
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry["id"])
        assert entry["prediction_type"] in ("epsilon", "v_prediction")
        if entry["supported"]:
            config = PRESETS[entry["preset"]]
            assert config.resolution == entry["resolution"], entry["id"]
            assert config.scheduler.prediction_type == entry["prediction_type"], entry["id"]
