"""research/metrics.py reads a PIL picture of any mode as the pipeline does (io.images.to_rgb):
a 16-bit picture scaled to 0-255, transparency on white. It converted them with PIL's plain
convert("RGB"), which clips 16-bit values (a 16-bit ramp read almost white: 4.8 dB against itself)
and drops alpha."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from diffedit.io.images import to_rgb
from diffedit.research import metrics as M


def _reopened(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    buffer.seek(0)
    return Image.open(buffer)


def test_a_16_bit_png_reads_as_the_pipeline_reads_it():
    ramp = _reopened(Image.fromarray(np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)))
    assert ramp.mode.startswith("I")
    assert M.as_float_image(ramp).mean() == pytest.approx(0.5, abs=0.01)
    assert M.psnr(ramp, to_rgb(ramp)) == M.PSNR_CAP
    assert M.ssim(ramp, to_rgb(ramp)) == pytest.approx(1.0)


def test_transparency_is_on_white_as_the_pipeline_reads_it():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 0                                   # fully transparent black: white to the pipeline
    picture = Image.fromarray(rgba, "RGBA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert M.psnr(picture, Image.new("RGB", (32, 32), "white")) == M.PSNR_CAP


def test_an_integer_tensor_is_refused_not_read_as_minus_1_to_1():
    """A uint8 tensor (torchvision's read_image) was clamped to [-1, 1]: two random pictures
    scored 27 dB instead of about 8."""
    import torch

    from diffedit.errors import ParameterError
    pictures = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ParameterError, match=r"float in \[-1, 1\], got torch.uint8"):
        M.psnr(pictures[0], pictures[1])
    as_model = pictures.float() / 127.5 - 1
    assert M.psnr(as_model[0], as_model[1]) == pytest.approx(M.psnr(pictures[0].permute(1, 2, 0).numpy(),
                                                                     pictures[1].permute(1, 2, 0).numpy()))
