"""Gaps a mutation audit of diffedit/method.py found in the suite: each test here fails on a small
wrong change of the method (named in its docstring) that every other fast test let pass.

The stand-in noise predictor makes eps depend on x, t and the text, so the text a row was
predicted under can be read from the result; everything runs in milliseconds.
"""

from __future__ import annotations


import torch

from diffedit import method
from diffedit.mask_maps import noise_difference, per_sample_difference
from diffedit.models.config import PRESETS
from diffedit.sampler import DDIM, classifier_free_guidance
from test_method import FakeUNet, latents, states

SD = PRESETS["sd1"].scheduler
TOL = 1e-5  # float32 rounding of a few elementwise operations on unit-scale latents


def test_guidance_is_uncond_plus_scale_times_cond_minus_uncond():
    """Ho & Salimans eq. 6 with the unconditional row where it belongs (mutant: the rows of the
    UNet batch read in the wrong order, i.e. guidance away from the prompt); scale 1 is the
    conditional prediction alone, one UNet row per latent (mutant: a needless second row)."""
    unet, x, text, empty = FakeUNet(), latents(0), states(1), states(2)
    expected = unet(x, 481, empty) + 7.5 * (unet(x, 481, text) - unet(x, 481, empty))
    assert (method.predict_guided(FakeUNet(), x, 481, text, empty, 7.5) - expected).abs().max() < TOL
    plain = FakeUNet()
    assert torch.equal(method.predict_guided(plain, x, 481, text, empty, 1.0), unet(x, 481, text))
    assert plain.rows == 1


def test_mask_predictions_come_back_target_first():
    """mask_noise_predictions returns (eps_target, eps_source) as documented (mutant: swapped,
    invisible in |eps_t - eps_s| but not to a caller reading each)."""
    ddim, x0, n, unet = DDIM(SD), latents(0), 3, FakeUNet()
    noise = latents(1, (1, n, 4, 6, 6))
    src, tgt = states(1), states(2)
    eps_t, eps_s = method.mask_noise_predictions(FakeUNet(), ddim, x0, noise, 481, src, tgt)
    x_t = ddim.add_noise(x0[:, None], noise, 481).flatten(0, 1)
    assert (eps_t[0] - unet(x_t, 481, tgt.expand(n, -1, -1))).abs().max() < TOL
    assert (eps_s[0] - unet(x_t, 481, src.expand(n, -1, -1))).abs().max() < TOL


def test_streamed_guided_mask_guides_each_text_with_its_own_negative():
    """With two different negative prompts, the streamed map is mean |g(c_t, u_t) - g(c_s, u_s)|,
    what the full predictions give (mutant: the target guided with the source's negative)."""
    ddim, n = DDIM(SD), 3
    x0, noise = latents(0, (2, 4, 6, 6)), latents(1, (2, n, 4, 6, 6))
    src, tgt, neg_s, neg_t = states(1, 2), states(2, 2), states(3, 2), states(4, 2)
    eps_t, eps_s = method.mask_noise_predictions(FakeUNet(), ddim, x0, noise, 481, src, tgt, neg_s, neg_t, 5.0)
    x_t = ddim.add_noise(x0[:, None], noise, 481)
    unet = FakeUNet()
    by_hand = torch.stack([
        (classifier_free_guidance(unet(x_t[b], 481, neg_t[b:b + 1].expand(n, -1, -1)),
                                  unet(x_t[b], 481, tgt[b:b + 1].expand(n, -1, -1)), 5.0)
         - classifier_free_guidance(unet(x_t[b], 481, neg_s[b:b + 1].expand(n, -1, -1)),
                                    unet(x_t[b], 481, src[b:b + 1].expand(n, -1, -1)), 5.0)).abs().mean(dim=(0, 1))
        for b in range(2)])
    assert (noise_difference(eps_t, eps_s) - by_hand).abs().max() < TOL
    for chunk in (1, 3, 8):
        streamed, _ = method.mask_difference(FakeUNet(), ddim, x0, method.NoiseStream(noise.shape, noise=noise), n,
                                             481, src, tgt, neg_s, neg_t, 5.0, chunk)
        assert (streamed - by_hand).abs().max() < TOL


def test_inversion_callback_gets_the_timestep_reached():
    """callback(i, t, x): t is the level x is at, the pair's destination (mutant: its origin)."""
    ddim, seen = DDIM(SD), []
    pairs = ddim.inverse_pairs(10, 0.5)
    out = method.ddim_invert(FakeUNet(), ddim, latents(0), pairs, states(1),
                             callback=lambda i, t, x: seen.append((i, t, x)))
    assert [(i, t) for i, t, _ in seen] == [(i, t_to) for i, (_, t_to) in enumerate(pairs)]
    assert all(torch.equal(x, out[i + 1]) for i, _, x in seen)


def test_stochastic_decode_step_is_ddim_eq_12_with_sigma_of_eq_16():
    """One unmasked step with eta > 0, by hand: sqrt(a') x0_hat + sqrt(1 - a' - s^2) eps + s z,
    s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), z the generator's next randn (mutant:
    eta dropped, the decode deterministic whatever eta is asked)."""
    ddim, unet = DDIM(SD), FakeUNet()
    y, text, eta = latents(0), states(1), 0.7
    t, t_prev = 981, 881
    out = method.masked_ddim_decode(FakeUNet(), ddim, y, [(t, t_prev)], text, None, 1.0, None, None, y,
                                    eta=eta, generator=torch.Generator().manual_seed(4))
    eps = unet(y, t, text)
    a, a_prev = ddim.alpha_bar_at(t), ddim.alpha_bar_at(t_prev)
    x0_hat = (y - (1 - a) ** 0.5 * eps) / a ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
    z = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    expected = a_prev ** 0.5 * x0_hat + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * z
    assert sigma > 0.1 and (out - expected).abs().max() < TOL


def test_per_sample_maps_are_each_samples_channel_mean():
    """Each sample's map is mean over channels of |eps_t - eps_s| for that noise sample, streamed
    or from the full predictions, and their mean over samples is the difference map (mutant:
    per_sample_difference averaging over the samples instead of the channels)."""
    ddim, n = DDIM(SD), 3
    x0, noise, src, tgt = latents(0), latents(1, (1, n, 4, 6, 6)), states(1), states(2)
    eps_t, eps_s = method.mask_noise_predictions(FakeUNet(), ddim, x0, noise, 481, src, tgt)
    per_sample = per_sample_difference(eps_t, eps_s)
    assert per_sample.shape == (1, n, 6, 6)
    assert (per_sample[0, 1] - (eps_t[0, 1] - eps_s[0, 1]).abs().mean(dim=0)).abs().max() < TOL
    assert (per_sample.mean(dim=1) - noise_difference(eps_t, eps_s)).abs().max() < TOL
    _, streamed = method.mask_difference(FakeUNet(), ddim, x0, method.NoiseStream(noise.shape, noise=noise), n, 481,
                                         src, tgt, keep_per_sample=True)
    assert (streamed - per_sample).abs().max() < TOL
