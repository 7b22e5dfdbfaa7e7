"""Single-file checkpoints in the ORIGINAL layout (CompVis / Stability `.ckpt` / `.safetensors`,
as most community fine-tunes ship) -> the parameter names of this project, and back.

One file holds the three models, each under its own prefix:

    model.diffusion_model.*           UNet: LDM's `openaimodel.UNetModel` names
    first_stage_model.*               VAE: LDM's autoencoder, attention as 1x1 convs
    cond_stage_model.transformer.*    SD 1.x text encoder: transformers' CLIPTextModel names
    cond_stage_model.model.*          SD 2.x text encoder: OpenCLIP names, q/k/v fused in in_proj

The rules are written in ONE direction, ours -> original, as small pure functions of one key
(the UNet's also of its layout: ResNet blocks per level and which levels attend). Applied to
every parameter name our models have, they give a table {our name: Origin}; loading reads it
backwards (`split_original_checkpoint`), export forwards (`to_original_checkpoint`).

A key of the file that is no weight of ours is IGNORED (EMA copy, training noise schedule, an
index buffer), DROPPED (the parts of OpenCLIP that SD 2 never runs) or reported as unknown:
nothing is dropped silently.

What the weights cannot tell: SD 2 checkpoints predict epsilon (512 px "base") or v (768 px)
with identical shapes. `choose_preset` takes the caller's preset, or a `prediction_type` hint
("v_prediction" -> "sd2-v", "epsilon" -> "sd2-base"), and otherwise asks for one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from .clip import TextEncoder
from .config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .errors import ModelLoadError
from .unet import UNet
from .vae import AutoencoderKL

StateDict = dict[str, torch.Tensor]

UNET, VAE = "model.diffusion_model.", "first_stage_model."
OPENAI_CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

NOT_SD = "not a Stable Diffusion checkpoint"
ARCHITECTURES = {  # what detect_original_architecture returns -> what it is, for messages
    "sd1": "SD 1.x (OpenAI CLIP text encoder)",
    "sd2": "SD 2.x (OpenCLIP text encoder)",
    "sdxl": "SDXL (two text encoders, 2048-wide text states)",
    "inpainting": "an inpainting model (9 UNet input channels)",
    "instruct-pix2pix or depth": "an instruct-pix2pix or depth model (8 UNet input channels)",
    "unclip": "an unCLIP or class-conditioned model (UNet label_emb)",
    NOT_SD: "no Stable Diffusion model (no model.diffusion_model.* UNet weights)",
}
SUPPORTED = ("sd1", "sd2")

# Keys that hold no weight of our models, ignored by rule.
IGNORED = re.compile(
    r"model_ema\..+"  # the EMA copy of the UNet (flattened names): the main weights are loaded, as diffusers does
    r"|betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|sqrt_recip(m1)?_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])"
    r"|logvar|lvlb_weights"  # LDM's training noise schedule and loss weights: the scheduler recomputes them
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids")  # arange(77), not a weight


def is_dropped(key: str, text_layers: int) -> bool:
    """SD 2 runs OpenCLIP's text tower up to its penultimate layer: exactly the one resblock after
    the `text_layers` it runs (23 of 24), and the projection into CLIP's joint image-text space
    (`text_projection`, `logit_scale`), are never used."""
    m = re.fullmatch(r"cond_stage_model\.model\.(text_projection|logit_scale|transformer\.resblocks\.(\d+)\..+)", key)
    return m is not None and (m[2] is None or int(m[2]) == text_layers)


@dataclass(frozen=True)
class Origin:
    """Where one of our parameters lives in the original file."""
    key: str
    chunk: int | None = None  # which third (q, k, v) of a fused OpenCLIP in_proj tensor it is
    conv1x1: bool = False     # stored as a 1x1 conv (C, C, 1, 1); ours is a linear (C, C)


# ---------------------------------------------------------------- rules: ours -> original, one key

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_OUTER = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def original_unet_key(key: str, layers_per_block: int, cross_attention: tuple[bool, ...]) -> str:
    """Ours (diffusers' names) -> LDM's. The original numbers its blocks in flat sequences:
    input_blocks.0 is conv_in, then per level `layers_per_block` (ResNet [, transformer]) blocks
    and one stride-2 conv; output_blocks has `layers_per_block + 1` blocks per level, the last
    of which also holds the upsampler after its ResNet (and transformer)."""
    n = layers_per_block + 1  # original blocks per level
    module, _, param = key.rpartition(".")
    if module in _UNET_OUTER:
        return f"{_UNET_OUTER[module]}.{param}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])  # ResNet, transformer, ResNet
        return f"middle_block.{index}.{_block_inner(m[1], m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = len(cross_attention) - 1 - int(m[1])  # up blocks run the levels in reverse
        return f"output_blocks.{int(m[1]) * n + n - 1}.{2 if cross_attention[level] else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        sub = 1 if m[3] == "attentions" else 0
        if m[1] == "down":
            return f"input_blocks.{1 + int(m[2]) * n + int(m[4])}.{sub}.{_block_inner(m[3], m[5])}"
        return f"output_blocks.{int(m[2]) * n + int(m[4])}.{sub}.{_block_inner(m[3], m[5])}"
    raise ValueError(f"no original name for UNet parameter {key}")


def _block_inner(kind: str, rest: str) -> str:
    """Inside a block: ResNet names differ; the spatial transformer's are the same in both layouts."""
    if kind == "attentions":
        return rest
    module, _, param = rest.rpartition(".")
    return f"{_RESNET[module]}.{param}"


_VAE_RENAMES = [  # applied in order, ours -> original
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]
_VAE_LINEAR = re.compile(r".*\.mid_block\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight")


def original_vae_key(key: str, levels: int) -> str:
    """Ours (diffusers' names) -> LDM's. The decoder's levels are numbered from the lowest
    resolution up in ours, from the highest in the original."""
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    for pattern, replacement in _VAE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def original_clip_key(key: str) -> str:
    """Ours -> transformers' CLIPTextModel names, which SD 1.x files keep (under their prefix)."""
    return "text_model." + re.sub(r"^layers\.", "encoder.layers.", key)


_OPEN_CLIP_RENAMES = [  # applied in order, ours -> OpenCLIP
    (r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^final_layer_norm\.", "ln_final."),
    (r"^layers\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"\.layer_norm([12])\.", r".ln_\1."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.self_attn\.[qkv]_proj\.(weight|bias)$", r".attn.in_proj_\1"),
]


def original_open_clip_key(key: str) -> Origin:
    """Ours -> OpenCLIP's names (without prefix); q, k and v are the thirds of one in_proj."""
    chunk = "qkv".index(m[1]) if (m := re.search(r"\.self_attn\.([qkv])_proj\.", key)) else None
    for pattern, replacement in _OPEN_CLIP_RENAMES:
        key = re.sub(pattern, replacement, key)
    return Origin(key, chunk)


# ---------------------------------------------------------------- the table, both directions

def parameter_names(config: ModelConfig) -> dict[str, list[str]]:
    """Every parameter name of our three models for `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae),
                  "text_encoder": TextEncoder(config.text_encoder)}
    return {name: list(model.state_dict()) for name, model in models.items()}


def original_table(names: dict[str, Iterable[str]], text_layout: str = "openai") -> dict[str, dict[str, Origin]]:
    """{component: {our name: Origin}} for the given components' parameter names. The UNet's and
    VAE's block layout is read from the names themselves; `text_layout` is "openai" (SD 1.x)
    or "openclip" (SD 2.x)."""
    if text_layout not in ("openai", "openclip"):
        raise ValueError(f"text_layout must be 'openai' or 'openclip', not {text_layout!r}")
    table: dict[str, dict[str, Origin]] = {}
    if "unet" in names:
        keys = list(names["unet"])
        levels = _count(keys, r"down_blocks\.(\d+)\.")
        layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
        cross = tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(levels))
        table["unet"] = {k: Origin(UNET + original_unet_key(k, layers, cross)) for k in keys}
    if "vae" in names:
        keys = list(names["vae"])
        levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
        table["vae"] = {k: Origin(VAE + original_vae_key(k, levels), conv1x1=bool(_VAE_LINEAR.fullmatch(k)))
                        for k in keys}
    if "text_encoder" in names:
        if text_layout == "openai":
            table["text_encoder"] = {k: Origin(OPENAI_CLIP + original_clip_key(k)) for k in names["text_encoder"]}
        else:
            origins = {k: original_open_clip_key(k) for k in names["text_encoder"]}
            table["text_encoder"] = {k: replace(o, key=OPEN_CLIP + o.key) for k, o in origins.items()}
    return table


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the number in `pattern` takes over `keys`."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def split_original_checkpoint(state_dict: StateDict, config: ModelConfig | None = None) -> dict[str, StateDict]:
    """An original-layout state dict -> {"unet", "vae", "text_encoder": state dict in our names}.

    `config` (e.g. from `infer_configs`) gives our parameter names; without it they come from
    the checkpoint's own shapes. Tensors are the file's own, not copies; only fused OpenCLIP
    q/k/v (split) and the VAE's 1x1-conv attention (reshaped) become views of them. Raises
    ModelLoadError if the file holds keys that are neither ours, IGNORED nor DROPPED. Missing
    weights are left to the strict load, which names them."""
    text_layout = _text_layout(state_dict)
    if config is None:
        config = _checkpoint_config(state_dict)
    table = original_table(parameter_names(config), text_layout)
    split: dict[str, StateDict] = {component: {} for component in table}
    used = set()
    for component, origins in table.items():
        for ours, origin in origins.items():
            tensor = state_dict.get(origin.key)
            if tensor is None:
                continue
            used.add(origin.key)
            if origin.chunk is not None:
                tensor = tensor.chunk(3, dim=0)[origin.chunk]
            if origin.conv1x1 and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
            split[component][ours] = tensor
    unknown = [k for k in state_dict if k not in used and not IGNORED.fullmatch(k)
               and not is_dropped(k, config.text_encoder.layers)]
    if unknown:
        shown = ", ".join(unknown[:4]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 4 else "")
        raise ModelLoadError(f"the checkpoint holds weights that no SD 1.x/2.x model of its shape has ({shown}); "
                             "it is of another architecture or was modified.")
    return split


def to_original_checkpoint(components: dict[str, StateDict], text_layout: str = "openai") -> StateDict:
    """Our-name state dicts of any of "unet", "vae", "text_encoder" -> one original-layout state
    dict (the inverse of `split_original_checkpoint`). Tensors are shared; VAE attention weights
    become (C, C, 1, 1) views and OpenCLIP q/k/v are concatenated into in_proj. The OpenCLIP
    parts SD 2 never runs (the last resblock, text_projection, logit_scale) are not ours and are
    not written: split such a file with an explicit config."""
    table = original_table({c: list(sd) for c, sd in components.items()}, text_layout)
    original: StateDict = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for component, origins in table.items():
        for ours, origin in origins.items():
            tensor = components[component][ours]
            if origin.chunk is not None:
                fused.setdefault(origin.key, {})[origin.chunk] = tensor
            else:
                original[origin.key] = tensor[:, :, None, None] if origin.conv1x1 else tensor  # (C, C) -> (C, C, 1, 1)
    for key, parts in fused.items():
        original[key] = torch.cat([parts[0], parts[1], parts[2]])
    return original


# ---------------------------------------------------------------- what the file is

def detect_original_architecture(state_dict: StateDict) -> str:
    """What an original-layout state dict looks like: "sd1" or "sd2" (supported), or one of the
    refused "sdxl", "inpainting", "instruct-pix2pix or depth", "unclip", NOT_SD (see ARCHITECTURES).
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
        return {9: "inpainting", 8: "instruct-pix2pix or depth"}.get(conv_in.shape[1], NOT_SD)
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
                         "(768 px); pass preset='sd2-base' or preset='sd2-v' (or prediction_type).")


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
    if key not in state_dict:
        raise ModelLoadError(f"the checkpoint has no {what} weights ({key} is missing); "
                             "it is not a complete original-layout SD 1.x/2.x file.")
    return state_dict[key].shape


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
        "transformer_layers_per_block": _count(sd, re.escape(mid) + r"transformer_blocks\.(\d+)\."),
    }


def _measure_vae(sd: StateDict) -> dict[str, Any]:
    levels = _count(sd, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": _shape(sd, VAE + "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(sd, VAE + "decoder.conv_out.weight", "VAE")[0],
        "latent_channels": _shape(sd, VAE + "decoder.conv_in.weight", "VAE")[1],
        "block_out_channels": tuple(_shape(sd, VAE + f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0]
                                    for i in range(levels)),
        "layers_per_block": _count(sd, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        "mid_block_attention": VAE + "encoder.mid.attn_1.q.weight" in sd,
        "use_quant_conv": VAE + "quant_conv.weight" in sd,
    }


def _measure_text(sd: StateDict) -> dict[str, Any]:
    if _text_layout(sd) == "openai":
        p = OPENAI_CLIP + "text_model."
        vocab, width = _shape(sd, p + "embeddings.token_embedding.weight", "text encoder")
        return {"vocab_size": vocab, "width": width, "activation": "quick_gelu",
                "max_length": _shape(sd, p + "embeddings.position_embedding.weight", "text encoder")[0],
                "layers": _count(sd, re.escape(p) + r"encoder\.layers\.(\d+)\."),
                "mlp_width": _shape(sd, p + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]}
    vocab, width = _shape(sd, OPEN_CLIP + "token_embedding.weight", "text encoder")
    return {"vocab_size": vocab, "width": width, "activation": "gelu",
            "max_length": _shape(sd, OPEN_CLIP + "positional_embedding", "text encoder")[0],
            "layers": _count(sd, re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.") - 1,  # penultimate
            "mlp_width": _shape(sd, OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]}


def _text_layout(sd: StateDict) -> str:
    if any(k.startswith(OPEN_CLIP) for k in sd):
        return "openclip"
    if any(k.startswith(OPENAI_CLIP) for k in sd):
        return "openai"
    raise ModelLoadError("the checkpoint has no text encoder weights (no cond_stage_model.* keys); "
                         "it is not a complete original-layout SD 1.x/2.x file.")


def _checkpoint_config(state_dict: StateDict) -> ModelConfig:
    """A config with the checkpoint's shapes, enough to name every parameter: heads and GroupNorm
    groups, which change no parameter name or shape, are set to 1."""
    m = measure_checkpoint(state_dict)
    levels = len(m["unet"]["block_out_channels"])
    return ModelConfig(text_encoder=replace(TextEncoderConfig(), heads=1, **m["text_encoder"]),
                       vae=replace(VAEConfig(), norm_num_groups=1, **m["vae"]),
                       unet=replace(UNetConfig(), heads=(1,) * levels, norm_num_groups=1, **m["unet"]))
