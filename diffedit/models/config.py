"""Frozen config dataclasses, one per model, filled from a checkpoint's own `config.json`
(diffusers / transformers layout) or from a preset (single-file checkpoints, tests).

Each `from_dict` reads the keys the reference libraries write and refuses, in one sentence, the
architectures this project does not implement (SDXL, inpainting UNets, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from diffedit.errors import ModelLoadError


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
        if "text_config" in d:  # a full CLIPConfig: take its text tower
            d = d["text_config"]
        activation = d.get("hidden_act", "quick_gelu")
        if activation not in ("quick_gelu", "gelu"):
            raise ModelLoadError(f"text encoder activation {activation!r} is not supported (quick_gelu or gelu).")
        return cls(
            vocab_size=d.get("vocab_size", 49408),
            max_length=d.get("max_position_embeddings", 77),
            width=d.get("hidden_size", 512),
            layers=d.get("num_hidden_layers", 12),
            heads=d.get("num_attention_heads", 8),
            mlp_width=d.get("intermediate_size", 2048),
            activation=activation,
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        )


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
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != block for t in d.get(key, [block])):
                raise ModelLoadError(f"VAE {key} {d[key]} are not supported (only {block}).")
        if d.get("shift_factor") not in (None, 0, 0.0) or d.get("latents_mean") is not None:
            raise ModelLoadError("this VAE has a latent shift or per-channel statistics (SD3/Flux style); "
                                 "only SD 1.x/2.x KL autoencoders are supported.")
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", (64,))),
            layers_per_block=d.get("layers_per_block", 1),
            norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
            mid_block_attention=d.get("mid_block_add_attention", True),
            use_quant_conv=d.get("use_quant_conv", True) and d.get("use_post_quant_conv", True),
        )


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
        looks = _unet_lookalike(d)
        if looks:
            raise ModelLoadError(f"this UNet looks like {looks}; only SD 1.x/2.x text-to-image UNets are supported.")
        levels = len(d["block_out_channels"])
        down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]))
        up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)))
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
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
        tlpb = d.get("transformer_layers_per_block", 1)
        if not isinstance(tlpb, int):
            raise ModelLoadError("per-level transformer_layers_per_block (SDXL style) is not supported.")
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d.get("layers_per_block", 2),
            cross_attention=cross,
            heads=heads,
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=d.get("upcast_attention", False),
            transformer_layers_per_block=tlpb,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            sample_size=d.get("sample_size", 64),
        )


def _unet_lookalike(d: dict[str, Any]) -> str | None:
    """Name the architecture of an unsupported UNet config, or None if it is SD 1.x/2.x-like."""
    if d.get("addition_embed_type") == "text_time" or d.get("cross_attention_dim") == 2048:
        return "SDXL (added text-time embeddings)"
    if d.get("in_channels", 4) == 9:
        return "an inpainting model (9 input channels)"
    if d.get("in_channels", 4) == 8:
        return "an instruct-pix2pix or depth model (8 input channels)"
    if d.get("class_embed_type") is not None or d.get("num_class_embeds") is not None:
        return "an upscaler or class-conditioned UNet"
    if d.get("time_cond_proj_dim") is not None:
        return "a latent consistency (LCM) UNet"
    unsupported = {"only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False,
                   "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                   "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3, "encoder_hid_dim": None}
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
        if d.get("thresholding", False):
            raise ModelLoadError("dynamic thresholding schedulers are not supported.")
        prediction = d.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction).")
        betas = d.get("trained_betas")
        return cls(
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            beta_start=d.get("beta_start", 0.0001),
            beta_end=d.get("beta_end", 0.02),
            beta_schedule=d.get("beta_schedule", "linear"),
            trained_betas=tuple(betas) if betas is not None else None,
            prediction_type=prediction,
            timestep_spacing=d.get("timestep_spacing", "leading"),
            steps_offset=d.get("steps_offset", 0),
            set_alpha_to_one=d.get("set_alpha_to_one", True),
            clip_sample=d.get("clip_sample", True),
            clip_sample_range=d.get("clip_sample_range", 1.0),
            rescale_betas_zero_snr=d.get("rescale_betas_zero_snr", False),
        )


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
