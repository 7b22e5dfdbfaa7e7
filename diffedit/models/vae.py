"""The KL autoencoder of Stable Diffusion (Rombach et al. 2022, sec. 3.1).

    image x in [-1, 1] (B, 3, H, W)  --encode-->  posterior N(mean, exp(logvar)) over z (B, 4, H/8, W/8)
    z                                --decode-->  image in [-1, 1]

Neither direction applies the scaling factor: the UNet works on z * config.scaling_factor, and
the pipeline multiplies and divides where it hands latents over. Parameter names are those of
diffusers' `AutoencoderKL`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from diffedit.models import host_memory
from diffedit.errors import ParameterError
from diffedit.models.attention import attention
from diffedit.models.blocks import Downsample, ResnetBlock, Upsample
from diffedit.models.config import VAEConfig

EPS = 1e-6  # GroupNorm epsilon everywhere in the autoencoder


class DiagonalGaussian:
    """The posterior q(z|x): a Gaussian with diagonal covariance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in the original LDM code
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class SelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions, with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1)
        return x + rearrange(self.to_out[0](out), "b (h w) c -> b c h w", h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, with_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)]) if with_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Level(nn.Module):
    """One resolution level of the encoder or the decoder: ResNet blocks, then the resampler, a
    stride-2 conv going down (`downsamplers`) or 2x upsampling going up (`upsamplers`); the last
    level has none."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        assert resample in ("down", "up", None), f"resample must be 'down', 'up' or None, not {resample!r}"
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, EPS)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resamplers in (self.downsamplers, self.upsamplers):
            if resamplers is not None:
                x = resamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, c.layers_per_block, groups, "down" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], groups, c.mid_block_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, c.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            Level(widths[max(i - 1, 0)], w, c.layers_per_block + 1, groups, "up" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images in [-1, 1] (B, 3, H, W) -> the posterior over z (B, 4, H/8, W/8), unscaled."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (B, 4, h, w) -> images in (about) [-1, 1] (B, 3, 8h, 8w)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ---------------------------------------------------------------------- bounded memory
#
# Slicing runs the autoencoder one image at a time: the same numbers, peak activation memory of
# one image instead of B. Tiling cuts one large image into overlapping tiles, runs each alone
# and cross-fades the overlaps with linear ramps (weights normalised to sum to one). It is an
# approximation: GroupNorm statistics and the middle block's self-attention see one tile instead
# of the whole image, and a tile's border lacks the context beyond it (the ramps give those
# border cells the least weight). The pipeline tiles only images larger than TILE_ABOVE pixels.

TILE_ABOVE = 1024     # pixels: larger sides are tiled, smaller ones run whole
DECODE_TILE = 64      # latent cells per decoder tile side (512 px in SD), of which...
DECODE_OVERLAP = 16   # ...this many are shared with the neighbouring tile


def encode_sliced(vae: AutoencoderKL, images: torch.Tensor, tile_above: int | None = TILE_ABOVE,
                  tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP) -> DiagonalGaussian:
    """vae.encode of each image alone, tiled when a side exceeds `tile_above` pixels (None: never).
    `tile` and `overlap` count latent cells, as for decoding."""
    f = vae.config.downsample_factor
    moments = []
    for image in images.split(1):
        if tile_above is not None and max(image.shape[-2:]) > tile_above:
            moments.append(tiled(lambda part: _moments(vae, part), image, tile * f, overlap * f, scale=1 / f))
        else:
            moments.append(_moments(vae, image))
    return DiagonalGaussian(torch.cat(moments))


def decode_sliced(vae: AutoencoderKL, z: torch.Tensor, tile_above: int | None = TILE_ABOVE,
                  tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """vae.decode of each latent alone, tiled when the image side would exceed `tile_above` pixels.
    The decoder's full-size activations are the largest of an edit: the free heap the UNet's calls
    left behind is handed back first, so that the two do not add up (host_memory.py)."""
    host_memory.release_free_heap()
    f = vae.config.downsample_factor
    out = []
    for latent in z.split(1):
        if tile_above is not None and max(latent.shape[-2:]) * f > tile_above:
            out.append(tiled(vae.decode, latent, tile, overlap, scale=f))
        else:
            out.append(vae.decode(latent))
    return torch.cat(out)


def _moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(images)  # through `encode`, so that wrappers of it still see every call
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of side `tile` covering [0, size), neighbours sharing at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def ramp(length: int, overlap: int, device=None) -> torch.Tensor:
    """Blending weights along one tile side: rising over the first `overlap` cells, falling over
    the last, 1 in between; never 0, so every cell of the image has some weight."""
    i = torch.arange(length, dtype=torch.float32, device=device)
    return (torch.minimum(i + 1, length - i) / (overlap + 1)).clamp(max=1.0)


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """fn over overlapping tiles of x (B, C, H, W), cross-faded: fn maps a (B, C, h, w) tile to
    (B, C', h * scale, w * scale) (scale 8 for the decoder, 1/8 for the encoder). `tile` and
    `overlap` are in x's cells; tile * scale and overlap * scale must be whole numbers."""
    if not 0 <= overlap < tile:
        raise ParameterError(f"tile overlap must lie in [0, tile) = [0, {tile}), got {overlap}; use a smaller overlap.")
    H, W = x.shape[-2:]
    out, weight = None, None
    for top in tile_starts(H, tile, overlap):
        for left in tile_starts(W, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile]).float()
            if out is None:
                out = torch.zeros(*y.shape[:2], round(H * scale), round(W * scale), device=y.device)
                weight = torch.zeros(round(H * scale), round(W * scale), device=y.device)
            h, w = y.shape[-2:]
            o = round(overlap * scale)
            w2d = ramp(h, o, y.device)[:, None] * ramp(w, o, y.device)[None, :]
            t, l = round(top * scale), round(left * scale)
            out[..., t:t + h, l:l + w] += y * w2d
            weight[t:t + h, l:l + w] += w2d
    return (out / weight).to(x.dtype)
