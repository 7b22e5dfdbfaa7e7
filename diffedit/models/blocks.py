"""The convolutional blocks the UNet and the VAE share (parameter names: diffusers' `ResnetBlock2D`,
`Downsample2D`, `Upsample2D`).

    ResnetBlock   (B, C_in, h, w) [+ timestep embedding]  ->  (B, C_out, h, w)
    Downsample    (B, C, h, w)  ->  (B, C, h/2, w/2)
    Upsample      (B, C, h, w)  ->  (B, C, 2h, 2w)  (or to a given size)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, and a skip (1x1 conv if
    the width changes). The VAE uses it without a timestep (time_dim=None)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, time_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """A stride-2 3x3 conv. The VAE pads right/bottom only (padding=0 plus F.pad), the UNet pads 1."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (to `size`, or 2x) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
