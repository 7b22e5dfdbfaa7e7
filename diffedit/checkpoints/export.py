"""Writing a model in diffusers layout, the inverse of loading.py's folder reader:

    folder/unet/{config.json, diffusion_pytorch_model.safetensors}
    folder/vae/{config.json, diffusion_pytorch_model.safetensors}
    folder/text_encoder/{config.json, model.safetensors}      (transformers' CLIPTextModel names)
    folder/tokenizer/{vocab.json, merges.txt, ...}
    folder/scheduler/scheduler_config.json
    folder/model_index.json

The configs are the keys the reference libraries read, so diffusers' `from_pretrained` opens the
folder too. The folder is written beside its destination and renamed into place: a crash never
leaves half a model, and a model this exporter wrote before is replaced only once the new one is
complete (any other non-empty folder is refused)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffedit.checkpoints.model_io import (
    rename_state_dict,
    text_encoder_key_to_transformers,
)
from diffedit.errors import OutputFileError
from diffedit.models.clip import TextEncoder
from diffedit.models.config import (
    ModelConfig,
    SchedulerConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from diffedit.models.tokenizer import Tokenizer
from diffedit.models.unet import UNet
from diffedit.models.vae import AutoencoderKL

MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def text_encoder_dict(c: TextEncoderConfig, tokenizer: Tokenizer) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_length, "hidden_size": c.width,
            "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "intermediate_size": c.mlp_width,
            "hidden_act": c.activation, "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.width,
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "torch_dtype": "float32"}


def vae_dict(c: VAEConfig, resolution: int) -> dict:
    levels = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "latent_channels": c.latent_channels, "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups,
            "scaling_factor": c.scaling_factor, "mid_block_add_attention": c.mid_block_attention,
            "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_quant_conv,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "sample_size": resolution}


def unet_dict(c: UNetConfig) -> dict:
    down = ["CrossAttnDownBlock2D" if cross else "DownBlock2D" for cross in c.cross_attention]
    up = ["CrossAttnUpBlock2D" if cross else "UpBlock2D" for cross in reversed(c.cross_attention)]
    return {"_class_name": "UNet2DConditionModel", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_head_dim": list(c.heads), "cross_attention_dim": c.cross_attention_dim,
            "use_linear_projection": c.use_linear_projection, "upcast_attention": c.upcast_attention,
            "transformer_layers_per_block": c.transformer_layers_per_block, "norm_num_groups": c.norm_num_groups,
            "norm_eps": c.norm_eps, "flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift,
            "sample_size": c.sample_size}


def scheduler_dict(c: SchedulerConfig) -> dict:
    d = {"_class_name": "DDIMScheduler", **asdict(c)}
    d["trained_betas"] = list(c.trained_betas) if c.trained_betas is not None else None
    return d


def _fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU copies, the form the safetensors files are written in."""
    return {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()}


def save_pretrained(folder: str | Path, config: ModelConfig, tokenizer: Tokenizer, text_encoder: TextEncoder,
                    vae: AutoencoderKL, unet: UNet, extra_files: dict[str, str] | None = None) -> Path:
    """Write the model as a diffusers-layout folder (fp32 safetensors), atomically; `extra_files`
    maps a relative name (e.g. "README.md") to its text."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFileError(f"{folder} exists and is not a folder; choose another destination.")
    if folder.is_dir() and any(folder.iterdir()) and not is_exported_model(folder):
        raise OutputFileError(f"{folder} already holds files and is not a model exported by diffedit, so it is left "
                              "as it is; choose a new or empty folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        def write_json(rel: str, d: dict) -> None:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(json.dumps(d, indent=2) + "\n")

        write_json("model_index.json", MODEL_INDEX)
        write_json("text_encoder/config.json", text_encoder_dict(config.text_encoder, tokenizer))
        save_file(_fp32(rename_state_dict(text_encoder.state_dict(), text_encoder_key_to_transformers)),
                  staging / "text_encoder/model.safetensors")
        write_json("vae/config.json", vae_dict(config.vae, config.resolution))
        save_file(_fp32(vae.state_dict()), staging / "vae/diffusion_pytorch_model.safetensors")
        write_json("unet/config.json", unet_dict(config.unet))
        save_file(_fp32(unet.state_dict()), staging / "unet/diffusion_pytorch_model.safetensors")
        write_json("scheduler/scheduler_config.json", scheduler_dict(config.scheduler))
        tokenizer.save(staging / "tokenizer")
        for rel, text in (extra_files or {}).items():
            (staging / rel).write_text(text)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors create private files
            path.chmod(0o755 if path.is_dir() else 0o644)
        move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def is_exported_model(folder: Path) -> bool:
    """True if `folder` is a model `save_pretrained` wrote (its model_index.json is ours)."""
    try:
        return json.loads((folder / "model_index.json").read_text()) == MODEL_INDEX
    except (OSError, ValueError):
        return False


def move_into_place(staging: Path, folder: Path) -> None:
    """Rename `staging` to `folder`. An existing `folder` is set aside, put back if anything (an
    error, Ctrl-C) stops the swap half-way, and deleted only once the new folder is in place."""
    if not folder.exists():
        staging.rename(folder)
        return
    old = staging.with_name(f"{staging.name}.old")  # staging's name is unique, so this one is too
    try:
        folder.rename(old)
        staging.rename(folder)
    finally:
        if not folder.exists() and old.exists():
            old.rename(folder)
    shutil.rmtree(old)
