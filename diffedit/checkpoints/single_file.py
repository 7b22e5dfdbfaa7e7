"""Single-file checkpoints in the ORIGINAL layout (CompVis / Stability `.ckpt` / `.safetensors`,
as most community fine-tunes ship) -> the parameter names of this project, and back. The file's
prefixes, and how its architecture and config are read, are in architecture.py.

The rules are written in ONE direction, ours -> original, as small pure functions of one key
(the UNet's also of its layout: ResNet blocks per level and which levels attend). Applied to
every parameter name our models have, they give a table {our name: Origin}; loading reads it
backwards (`split_original_checkpoint`), export forwards (`to_original_checkpoint`).

A key of the file that is no weight of ours is IGNORED (EMA copy, training noise schedule, an
index buffer), DROPPED (the parts of OpenCLIP that SD 2 never runs) or reported as unknown:
nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from diffedit.checkpoints.architecture import (
    OPEN_CLIP,
    OPENAI_CLIP,
    UNET,
    VAE,
    StateDict,
    config_from_shapes,
    count_indices,
    detect_text_layout,
)
from diffedit.checkpoints.model_io import text_encoder_key_to_transformers
from diffedit.errors import ModelLoadError
from diffedit.models.clip import TextEncoder
from diffedit.models.config import ModelConfig
from diffedit.models.unet import UNet
from diffedit.models.vae import AutoencoderKL

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
        levels = count_indices(keys, r"down_blocks\.(\d+)\.")
        layers = count_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
        cross = tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(levels))
        table["unet"] = {k: Origin(UNET + original_unet_key(k, layers, cross)) for k in keys}
    if "vae" in names:
        keys = list(names["vae"])
        levels = count_indices(keys, r"encoder\.down_blocks\.(\d+)\.")
        table["vae"] = {k: Origin(VAE + original_vae_key(k, levels), conv1x1=bool(_VAE_LINEAR.fullmatch(k)))
                        for k in keys}
    if "text_encoder" in names:
        if text_layout == "openai":
            table["text_encoder"] = {k: Origin(OPENAI_CLIP + text_encoder_key_to_transformers(k))
                                     for k in names["text_encoder"]}
        else:
            origins = {k: original_open_clip_key(k) for k in names["text_encoder"]}
            table["text_encoder"] = {k: replace(o, key=OPEN_CLIP + o.key) for k, o in origins.items()}
    return table


def split_original_checkpoint(state_dict: StateDict, config: ModelConfig | None = None) -> dict[str, StateDict]:
    """An original-layout state dict -> {"unet", "vae", "text_encoder": state dict in our names}.

    `config` (e.g. from `infer_configs`) gives our parameter names; without it they come from
    the checkpoint's own shapes. Tensors are the file's own, not copies; only fused OpenCLIP
    q/k/v (split) and the VAE's 1x1-conv attention (reshaped) become views of them. Raises
    ModelLoadError if the file holds keys that are neither ours, IGNORED nor DROPPED. Missing
    weights are left to the strict load, which names them."""
    text_layout = detect_text_layout(state_dict)
    if config is None:
        config = config_from_shapes(state_dict)
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
