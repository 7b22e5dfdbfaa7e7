"""What the three notebook sources share: cell constructors and the model set-up cell."""

from __future__ import annotations

import textwrap

from nbformat.v4 import new_code_cell, new_markdown_cell


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


MODEL_SETUP = """
    MODEL = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL") or None   # None: the embedded model weights/shapes-64
    pipe = DiffEditPipeline.from_pretrained(MODEL)
    params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    print(f"{pipe.model.source}: {params / 1e6:.1f} M parameters, {pipe.config.resolution} px images, "
          f"latents {pipe.config.vae.latent_channels} x {pipe.config.resolution // pipe.config.vae.downsample_factor}"
          f" x {pipe.config.resolution // pipe.config.vae.downsample_factor}")
"""
