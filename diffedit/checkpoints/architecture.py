"""What an ORIGINAL-layout single file (CompVis / Stability `.ckpt` / `.safetensors`) holds, read
from its keys and shapes alone: which architecture (`detect_original_architecture`, refusing
SDXL, inpainting, ...), which preset (`choose_preset`), and that the preset's config fits the
file (`infer_configs`). The key conversion itself is in single_file.py.

One file holds the three models, each under its own prefix:

    model.diffusion_model.*           UNet: LDM's `openaimodel.UNetModel` names
    first_stage_model.*               VAE: LDM's autoencoder, attention as 1x1 convs
    cond_stage_model.transformer.*    SD 1.x text encoder: transformers' CLIPTextModel names
    cond_stage_model.model.*          SD 2.x text encoder: OpenCLIP names, q/k/v fused in in_proj

What the weights cannot tell: SD 2 checkpoints predict epsilon (512 px "base") or v (768 px)
with identical shapes. `choose_preset` takes the caller's preset, or a `prediction_type` hint
("v_prediction" -> "sd2-v", "epsilon" -> "sd2-base"), and otherwise asks for one.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Iterable

import torch

from diffedit.errors import ModelLoadError
from diffedit.models.config import (
    PRESETS,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

StateDict = dict[str, torch.Tensor]

UNET, VAE = "model.diffusion_model.", "first_stage_model."
OPENAI_CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

NOT_SD = "not a Stable Diffusion checkpoint"
ARCHITECTURES = {  # what detect_original_architecture returns -> what it is, for messages
    "sd1": "SD 1.x (OpenAI CLIP text encoder)",
    "sd2": "SD 2.x (OpenCLIP text encoder)",
    "sdxl": "SDXL (two text encoders, 2048-wide text states)",
    "inpainting": "an inpainting model (9 UNet input channels)",
    "instruct-pix2pix": "an instruct-pix2pix model (8 UNet input channels)",
    "depth": "a depth-to-image model (5 UNet input channels)",
    "upscaler": "an upscaler (7 UNet input channels)",
    "other input channels": "a model whose UNet does not take SD's 4 latent channels",
    "unclip": "an unCLIP or class-conditioned model (UNet label_emb)",
    NOT_SD: "no Stable Diffusion model (no model.diffusion_model.* UNet weights)",
}
SUPPORTED = ("sd1", "sd2")


# ---------------------------------------------------------------- what the file is

def detect_original_architecture(state_dict: StateDict) -> str:
    """What an original-layout state dict looks like: "sd1" or "sd2" (supported), or one of the
    refused "sdxl", "inpainting", "instruct-pix2pix", "depth", "upscaler", "other input
    channels", "unclip", NOT_SD (see ARCHITECTURES).
    SD 2 epsilon (512) and v-prediction (768) have the same weights: see `choose_preset`."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        return "sdxl"
    conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        return NOT_SD
    context = {t.shape[1] for k, t in state_dict.items()
               if k.startswith(UNET) and k.endswith(".attn2.to_k.weight") and t.ndim == 2}
    if 2048 in context:
        return "sdxl"
    if conv_in.shape[1] != 4:
        return {9: "inpainting", 8: "instruct-pix2pix", 7: "upscaler", 5: "depth"}.get(
            conv_in.shape[1], "other input channels")
    if any(k.startswith(UNET + "label_emb.") for k in state_dict):
        return "unclip"
    if any(k.startswith(OPEN_CLIP) for k in state_dict) or 1024 in context:
        return "sd2"
    if any(k.startswith(OPENAI_CLIP) for k in state_dict) or 768 in context:
        return "sd1"
    return NOT_SD


def check_supported(arch: str) -> None:
    """Raise ModelLoadError, in one sentence, for an architecture this project does not run."""
    if arch not in SUPPORTED:
        raise ModelLoadError(f"this checkpoint looks like {ARCHITECTURES.get(arch, arch)}; only SD 1.x and 2.x "
                             "text-to-image checkpoints are supported.")


def choose_preset(arch: str, preset: str | None = None, prediction_type: str | None = None) -> str:
    """The preset of PRESETS for a detected architecture: the caller's `preset` if given, "sd1"
    for SD 1.x; for SD 2.x, whose weights do not say whether they predict epsilon or v, the
    `prediction_type` hint ("v_prediction" -> "sd2-v", the 768 px models; "epsilon" ->
    "sd2-base"), else an error asking for one of them."""
    check_supported(arch)
    if preset is not None:
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
        return preset
    if arch == "sd1":
        return "sd1"
    by_prediction = {"v_prediction": "sd2-v", "epsilon": "sd2-base"}
    if prediction_type in by_prediction:
        return by_prediction[prediction_type]
    raise ModelLoadError("this SD 2.x checkpoint's weights do not say whether it predicts epsilon (512 px) or v "
                         "(768 px); pass preset='sd2-base' or preset='sd2-v' (--preset on the command line).")


# ---------------------------------------------------------------- configs from shapes

def infer_configs(state_dict: StateDict, preset: str | ModelConfig) -> ModelConfig:
    """The preset's config, after checking that the checkpoint's shapes (block widths, layer
    counts, context width, projections, text tower) are those of the preset; heads, schedule
    and tokenizer cannot be read from weights and come from the preset. Raises ModelLoadError
    naming what the checkpoint looks like when they differ."""
    name = preset if isinstance(preset, str) else next((n for n, c in PRESETS.items() if c == preset), "given")
    if isinstance(preset, str) and preset not in PRESETS:
        raise ModelLoadError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    config = PRESETS[preset] if isinstance(preset, str) else preset
    arch = detect_original_architecture(state_dict)
    check_supported(arch)
    measured = measure_checkpoint(state_dict)
    titles = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}
    for component, values in measured.items():
        expected = getattr(config, component)
        for field, value in values.items():
            if getattr(expected, field) != value:
                raise ModelLoadError(
                    f"this checkpoint looks like {ARCHITECTURES[arch]} and does not fit the {name} preset: its "
                    f"{titles[component]} {field} is {value} where the preset has {getattr(expected, field)}; "
                    "pass the preset that matches (sd1, sd2-base or sd2-v).")
    return config


def measure_checkpoint(state_dict: StateDict) -> dict[str, dict[str, Any]]:
    """The config fields that an original-layout checkpoint's keys and shapes determine,
    {"unet" | "vae" | "text_encoder": {field: value}} (field names of config.py)."""
    return {"unet": _measure_unet(state_dict), "vae": _measure_vae(state_dict),
            "text_encoder": _measure_text(state_dict)}


def _shape(state_dict: StateDict, key: str, what: str) -> torch.Size:
    """The shape of a weight the config is read from: a matrix or a convolution (2 to 4 dimensions)."""
    if key not in state_dict:
        raise ModelLoadError(f"the checkpoint has no {what} weights ({key} is missing); "
                             "it is not a complete original-layout SD 1.x/2.x file.")
    shape = state_dict[key].shape
    if not 2 <= len(shape) <= 4 or 0 in shape:
        raise ModelLoadError(f"the checkpoint's {what} weight {key} has shape {tuple(shape)}, not that of a "
                             "matrix or convolution; the file is damaged or of another architecture.")
    return shape


def _measure_unet(sd: StateDict) -> dict[str, Any]:
    blocks = {int(m[1]) for k in sd if (m := re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.", k))}
    ops = sorted(i for i in blocks if UNET + f"input_blocks.{i}.0.op.weight" in sd)
    n = ops[0] if ops else len(blocks)  # blocks per level: the ResNets and the stride-2 conv
    levels = len(blocks) // n if n else 0
    first = [UNET + f"input_blocks.{1 + b * n}." for b in range(levels)]  # first ResNet of each level
    mid = UNET + "middle_block.1."
    return {
        "in_channels": _shape(sd, UNET + "input_blocks.0.0.weight", "UNet")[1],
        "out_channels": _shape(sd, UNET + "out.2.weight", "UNet")[0],
        "block_out_channels": tuple(_shape(sd, p + "0.out_layers.3.weight", "UNet")[0] for p in first),
        "layers_per_block": n - 1,
        "cross_attention": tuple(p + "1.norm.weight" in sd for p in first),
        "cross_attention_dim": _shape(sd, mid + "transformer_blocks.0.attn2.to_k.weight", "UNet")[1],
        "use_linear_projection": len(_shape(sd, mid + "proj_in.weight", "UNet")) == 2,
        "transformer_layers_per_block": count_indices(sd, re.escape(mid) + r"transformer_blocks\.(\d+)\."),
    }


def _measure_vae(sd: StateDict) -> dict[str, Any]:
    levels = count_indices(sd, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": _shape(sd, VAE + "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(sd, VAE + "decoder.conv_out.weight", "VAE")[0],
        "latent_channels": _shape(sd, VAE + "decoder.conv_in.weight", "VAE")[1],
        "block_out_channels": tuple(_shape(sd, VAE + f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0]
                                    for i in range(levels)),
        "layers_per_block": count_indices(sd, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        "mid_block_attention": VAE + "encoder.mid.attn_1.q.weight" in sd,
        "use_quant_conv": VAE + "quant_conv.weight" in sd,
    }


def _measure_text(sd: StateDict) -> dict[str, Any]:
    if detect_text_layout(sd) == "openai":
        p = OPENAI_CLIP + "text_model."
        vocab, width = _shape(sd, p + "embeddings.token_embedding.weight", "text encoder")
        return {"vocab_size": vocab, "width": width, "activation": "quick_gelu",
                "max_length": _shape(sd, p + "embeddings.position_embedding.weight", "text encoder")[0],
                "layers": count_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\."),
                "mlp_width": _shape(sd, p + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]}
    vocab, width = _shape(sd, OPEN_CLIP + "token_embedding.weight", "text encoder")
    return {"vocab_size": vocab, "width": width, "activation": "gelu",
            "max_length": _shape(sd, OPEN_CLIP + "positional_embedding", "text encoder")[0],
            "layers": count_indices(sd, re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.") - 1,  # penultimate
            "mlp_width": _shape(sd, OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]}


def detect_text_layout(sd: StateDict) -> str:
    """"openclip" (SD 2.x) or "openai" (SD 1.x): which text encoder the file holds."""
    if any(k.startswith(OPEN_CLIP) for k in sd):
        return "openclip"
    if any(k.startswith(OPENAI_CLIP) for k in sd):
        return "openai"
    raise ModelLoadError("the checkpoint has no text encoder weights (no cond_stage_model.* keys); "
                         "it is not a complete original-layout SD 1.x/2.x file.")


def config_from_shapes(state_dict: StateDict) -> ModelConfig:
    """A config with the checkpoint's shapes, enough to name every parameter: heads and GroupNorm
    groups, which change no parameter name or shape, are set to 1."""
    m = measure_checkpoint(state_dict)
    levels = len(m["unet"]["block_out_channels"])
    return ModelConfig(text_encoder=replace(TextEncoderConfig(), heads=1, **m["text_encoder"]),
                       vae=replace(VAEConfig(), norm_num_groups=1, **m["vae"]),
                       unet=replace(UNetConfig(), heads=(1,) * levels, norm_num_groups=1, **m["unet"]))


def count_indices(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the number in `pattern` takes over `keys`."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})
