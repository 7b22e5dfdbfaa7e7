"""What the pipeline returns: small dataclasses holding tensors and PIL images, never tuples."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from PIL import Image

from diffedit.io.images import Geometry


@dataclass
class EncodedImage:
    """Images brought to the model: pixels in [-1, 1] at the working size and their latents x0
    (posterior mean by default, times the VAE scaling factor). One VAE encode per image."""
    pixels: torch.Tensor            # (B, 3, H, W) float32 in [-1, 1], working size (multiple of 8)
    latents: torch.Tensor           # (B, C, H/f, W/f) float32, scaled: what the UNet sees
    geometry: list[Geometry]        # per image: input size and working size
    inputs: list[Image.Image]       # the input images, RGB, at their own size


@dataclass
class MaskResult:
    """DiffEdit step 1. Latent-resolution tensors, plus pixel-resolution images at the input size."""
    mask: torch.Tensor              # (B, h, w) bool: the binary mask at latent resolution
    soft: torch.Tensor              # (B, h, w) float32 in [0, 1]: the normalised map
    difference: torch.Tensor        # (B, h, w) float32: mean |eps_target - eps_source|
    per_sample: torch.Tensor | None  # (B, n, h, w) float32: |eps_target - eps_source| of each noise sample;
                                     # None unless return_per_sample=True or n <= 64 (it grows with n)
    timestep: int                   # the timestep the image was noised to
    threshold: float                # the threshold that made `mask` from `soft`
    mask_images: list[Image.Image]  # binary masks at each input's size (mode "L", 0 or 255)
    soft_images: list[Image.Image]  # soft maps at each input's size (mode "L")
    encoded: EncodedImage | None = field(default=None, repr=False)

    @property
    def area(self) -> torch.Tensor:
        """Fraction of each image inside the mask (latent resolution)."""
        return self.mask.float().mean(dim=(1, 2))


@dataclass
class Inversion:
    """DiffEdit step 2: the DDIM-encoded latents of every grid timestep up to the strength r_max.
    `latents[:, 0]` is x0, `latents[:, i]` the latent at `timesteps[i - 1]` (ascending)."""
    latents: torch.Tensor           # (B, k + 1, C, h, w) float32
    timesteps: list[int]            # the k grid timesteps reached, ascending
    num_inference_steps: int        # the grid: this many steps over the whole schedule
    strength: float                 # r_max: any edit strength <= r_max on the same grid reuses it
    prompt: list[str]               # the text the UNet saw while encoding ("" = unconditional)
    guidance_scale: float           # guidance while encoding (1 = none, the paper's choice)
    negative_prompt: list[str] | None
    encoded: EncodedImage = field(repr=False)

    @classmethod
    def unencoded(cls, encoded: EncodedImage, num_inference_steps: int, strength: float) -> "Inversion":
        """No DDIM encoding, only x0: what the "w/o encoding" and SDEdit ablations start from (their
        decode noises x0 afresh at every step)."""
        return cls(latents=encoded.latents[:, None], timesteps=[], num_inference_steps=num_inference_steps,
                   strength=strength, prompt=[""] * encoded.latents.shape[0], guidance_scale=1.0,
                   negative_prompt=None, encoded=encoded)

    def latent_at(self, t: int) -> torch.Tensor:
        """The encoded latent at grid timestep t (t < 0: x0)."""
        if t < 0:
            return self.latents[:, 0]
        return self.latents[:, self.timesteps.index(int(t)) + 1]


@dataclass
class EditResult:
    """DiffEdit step 3: the edited images and what produced them."""
    images: list[Image.Image]       # the edits, at each input's size
    pixels: torch.Tensor            # (B, 3, H, W) float32 in [-1, 1], working size
    latents: torch.Tensor           # (B, C, h, w) float32: the final latent y_0
    mask: torch.Tensor | None       # (B, 1, h, w) the latent mask used (None: no mask)
    timesteps: list[int]            # the decoding timesteps, descending
    settings: dict                  # strength, guidance, blend, ablation switches...


@dataclass
class DiffEditResult:
    """The one-shot pipeline call: the three steps' results."""
    images: list[Image.Image]
    mask: MaskResult | None         # None: no mask (ablation) or a mask given as a tensor/image
    inversion: Inversion | None     # None: the "w/o encoding" and SDEdit ablations
    edit: EditResult
    counters: dict                  # UNet samples, VAE encodes/decodes of this call


@dataclass
class Counters:
    """Work done since the last reset: what the paper's cost accounting counts."""
    unet_samples: int = 0     # rows of every UNet batch
    vae_encodes: int = 0      # images through the VAE encoder
    vae_decodes: int = 0      # images through the VAE decoder
    text_encodes: int = 0     # prompts through the text encoder (cache misses)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
