"""Frozen config dataclasses, one per model, filled from a checkpoint's own `config.json`
(diffusers / transformers layout) or from a preset (single-file checkpoints, tests).

Each `from_dict` reads the keys the reference libraries write and refuses, in one sentence, the
architectures this project does not implement (SDXL, inpainting UNets, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from diffedit.errors import ModelLoadError

_FIX = "fix the config file or download the model again"

# Upper bounds, several times the largest values of real SD models (in brackets): past them a
# config is damaged, and would build modules for minutes or ask for terabytes before a single
# shape is compared with the weights.
MAX_CHANNELS = 16384      # a width (SD: 1280, text encoder 1024)
MAX_LEVELS = 8            # entries of block_out_channels (4)
MAX_REPEATS = 16          # ResNet or transformer blocks per UNet/VAE level (2; SDXL 10)
MAX_TEXT_LAYERS = 128     # text transformer layers (23)
MAX_HEADS = 256           # attention heads (20)
MAX_IO_CHANNELS = 64      # image and latent channels (4)


class _Read:
    """Typed reads of one config dict: each value is checked against its kind and range when it
    is read, or one ModelLoadError names the key, the value and what it must be."""

    def __init__(self, d: Any, what: str):
        if not isinstance(d, dict):
            raise ModelLoadError(f"the {what} config is a JSON {type(d).__name__}, not an object of settings; {_FIX}.")
        self.d, self.what = d, what

    def _bad(self, key: str, value: Any, wanted: str):
        raise ModelLoadError(f"the {self.what} config's {key} is {value!r}, not {wanted}; {_FIX}.")

    def int(self, key: str, default: int, high: int, low: int = 1, value: Any = None) -> int:
        v = self.d.get(key, default) if value is None else value
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            self._bad(key, v, f"an integer from {low} to {high:,}")
        return v

    def float(self, key: str, default: float, low: float | None = 0.0, high: float | None = None) -> float:
        v = self.d.get(key, default)
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (low is not None and v <= low) or (high is not None and v >= high)):
            self._bad(key, v, "a finite number" + (f" above {low:g}" if low is not None else "")
                      + (f" below {high:g}" if high is not None else ""))
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key, default)
        if not isinstance(v, bool):
            self._bad(key, v, "true or false")
        return v

    def str(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.d.get(key, default)
        if v not in choices:
            self._bad(key, v, f"one of {', '.join(choices)}")
        return v

    def names(self, key: str, default: list[str], count: int | None = None) -> list[str]:
        v = self.d.get(key, default)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v) or \
                (count is not None and len(v) != count):
            self._bad(key, v, "a list of block type names" + (f", one per level ({count})" if count else ""))
        return list(v)

    def ints(self, key: str, default: Any, high: int, value: Any = None) -> tuple[int, ...]:
        v = self.d.get(key, default) if value is None else value
        if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_LEVELS:
            self._bad(key, v, f"a list of 1 to {MAX_LEVELS} integers")
        return tuple(self.int(key, 0, high, value=x) for x in v)


def _structure(what: str, rules: list[tuple[bool, str]]) -> None:
    """Raise ModelLoadError with the first broken structural rule of a config (the rules a model
    of these sizes needs to be built: group norms and attention heads that divide the widths...)."""
    for ok, message in rules:
        if not ok:
            raise ModelLoadError(f"the {what} config's {message}; {_FIX}.")


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408          # BPE vocabulary incl. <|startoftext|> and <|endoftext|>
    max_length: int = 77             # token positions (BOS + 75 + EOS)
    width: int = 768                 # hidden size D of the hidden states SD conditions on
    layers: int = 12                 # transformer layers that are run (SD 2: 23 of OpenCLIP's 24)
    heads: int = 12                  # attention heads per layer
    mlp_width: int = 3072            # hidden size of the feed-forward block
    activation: str = "quick_gelu"   # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5     # epsilon of every LayerNorm

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextEncoderConfig":
        """From a transformers `CLIPTextConfig` json (text_encoder/config.json)."""
        if isinstance(d, dict) and "text_config" in d:  # a full CLIPConfig: take its text tower
            d = d["text_config"]
        r = _Read(d, "text encoder")
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ModelLoadError(f"text encoder activation {d['hidden_act']!r} is not supported (quick_gelu or gelu).")
        return cls(
            vocab_size=r.int("vocab_size", 49408, 1_000_000),
            max_length=r.int("max_position_embeddings", 77, 4096, low=2),
            width=r.int("hidden_size", 512, MAX_CHANNELS),
            layers=r.int("num_hidden_layers", 12, MAX_TEXT_LAYERS),
            heads=r.int("num_attention_heads", 8, MAX_HEADS),
            mlp_width=r.int("intermediate_size", 2048, 4 * MAX_CHANNELS),
            activation=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=r.float("layer_norm_eps", 1e-5),
        )

    def __post_init__(self):
        _structure("text encoder", [
            (self.width % self.heads == 0, f"num_attention_heads {self.heads} does not divide hidden_size {self.width}"),
            (self.layers >= 1 and self.vocab_size >= 1 and self.max_length >= 2, "sizes are not positive")])


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3                                       # image channels
    out_channels: int = 3                                      # decoded image channels
    latent_channels: int = 4                                   # channels of the latent z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per resolution level
    layers_per_block: int = 2                                  # ResNet blocks per level (decoder: +1)
    norm_num_groups: int = 32                                  # GroupNorm groups
    scaling_factor: float = 0.18215                            # z * scaling_factor is what the UNet sees
    mid_block_attention: bool = True                           # self-attention in the middle block
    use_quant_conv: bool = True                                # 1x1 convs around the latent

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """From a diffusers `AutoencoderKL` json (vae/config.json)."""
        r = _Read(d, "VAE")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != block for t in r.names(key, [block])):
                raise ModelLoadError(f"VAE {key} {d[key]} are not supported (only {block}).")
        if d.get("act_fn", "silu") != "silu":
            raise ModelLoadError(f"VAE activation {d['act_fn']!r} is not supported (only silu).")
        if d.get("shift_factor") not in (None, 0, 0.0) or d.get("latents_mean") is not None:
            raise ModelLoadError("this VAE has a latent shift or per-channel statistics (SD3/Flux style); "
                                 "only SD 1.x/2.x KL autoencoders are supported.")
        return cls(
            in_channels=r.int("in_channels", 3, MAX_IO_CHANNELS),
            out_channels=r.int("out_channels", 3, MAX_IO_CHANNELS),
            latent_channels=r.int("latent_channels", 4, MAX_IO_CHANNELS),
            block_out_channels=r.ints("block_out_channels", (64,), MAX_CHANNELS),
            layers_per_block=r.int("layers_per_block", 1, MAX_REPEATS),
            norm_num_groups=r.int("norm_num_groups", 32, MAX_CHANNELS),
            scaling_factor=r.float("scaling_factor", 0.18215),
            mid_block_attention=r.bool("mid_block_add_attention", True),
            use_quant_conv=r.bool("use_quant_conv", True) and r.bool("use_post_quant_conv", True),
        )

    def __post_init__(self):
        _structure("VAE", [(len(self.block_out_channels) >= 1 and self.layers_per_block >= 1 and self.latent_channels >= 1,
                            f"block_out_channels {self.block_out_channels} describe no network")] + [
            (w % self.norm_num_groups == 0, f"norm_num_groups {self.norm_num_groups} does not divide "
                            f"block_out_channels {w}") for w in self.block_out_channels] + [
            (math.isfinite(self.scaling_factor) and self.scaling_factor > 0,
             f"scaling_factor {self.scaling_factor!r} is not a positive number (0 would give all-zero latents)")])


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                                          # latent channels in
    out_channels: int = 4                                         # epsilon / v channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per resolution level
    layers_per_block: int = 2                                     # ResNet(+transformer) pairs per down level
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # levels with transformers (down order)
    heads: tuple[int, ...] = (8, 8, 8, 8)                         # attention heads per level
    cross_attention_dim: int = 768                                # width of the text hidden states
    use_linear_projection: bool = False                           # SD 2: linear proj_in/out, SD 1: 1x1 conv
    upcast_attention: bool = False                                # SD 2 (768-v): attention scores in fp32
    transformer_layers_per_block: int = 1                         # transformer blocks per spatial transformer
    norm_num_groups: int = 32                                     # GroupNorm groups
    norm_eps: float = 1e-5                                        # GroupNorm epsilon in ResNet blocks
    flip_sin_to_cos: bool = True                                  # timestep embedding as [cos, sin]
    freq_shift: int = 0                                           # timestep embedding frequency shift
    sample_size: int = 64                                         # native latent size (resolution / 8)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """From a diffusers `UNet2DConditionModel` json (unet/config.json)."""
        r = _Read(d, "UNet")
        widths = r.ints("block_out_channels", None, MAX_CHANNELS)
        levels = len(widths)
        looks = _unet_lookalike(d)
        if looks:
            raise ModelLoadError(f"this UNet looks like {looks}; only SD 1.x/2.x text-to-image UNets are supported.")
        down = r.names("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"], levels)
        up = r.names("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1), levels)
        known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
        if set(down) - known_down or set(up) - known_up:
            raise ModelLoadError(f"UNet block types {down} / {up} are not supported.")
        cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if tuple(t == "CrossAttnUpBlock2D" for t in reversed(up)) != cross:
            raise ModelLoadError("UNet up blocks do not mirror its down blocks; this architecture is not supported.")
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ModelLoadError(f"UNet mid block {d['mid_block_type']!r} is not supported.")
        # diffusers' `attention_head_dim` holds the number of heads for SD 1.x/2.x (a historical
        # misnomer); `num_attention_heads` overrides it when present.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = r.ints("attention_head_dim", None, MAX_HEADS, heads) if isinstance(heads, (list, tuple)) \
            else (r.int("attention_head_dim", None, MAX_HEADS, value=heads),) * levels
        tlpb = d.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)):
            raise ModelLoadError("per-level transformer_layers_per_block (SDXL style) is not supported.")
        return cls(
            in_channels=r.int("in_channels", 4, MAX_IO_CHANNELS),
            out_channels=r.int("out_channels", 4, MAX_IO_CHANNELS),
            block_out_channels=widths,
            layers_per_block=r.int("layers_per_block", 2, MAX_REPEATS),
            cross_attention=cross,
            heads=heads,
            cross_attention_dim=r.int("cross_attention_dim", 1280, MAX_CHANNELS),
            use_linear_projection=r.bool("use_linear_projection", False),
            upcast_attention=r.bool("upcast_attention", False),
            transformer_layers_per_block=r.int("transformer_layers_per_block", 1, MAX_REPEATS),
            norm_num_groups=r.int("norm_num_groups", 32, MAX_CHANNELS),
            norm_eps=r.float("norm_eps", 1e-5),
            flip_sin_to_cos=r.bool("flip_sin_to_cos", True),
            freq_shift=r.int("freq_shift", 0, 100, low=0),
            sample_size=r.int("sample_size", 64, 1024),
        )

    def __post_init__(self):
        levels = len(self.block_out_channels)
        _structure("UNet", [
            (levels >= 1 and self.layers_per_block >= 1 and min(self.block_out_channels) >= 1,
             f"block_out_channels {self.block_out_channels} and layers_per_block {self.layers_per_block} "
             "describe no network"),
            (len(self.heads) == levels and len(self.cross_attention) == levels,
             f"attention_head_dim gives {len(self.heads)} head counts for {levels} block_out_channels levels"),
            *[(w % self.norm_num_groups == 0, f"norm_num_groups {self.norm_num_groups} does not divide "
               f"block_out_channels {w}") for w in self.block_out_channels],
            *[(w % h == 0, f"{h} attention heads do not divide the width {w} of level {i}")
              for i, (w, h) in enumerate(zip(self.block_out_channels, self.heads))]])


def _unet_lookalike(d: dict[str, Any]) -> str | None:
    """Name the architecture of an unsupported UNet config, or None if it is SD 1.x/2.x-like."""
    if d.get("addition_embed_type") == "text_time" or d.get("cross_attention_dim") == 2048:
        return "SDXL (added text-time embeddings)"
    if d.get("in_channels", 4) == 9:
        return "an inpainting model (9 input channels)"
    if d.get("in_channels", 4) == 8:
        return "an instruct-pix2pix model (8 input channels)"
    if d.get("in_channels", 4) == 5:
        return "a depth-to-image model (5 input channels)"
    if d.get("class_embed_type") is not None or d.get("num_class_embeds") is not None:
        return "an upscaler or class-conditioned UNet"
    if d.get("time_cond_proj_dim") is not None:
        return "a latent consistency (LCM) UNet"
    unsupported = {"only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False,
                   "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                   "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3, "encoder_hid_dim": None,
                   # no weights of their own, but they change what the network computes
                   "downsample_padding": 1, "mid_block_scale_factor": 1, "time_embedding_act_fn": None,
                   "timestep_post_act": None}
    for key, default in unsupported.items():
        if d.get(key, default) not in (default, [default] * len(d.get("block_out_channels", []))):
            return f"a UNet with {key}={d[key]!r}"
    return None


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000        # T, length of the training noise schedule
    beta_start: float = 0.0001             # beta_1 of the schedule
    beta_end: float = 0.02                 # beta_T of the schedule
    beta_schedule: str = "linear"          # "linear", "scaled_linear" (SD) or "squaredcos_cap_v2"
    trained_betas: tuple[float, ...] | None = None  # explicit betas, overrides the schedule
    prediction_type: str = "epsilon"       # what the UNet predicts: "epsilon" or "v_prediction"
    timestep_spacing: str = "leading"      # "leading" (+steps_offset), "trailing" or "linspace"
    steps_offset: int = 0                  # added to "leading" timesteps (SD: 1)
    set_alpha_to_one: bool = True          # alpha_bar used past the last step (forward: t=-1)
    clip_sample: bool = True               # clip pred_x0 to [-clip_sample_range, +clip_sample_range]
    clip_sample_range: float = 1.0         # clipping bound of pred_x0
    rescale_betas_zero_snr: bool = False   # rescale the schedule to zero terminal SNR

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        """From any diffusers scheduler json; absent keys take DDIMScheduler's defaults, as
        `DDIMScheduler.from_config` does."""
        r = _Read(d, "scheduler")
        if d.get("thresholding", False):
            raise ModelLoadError("dynamic thresholding schedulers are not supported.")
        prediction = d.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction).")
        betas = d.get("trained_betas")
        if betas is not None and (not isinstance(betas, (list, tuple)) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)):
            raise ModelLoadError(f"the scheduler config's trained_betas is not a list of numbers in (0, 1); {_FIX}.")
        return cls(
            num_train_timesteps=r.int("num_train_timesteps", 1000, 100_000),
            beta_start=r.float("beta_start", 0.0001, high=1),
            beta_end=r.float("beta_end", 0.02, high=1),
            beta_schedule=r.str("beta_schedule", "linear", ("linear", "scaled_linear", "squaredcos_cap_v2")),
            trained_betas=tuple(betas) if betas is not None else None,
            prediction_type=prediction,
            timestep_spacing=r.str("timestep_spacing", "leading", ("leading", "trailing", "linspace")),
            steps_offset=r.int("steps_offset", 0, 100_000, low=0),
            set_alpha_to_one=r.bool("set_alpha_to_one", True),
            clip_sample=r.bool("clip_sample", True),
            clip_sample_range=r.float("clip_sample_range", 1.0),
            rescale_betas_zero_snr=r.bool("rescale_betas_zero_snr", False),
        )

    def __post_init__(self):
        _structure("scheduler", [
            (self.trained_betas is None or len(self.trained_betas) == self.num_train_timesteps,
             f"trained_betas has {len(self.trained_betas or ())} values for num_train_timesteps "
             f"{self.num_train_timesteps}")])


@dataclass(frozen=True)
class TokenizerConfig:
    max_length: int = 77                 # ids per prompt, BOS and EOS included
    pad_token: str = "<|endoftext|>"     # SD 1.x pads with <|endoftext|>, SD 2.x with "!"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Stable Diffusion model without its weights."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    resolution: int = 512                # native image size in pixels


# SD's own noise schedule, shared by every 1.x/2.x checkpoint.
_SD_SCHEDULER = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                steps_offset=1, set_alpha_to_one=False, clip_sample=False)

_SD2_TEXT = TextEncoderConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")
_SD2_UNET = UNetConfig(heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

PRESETS: dict[str, ModelConfig] = {
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower, 8 heads everywhere, 1x1-conv projections.
    "sd1": ModelConfig(scheduler=_SD_SCHEDULER),
    # SD 2.x-base (512 px, epsilon): OpenCLIP ViT-H/14 penultimate layer, head dim 64.
    "sd2-base": ModelConfig(text_encoder=_SD2_TEXT, unet=_SD2_UNET, scheduler=_SD_SCHEDULER,
                            tokenizer=TokenizerConfig(pad_token="!")),
    # SD 2.x (768 px, v-prediction, attention upcast).
    "sd2-v": ModelConfig(text_encoder=_SD2_TEXT, unet=replace(_SD2_UNET, upcast_attention=True, sample_size=96),
                         scheduler=replace(_SD_SCHEDULER, prediction_type="v_prediction"),
                         tokenizer=TokenizerConfig(pad_token="!"), resolution=768),
    # A few-hundred-thousand-parameter model of the same classes, for fast tests.
    "tiny": ModelConfig(
        text_encoder=TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64),
        vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
        unet=UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, False),
                        heads=(2, 2), cross_attention_dim=32, norm_num_groups=8, sample_size=16),
        scheduler=_SD_SCHEDULER, resolution=32),
}
