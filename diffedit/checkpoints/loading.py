"""Where weights come from: a diffusers-layout folder, a single original-layout file, or a hub id.

    load_model("path/to/folder" | "model.safetensors" | "org/name", device, dtype) -> StableDiffusion

Hub ids are resolved with huggingface_hub (only the files needed, cached where huggingface_hub
caches), looking in the cache first; local paths never touch the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffedit.checkpoints.model_io import (
    build_module,
    inside,
    model_root,
    read_component,
    read_json,
    read_state_dict,
    rename_state_dict,
    rename_text_encoder_key,
    rename_vae_key,
)
from diffedit.devices import parse_device, parse_dtype
from diffedit.errors import ModelLoadError
from diffedit.io.files import path_kind, user_path
from diffedit.models.clip import TextEncoder
from diffedit.models.config import (
    ModelConfig,
    SchedulerConfig,
    TextEncoderConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)
from diffedit.models.tokenizer import Tokenizer
from diffedit.models.unet import UNet
from diffedit.models.vae import AutoencoderKL

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class StableDiffusion:
    """The four parts of an SD checkpoint, ready to run, and the config they were built from."""
    config: ModelConfig
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    vae: AutoencoderKL
    unet: UNet
    source: str


def load_model(path_or_id: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = torch.float32,
               variant: str | None = None, preset: str | None = None) -> StableDiffusion:
    """Load a Stable Diffusion 1.x/2.x checkpoint.

    `variant` picks e.g. the "fp16" files of a diffusers folder; `preset` ("sd1", "sd2-base",
    "sd2-v") says what a single original-layout file is, when its weights cannot tell (SD 2
    epsilon vs v-prediction)."""
    device = parse_device(device)
    if isinstance(dtype, str) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = parse_dtype(dtype, device)   # "bf16" as from_pretrained reads it
    path, kind = model_source(path_or_id)
    source = str(path_or_id)
    if kind in ("dir", "hub id") and preset is not None:
        raise ModelLoadError(f"preset {preset!r} applies only to a single checkpoint file; {source} is a "
                             f"{'folder' if kind == 'dir' else 'hub id'} whose config files say what it is: "
                             "leave out the preset (--preset).")
    if kind == "dir":
        return _load_folder(path, device, dtype, variant, source)
    if kind == "file":
        return _load_single_file(path, device, dtype, preset, source)
    return _load_folder(resolve_hub_id(source, variant), device, dtype, variant, source)


def model_source(path_or_id: str | os.PathLike) -> tuple[Path, str]:
    """(path, "dir" | "file" | "hub id") for a model argument, without reading any file or the
    network; ModelLoadError for anything else (another type, a FIFO, a non-checkpoint file, a
    missing path, a hub id the Hub would reject)."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise ModelLoadError(f"the model must be a folder, a checkpoint file or a hub id (a string or path), "
                             f"not {type(path_or_id).__name__} {path_or_id!r:.40}.")
    source = str(path_or_id)
    path = user_path(source, ModelLoadError)
    kind = path_kind(path)
    if kind == "file" and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path} is not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)}).")
    if kind in ("dir", "file"):
        return path, kind
    if kind != "missing":
        raise ModelLoadError(f"the model path {source} is {kind}, not a model folder or checkpoint file; pass a "
                             "diffusers-layout folder, a .safetensors/.ckpt file or a hub id.")
    if HUB_ID.match(source) is not None and not source.startswith((".", "/", "~")):
        return Path(check_hub_id(source)), "hub id"
    raise ModelLoadError(f"{source} is neither an existing folder or file nor a hub id like "
                         "'stable-diffusion-v1-5/stable-diffusion-v1-5'; check the path.")


def check_hub_id(repo_id: str) -> str:
    """`repo_id` if the Hub would accept it as a repository name, else ModelLoadError (e.g. 'org/name..')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"{repo_id!r} is not a valid hub id (names use letters, digits, '-', '_' and '.', "
                             "with no '--' or '..' and no '.' or '-' at either end) nor an existing path; "
                             "check the spelling.") from None
    return repo_id


def _load_folder(folder: Path, device, dtype, variant, source: str) -> StableDiffusion:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} is not a complete diffusers-layout model: missing {', '.join(missing)}/ "
                             f"(expected {', '.join(c + '/' for c in COMPONENTS)}).")
    root = model_root(folder)
    config = ModelConfig(
        text_encoder=_read_config(TextEncoderConfig, folder / "text_encoder" / "config.json", root),
        vae=_read_config(VAEConfig, folder / "vae" / "config.json", root),
        unet=_read_config(UNetConfig, folder / "unet" / "config.json", root),
        scheduler=_read_config(SchedulerConfig, folder / "scheduler" / "scheduler_config.json", root),
    )
    for file in (folder / "tokenizer").iterdir():  # what the tokenizer reads, checked before it reads it
        inside(file, root)
    tokenizer = Tokenizer.from_folder(folder / "tokenizer")
    config = replace(config, tokenizer=TokenizerConfig(max_length=tokenizer.max_length,
                                                       pad_token=tokenizer.pad_token),
                     resolution=config.unet.sample_size * config.vae.downsample_factor)
    _check_widths(config)
    weights = {
        "text_encoder": rename_state_dict(read_component(folder / "text_encoder", root, variant),
                                          rename_text_encoder_key),
        "vae": rename_state_dict(read_component(folder / "vae", root, variant), rename_vae_key),
        "unet": read_component(folder / "unet", root, variant),
    }
    return _assemble(config, tokenizer, weights, device, dtype, source)


def _read_config(cls, path: Path, root: Path):
    """One component's config, checked when read (types, ranges, structure); errors name the file."""
    data = read_json(inside(path, root))
    try:
        return cls.from_dict(data)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _load_single_file(path: Path, device, dtype, preset: str | None, source: str) -> StableDiffusion:
    """An original-layout file: detect what it is (refusing SDXL, inpainting, ...), choose the
    preset (SD 2 needs `preset`), check the file's shapes against it,
    then rename/split into our three models' state dicts (views of the file's tensors, no copies)."""
    from diffedit.checkpoints.architecture import (
        choose_preset,
        detect_original_architecture,
        infer_configs,
    )
    from diffedit.checkpoints.single_file import split_original_checkpoint
    state_dict = read_state_dict(path)
    preset = choose_preset(detect_original_architecture(state_dict), preset)
    config = infer_configs(state_dict, preset)
    weights = split_original_checkpoint(state_dict, config)
    del state_dict
    tokenizer = Tokenizer.default(pad_token=config.tokenizer.pad_token)
    return _assemble(config, tokenizer, weights, device, dtype, source)


def _check_widths(config: ModelConfig) -> None:
    if config.unet.cross_attention_dim != config.text_encoder.width:
        raise ModelLoadError(f"the UNet attends to {config.unet.cross_attention_dim}-wide text states but the text "
                             f"encoder gives {config.text_encoder.width}: the components come from different models.")
    if config.unet.in_channels != config.vae.latent_channels:
        raise ModelLoadError("the UNet and the VAE disagree on the number of latent channels; "
                             "the components come from different models.")


def _assemble(config: ModelConfig, tokenizer: Tokenizer, weights: dict, device, dtype, source: str) -> StableDiffusion:
    return StableDiffusion(
        config=config,
        tokenizer=tokenizer,
        text_encoder=build_module(lambda: TextEncoder(config.text_encoder), weights.pop("text_encoder"),
                                  "text encoder", dtype, device),
        vae=build_module(lambda: AutoencoderKL(config.vae), weights.pop("vae"), "VAE", dtype, device),
        unet=build_module(lambda: UNet(config.unet), weights.pop("unet"), "UNet", dtype, device),
        source=source,
    )


def hub_patterns(variant: str | None, suffix: str) -> list[str]:
    """Only the files a DiffEdit run needs (no safety checker, no feature extractor)."""
    infix = f".{variant}" if variant else ""
    return ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
            "unet/config.json", "vae/config.json", "text_encoder/config.json",
            f"unet/diffusion_pytorch_model{infix}{suffix}*", f"vae/diffusion_pytorch_model{infix}{suffix}*",
            f"text_encoder/model{infix}{suffix}*", f"text_encoder/pytorch_model{infix}{suffix}*"]


def resolve_hub_id(repo_id: str, variant: str | None = None) -> Path:
    """The local snapshot of a hub model: the cache if it holds it, else a download of only the
    needed files (safetensors, or .bin where a repository has no safetensors)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def complete(folder: Path) -> bool:
        return all(any((folder / c).glob("*.safetensors")) or any((folder / c).glob("*.bin"))
                   for c in ("unet", "vae", "text_encoder"))

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=hub_patterns(variant, ".safetensors"),
                                        local_files_only=True))
        if complete(folder):
            return folder
    except LocalEntryNotFoundError:
        pass
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=hub_patterns(variant, ".safetensors")))
        if not complete(folder):
            folder = Path(snapshot_download(repo_id, allow_patterns=hub_patterns(variant, ".bin")))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelLoadError(
            f"cannot get '{repo_id}': it is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}); on a machine with network run `hf download {repo_id}` (same HF_HOME), "
            "or pass the path of a local copy.") from None
    if not complete(folder):
        raise ModelLoadError(f"'{repo_id}' has no unet/vae/text_encoder weights in diffusers layout; "
                             "pass the path of a single-file checkpoint instead.")
    return folder
