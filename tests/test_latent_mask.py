"""How a mask given to `edit` becomes the latent mask of the blend (io/pictures.py: latent_mask_of).

A pixel mask is averaged over each latent cell; without soft_mask a cell is edited when at least
half of it is marked, so the mask picture generate_mask saves reads back as the mask it shows
(it used to be any marked pixel: the picture, a bilinear upsampling, grew by a ring of cells on
every round trip), and a soft map passed with soft_mask=False is binarised, not blended as is.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffedit.errors import ParameterError
from diffedit.io.pictures import latent_mask_of, mask_to_pil

CELL = 8  # pixels per latent cell


def latents(h: int, w: int, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 4, h, w)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_blocky_pixel_mask_reads_back_exactly(h, w, seed):
    cells = torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) > 0.6
    pixels = cells.float().repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)
    assert torch.equal(latent_mask_of(pixels, latents(h, w), soft=False)[0, 0], cells.float())


@pytest.mark.parametrize("marked", [1, 31, 32, 33, 64])
def test_a_cell_is_edited_when_at_least_half_of_it_is_marked(marked):
    pixels = torch.zeros(2 * CELL, 2 * CELL)
    pixels[:CELL, :CELL] = (torch.arange(CELL * CELL) < marked).float().view(CELL, CELL)  # `marked` of 64
    pixels[CELL:, CELL:] = 1.0                          # and one whole cell, so the mask is never empty
    m = latent_mask_of(pixels, latents(2, 2), soft=False)[0, 0]
    assert m.tolist() == [[float(marked >= CELL * CELL // 2), 0.0], [0.0, 1.0]]
    soft = latent_mask_of(pixels, latents(2, 2), soft=True)[0, 0]
    assert soft[0, 0].item() == pytest.approx(marked / 64) and soft[1, 1].item() == 1.0


def test_a_soft_map_without_soft_mask_is_binarised():
    soft = torch.rand(6, 5, generator=torch.Generator().manual_seed(0))
    hard = latent_mask_of(soft, latents(6, 5), soft=False)[0, 0]
    assert torch.equal(hard, (soft >= 0.5).float())
    assert torch.equal(latent_mask_of(soft, latents(6, 5), soft=True)[0, 0], soft)


def test_a_mask_result_gives_its_mask_or_its_soft_map():
    soft = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    result = SimpleNamespace(soft=soft, mask=soft > 0.7)         # its own threshold, not 0.5
    assert torch.equal(latent_mask_of(result, latents(4, 4), soft=False)[0, 0], (soft[0] > 0.7).float())
    assert torch.equal(latent_mask_of(result, latents(4, 4), soft=True)[0, 0], soft[0])


def test_the_saved_mask_picture_reads_back_as_the_mask():
    """generate_mask's picture: the soft map upsampled bilinearly, then thresholded. Read back, it
    differs from the latent mask in a few edge cells at most (any-pixel reading: +60 % of cells)."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for cy, cx, r in [(5.0, 6.0, 2.5), (8.0, 8.0, 4.0), (10.5, 4.0, 3.0)]:
        soft = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))    # a blob, 1 at its centre
        latent = soft > 0.5
        picture = torch.from_numpy(np.asarray(mask_to_pil(soft, (128, 128), threshold=0.5)) / 255.0)
        back = latent_mask_of(picture.float(), latents(16, 16), soft=False)[0, 0].bool()
        assert (back != latent).sum() <= max(2, latent.sum() // 10), (int(latent.sum()), int(back.sum()))
        grown = F.adaptive_max_pool2d(picture.float()[None, None], (16, 16))[0, 0].bool()
        assert grown.sum() > back.sum()   # the old reading: every cell the picture touches


def test_a_mark_too_small_for_any_cell_is_refused():
    pixels = torch.zeros(32, 32)
    pixels[3:6, 3:6] = 1.0    # 9 pixels of one cell
    with pytest.raises(ParameterError, match="marks no latent cell"):
        latent_mask_of(pixels, latents(4, 4), soft=False)
    assert latent_mask_of(pixels, latents(4, 4), soft=True)[0, 0, 0, 0].item() == pytest.approx(9 / 64)


def test_an_empty_mask_stays_allowed():
    """An all-black mask tensor edits nothing (the caller's choice); only a mark lost to the cells is refused."""
    assert latent_mask_of(torch.zeros(32, 32), latents(4, 4), soft=False).sum() == 0
