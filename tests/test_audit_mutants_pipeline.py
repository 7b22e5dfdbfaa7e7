"""Gaps a mutation audit of diffedit/pipeline.py found in the suite: each test here fails on a
small wrong change of how the pipeline hands its settings to the method (named in the docstring)
that every other fast test let pass. On the tiny random reference model, a few UNet calls each."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from diffedit import method
from diffedit.pipeline import DiffEditPipeline
from test_method import image

SOURCE, TARGET = "a photo of a cat on a sofa", "a photo of a dog on a sofa"
TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_model_folder) -> DiffEditPipeline:
    return DiffEditPipeline.from_pretrained(tiny_model_folder)


def noise_for(encoded, n: int, seed: int) -> torch.Tensor:
    return torch.randn((1, n, *encoded.latents.shape[1:]), generator=torch.Generator().manual_seed(seed))


def test_mask_noise_strength_picks_its_timestep_on_the_grid(pipe):
    """Strength 0.5 on a 10-step grid keeps the last 5 steps: the mask's samples are noised to the
    first of them, grid[5] (mutant: the grid timestep below it)."""
    encoded = pipe.encode_image(image(0))
    noise = noise_for(encoded, 2, 1)
    result = pipe.generate_mask(encoded, SOURCE, TARGET, noise=noise, noise_strength=0.5, num_inference_steps=10)
    t = int(pipe.scheduler.timesteps(10)[5])
    assert result.timestep == t
    by_hand, _ = method.mask_difference(pipe.predict_noise, pipe.scheduler, encoded.latents,
                                        method.NoiseStream(noise.shape, noise=noise), 2, t,
                                        pipe.encode_prompt([SOURCE]), pipe.encode_prompt([TARGET]))
    assert (result.difference - by_hand).abs().max() < TOL


def test_guided_mask_guides_each_prompt_with_its_own_negative(pipe):
    """With two different negative prompts, source and target are each guided with their own
    (mutants: the prompts swapped, or the negatives swapped)."""
    encoded = pipe.encode_image(image(1))
    noise = noise_for(encoded, 2, 2)
    result = pipe.generate_mask(encoded, SOURCE, TARGET, noise=noise, guidance_scale=4.0,
                                source_negative_prompt="blurry", target_negative_prompt="a dark photo")
    by_hand, _ = method.mask_difference(pipe.predict_noise, pipe.scheduler, encoded.latents,
                                        method.NoiseStream(noise.shape, noise=noise), 2, result.timestep,
                                        pipe.encode_prompt([SOURCE]), pipe.encode_prompt([TARGET]),
                                        pipe.encode_prompt(["blurry"]), pipe.encode_prompt(["a dark photo"]), 4.0)
    assert (result.difference - by_hand).abs().max() < TOL


def test_the_mask_picture_is_drawn_at_the_masks_threshold(pipe):
    """The saved mask picture marks about the share of the image the mask marks, at any threshold
    (mutant: the picture always thresholded at 0.5). Two pixels a cell here, so the bilinear
    edges move the share by up to 0.1."""
    encoded = pipe.encode_image(image(2))
    for threshold in (0.25, 0.75):
        result = pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, threshold=threshold,
                                    generator=torch.Generator().manual_seed(0))
        picture = np.asarray(result.mask_images[0], dtype=np.float32) / 255.0
        assert abs(float(picture.mean()) - float(result.mask.float().mean())) < 0.15


def test_guided_inversion_uses_the_prompt_and_its_negative(pipe):
    """invert(prompt, guidance_scale, negative_prompt) is DDIM inversion under guided eps
    (mutant: guidance and negative prompt silently dropped)."""
    encoded = pipe.encode_image(image(3))
    inversion = pipe.invert(encoded, TARGET, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                            negative_prompt="blurry")
    pairs = pipe.scheduler.inverse_pairs(4, 0.5)
    by_hand = method.ddim_invert(pipe.predict_noise, pipe.scheduler, encoded.latents, pairs,
                                 pipe.encode_prompt([TARGET]), pipe.encode_prompt(["blurry"]), 3.0)
    assert (inversion.latents - torch.stack(by_hand, dim=1)).abs().max() < TOL


def test_a_larger_strength_re_inverts_with_the_inversions_own_guidance(pipe):
    """edit() re-runs an inversion for a larger strength with the prompt, guidance and negative
    prompt it was made with (mutant: the re-inversion unguided)."""
    encoded = pipe.encode_image(image(4))
    settings = dict(num_inference_steps=4, guidance_scale=3.0, negative_prompt="blurry")
    low = pipe.invert(encoded, TARGET, strength=0.5, **settings)
    high = pipe.invert(encoded, TARGET, strength=1.0, **settings)
    mask = torch.ones(8, 8)
    assert torch.equal(pipe.edit(low, mask, TARGET, strength=1.0).latents, pipe.edit(high, mask, TARGET).latents)


def test_one_shot_call_is_the_three_steps_with_its_settings(pipe):
    """pipe(...) = generate_mask + invert + edit with the same non-default settings (mutants:
    mask_threshold, mask_noise_strength or strength not passed on)."""
    img, steps = image(5), 10
    mask_settings = dict(num_samples=2, noise_strength=0.7, threshold=0.3, num_inference_steps=steps)
    one = pipe(img, SOURCE, TARGET, strength=0.6, num_inference_steps=steps, num_mask_samples=2,
               mask_noise_strength=0.7, mask_threshold=0.3, generator=torch.Generator().manual_seed(9))
    encoded = pipe.encode_image(img)
    mask = pipe.generate_mask(encoded, SOURCE, TARGET, generator=torch.Generator().manual_seed(9), **mask_settings)
    assert one.mask.timestep == mask.timestep and torch.equal(one.mask.mask, mask.mask)
    edit = pipe.edit(pipe.invert(encoded, strength=0.6, num_inference_steps=steps), mask, TARGET)
    assert one.inversion.strength == 0.6 and one.edit.timesteps == edit.timesteps
    assert torch.equal(one.edit.latents, edit.latents)
