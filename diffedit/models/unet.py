"""The text-conditioned UNet of Stable Diffusion 1.x / 2.x (Rombach et al. 2022, the LDM UNet).

    latents (B, 4, h, w), timestep, text hidden states (B, 77, D)  ->  eps or v (B, 4, h, w)

conv_in -> down levels (ResNet blocks, spatial transformers, stride-2 convs) -> middle
(ResNet, transformer, ResNet) -> up levels (ResNet blocks on [x, skip], transformers, 2x
nearest upsampling + conv) -> GroupNorm, SiLU, conv_out. Every ResNet block receives the
timestep embedding; every transformer block attends to itself and then to the text.

Parameter names are those of diffusers' `UNet2DConditionModel`, the layout SD checkpoints ship
in, so a diffusers folder loads without renaming (original single files: see single_file.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from diffedit.kernels import cpu_geglu
from diffedit.models import packed_linear
from diffedit.models.attention import attention
from diffedit.models.blocks import Downsample, ResnetBlock, Upsample
from diffedit.models.config import UNetConfig


class Attention(nn.Module):
    """Multi-head attention of the transformer blocks: self-attention (context=None) or
    cross-attention to the text hidden states.

    Inside `text_projections_reused(unet)` a cross-attention layer keeps the keys and values of the
    last text it saw and reuses them while the text is equal by value (see there)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.reuse_text = False               # set by text_projections_reused
        self.text_cache: tuple | None = None  # (weights and their versions, text, k, v) of the last text seen

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
        else:
            k, v = self.text_keys_values(context)
        q = self.to_q(x)
        if q.shape[0] != k.shape[0]:  # one x_t for several texts (UNet.forward): its rows part here
            q = q.expand(k.shape[0], -1, -1)
        return self.to_out[0](attention(q, k, v, self.heads, upcast=self.upcast))

    def text_keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = (self.to_k.weight, self.to_v.weight)
        if not self.reuse_text or (torch.is_grad_enabled() and any(t.requires_grad for t in (context, *weights))):
            self.text_cache = None
            return self.to_k(context), self.to_v(context)
        state = [(w, _version(w)) for w in weights]  # which weight tensors, at which version
        cached = self.text_cache
        if cached is not None and _same_weights(cached[0], state) and _same_tensor_values(cached[1], context):
            return cached[2], cached[3]
        k, v = self.to_k(context), self.to_v(context)
        self.text_cache = (state, context.clone(), k, v)
        return k, v


@contextlib.contextmanager
def text_projections_reused(model: nn.Module):
    """Within the block, every cross-attention layer of `model` projects a text to keys and values
    once and reuses them at the next calls while the text is equal by value and the two weights are
    the same tensors at the same version (nothing is kept while autograd records). A sampling loop
    calls the UNet with the same text at every step: the pipeline runs each of its loops in this
    block. The numbers are those of fresh projections, bit for bit; a 256-px SD 1.5 UNet call skips
    its 32 text projections (fp32, 2-core AVX2 EPYC: 1.9 % of a call at batch 2, 3.8 % at batch 1).
    On exit the layers forget (blocks nest); outside, every call projects afresh."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    before = [m.reuse_text for m in layers]
    for m in layers:
        m.reuse_text = True
    try:
        yield model
    finally:
        for m, reuse in zip(layers, before):
            m.reuse_text = reuse
            if not reuse:
                m.text_cache = None


def _version(t: torch.Tensor) -> int | None:
    """The in-place-update counter of a tensor (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _same_weights(kept: list, now: list) -> bool:
    """The same tensors at the same versions (a weight without a version counter never counts as the same)."""
    return all(w is kept_w and version is not None and version == kept_version
               for (w, version), (kept_w, kept_version) in zip(now, kept))


def _same_tensor_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class GEGLU(nn.Module):
    """The gated-GELU input projection of the feed-forward block (Shazeer 2020). Where the
    projection runs packed for inference (fp32 on diffedit's linear kernel, bf16 on oneDNN), the
    gating runs in one pass on the C kernel of kernels/cpu_geglu.py: the same values up to rounding."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if packed_linear.on_kernel(self.proj, y):
            return cpu_geglu.geglu(y)
        hidden, gate = y.chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a dropout in the reference layout: no parameters, kept only so the indices match.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, projection in, transformer blocks over the h*w tokens, projection out, residual.
    SD 1.x projects with 1x1 convs, SD 2.x with linear layers (the same map, another layout)."""

    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        self.linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        project = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, config.cross_attention_dim, config.upcast_attention)
            for _ in range(config.transformer_layers_per_block))
        self.proj_out = project(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        residual, x = x, self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


def one_x_t(latents: torch.Tensor, t: torch.Tensor) -> bool:
    """True when all rows (more than one) have the same latents and timestep, and no gradient with
    respect to the latents is wanted (then each row needs its own)."""
    if latents.shape[0] < 2 or (torch.is_grad_enabled() and latents.requires_grad):
        return False
    return bool((t == t[0]).all()) and all(torch.equal(latents[0], row) for row in latents[1:])


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017; DDPM): (B,) -> (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DownBlock(nn.Module):
    """One resolution level of the encoder half: (ResNet [+ transformer]) x layers, then stride 2."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, cross: bool, downsample: bool, config: UNetConfig):
        super().__init__()
        n, groups, eps, tdim = config.layers_per_block, config.norm_num_groups, config.norm_eps, config.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps, tdim)
                                     for i in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in range(n)) if cross else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=1)]) if downsample else None

    def forward(self, x, t_emb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, t_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One resolution level of the decoder half: (ResNet on [x, skip] [+ transformer]) x (layers+1),
    then 2x upsampling."""

    def __init__(self, prev_ch: int, out_ch: int, skip_chs: list[int], heads: int, cross: bool, upsample: bool,
                 config: UNetConfig):
        super().__init__()
        groups, eps, tdim = config.norm_num_groups, config.norm_eps, config.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock((prev_ch if i == 0 else out_ch) + skip, out_ch, groups, eps, tdim)
                                     for i, skip in enumerate(skip_chs))
        self.attentions = (nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in skip_chs)
                           if cross else None)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, t_emb, context, skips: list[torch.Tensor], upsample_size) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if skip.shape[0] != x.shape[0]:  # made before the rows parted (UNet.forward): one per row, same layout
                skip = torch.cat([skip] * x.shape[0])
            x = resnet(torch.cat([x, skip], dim=1), t_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        groups, eps, tdim = config.norm_num_groups, config.norm_eps, config.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, eps, tdim) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, config)])

    def forward(self, x, t_emb, context) -> torch.Tensor:
        x = self.resnets[0](x, t_emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, t_emb)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        widths, levels = c.block_out_channels, len(c.block_out_channels)
        assert len(c.heads) == levels and len(c.cross_attention) == levels, "one heads/cross entry per level"
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], c.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [widths[0]]  # channels of every skip, in the order they are produced
        for i, width in enumerate(widths):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(widths[max(i - 1, 0)], width, c.heads[i], c.cross_attention[i],
                                              not last, c))
            skip_chs += [width] * (c.layers_per_block + (0 if last else 1))
        self.mid_block = MidBlock(widths[-1], c.heads[-1], c)

        self.up_blocks = nn.ModuleList()
        prev = widths[-1]
        for i, level in enumerate(reversed(range(levels))):
            used = [skip_chs.pop() for _ in range(c.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(prev, widths[level], used, c.heads[level], c.cross_attention[level],
                                          i < levels - 1, c))
            prev = widths[level]
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w), timestep (scalar or (B,)), text hidden states (B, L, D) -> (B, C, h, w)."""
        c = self.config
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        if one_x_t(latents, t):
            # Guidance (unconditional and text rows) and the mask's (source, target) pairs give every row
            # the same x_t and t: everything before the first cross-attention is the same for all of them,
            # so it runs once, on one row, which the first cross-attention meets with every text (Attention;
            # the middle block always has one).
            latents, t = latents[:1], t[:1]
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        t_emb = self.time_embedding(t_emb.to(latents.dtype))
        context = encoder_hidden_states.to(latents.dtype)

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, t_emb, context)
            skips += block_skips
        x = self.mid_block(x, t_emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            # upsample to the size of the next level's skips, so odd latent sizes come back exactly
            target = skips[-n - 1].shape[-2:] if len(skips) > n else None
            x = block(x, t_emb, context, skips[-n:], target)
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))
