"""DiffEdit's three steps (diffedit/method.py) and the pipeline's switches around them.

Part 1 drives method.py with a stand-in noise predictor (a smooth function of x, t and the text
states), so the blend formulas, row counts and tracing are checked exactly and in milliseconds.
Part 2 runs DiffEditPipeline on the tiny random reference model for the ablations (no mask, no
encoding, SDEdit), the batch, soft masks, tracing and reuse of one inversion. Parity with
diffusers' pipeline is in test_pipeline_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffedit import method
from diffedit.models.config import PRESETS
from diffedit.errors import ParameterError
from diffedit.mask_maps import mask_maps
from diffedit.pipeline import DiffEditPipeline
from diffedit.results import MaskResult
from diffedit.sampler import DDIM, classifier_free_guidance
from reference_models import build_reference

SD = PRESETS["sd1"].scheduler  # SD's own noise schedule
TOL = 1e-5        # float32 rounding of a few elementwise operations on unit-scale latents
BATCH_TOL = 1e-4  # the same image alone or in a batch: UNet rounding may differ with the batch size
SOURCE, TARGET = "a photo of a cat on a sofa", "a photo of a dog on a sofa"


# ====================================================================== part 1: method.py

class FakeUNet:
    """predict_noise stand-in: eps depends on x, t and the text states; records every call."""

    def __init__(self):
        self.rows, self.calls = 0, []

    def __call__(self, x, t, context, level=None):
        self.rows += x.shape[0]
        self.calls.append((int(t), level))
        c = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(0.7 * x.float() + 3 * c) + 0.1 * math.sin(int(t) / 50) + 0.2 * x.flip(-1).float()


def states(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(seed))


def latents(seed: int, shape=(1, 4, 6, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def half_mask(batch: int = 1) -> torch.Tensor:
    m = torch.zeros(batch, 1, 6, 6)
    m[..., :, 3:] = 1
    return m


def test_mask_predictions_cost_2n_rows_unless_negative_prompts_differ():
    ddim, x0, n = DDIM(SD), latents(0), 5
    noise = latents(1, (1, n, 4, 6, 6))
    src, tgt, neg_a, neg_b = states(1), states(2), states(3), states(4)
    plain = FakeUNet()
    eps_t, eps_s = method.mask_noise_predictions(plain, ddim, x0, noise, 481, src, tgt)
    assert plain.rows == 2 * n and eps_t.shape == eps_s.shape == (1, n, 4, 6, 6)

    equal = FakeUNet()  # equal negatives: guidance cancels in the normalised map, so it is skipped
    same = method.mask_noise_predictions(equal, ddim, x0, noise, 481, src, tgt, neg_a, neg_a, 7.5)
    assert equal.rows == 2 * n
    assert torch.equal(same[0], eps_t) and torch.equal(same[1], eps_s)

    different = FakeUNet()
    guided_t, guided_s = method.mask_noise_predictions(different, ddim, x0, noise, 481, src, tgt, neg_a, neg_b, 7.5)
    assert different.rows == 4 * n
    fake = FakeUNet()
    x_t = ddim.add_noise(x0[:, None], noise, 481).flatten(0, 1)
    expect_t = classifier_free_guidance(fake(x_t, 481, neg_b.expand(n, -1, -1)), fake(x_t, 481, tgt.expand(n, -1, -1)), 7.5)
    assert (guided_t[0] - expect_t).abs().max() < TOL
    assert not torch.allclose(guided_t, eps_t)


def test_equal_negatives_guidance_only_scales_the_map():
    """u + g (c_t - u) - (u + g (c_s - u)) = g (c_t - c_s): both normalisations remove g."""
    ddim, x0, n, g = DDIM(SD), latents(0), 4, 7.5
    noise = latents(1, (1, n, 4, 6, 6))
    fake = FakeUNet()
    eps_t, eps_s = method.mask_noise_predictions(fake, ddim, x0, noise, 481, states(1), states(2))
    u = fake(ddim.add_noise(x0[:, None], noise, 481).flatten(0, 1), 481, states(3).expand(n, -1, -1)).view_as(eps_t)
    guided_t, guided_s = classifier_free_guidance(u, eps_t, g), classifier_free_guidance(u, eps_s, g)
    for normalization in ("paper", "mean_ratio"):
        a, b = mask_maps(eps_t, eps_s, normalization), mask_maps(guided_t, guided_s, normalization)
        assert (a.soft - b.soft).abs().max() < TOL


def test_chunk_size_does_not_change_the_predictions():
    ddim, x0 = DDIM(SD), latents(0, (2, 4, 6, 6))
    noise = latents(1, (2, 3, 4, 6, 6))
    runs = [method.mask_noise_predictions(FakeUNet(), ddim, x0, noise, 481, states(1, 2), states(2, 2), chunk_size=c)
            for c in (1, 5, 64)]
    for eps_t, eps_s in runs[1:]:
        assert (eps_t - runs[0][0]).abs().max() < TOL and (eps_s - runs[0][1]).abs().max() < TOL


def test_inversion_evaluates_the_unet_at_the_destination_and_reads_the_level_below():
    ddim, fake = DDIM(SD), FakeUNet()
    pairs = ddim.inverse_pairs(10, 0.5)
    out = method.ddim_invert(fake, ddim, latents(0), pairs, states(1))
    assert len(out) == len(pairs) + 1
    assert fake.calls == [(t_to, t_from) for t_from, t_to in pairs]
    assert pairs[0][0] == -1  # the first step leaves the clean image


def decode(blend="paper", mask=None, callback=None, eta=0.0, generator=None, fake=None):
    """A 5-step masked decode with encoded latents from a real inversion of the fake UNet."""
    ddim, fake = DDIM(SD), fake or FakeUNet()
    x0, text, empty = latents(0), states(2), states(3)
    encoded = method.ddim_invert(fake, ddim, x0, ddim.inverse_pairs(10, 0.5), empty)
    levels = {t: x for (_, t), x in zip(ddim.inverse_pairs(10, 0.5), encoded[1:])}

    def reference(t):
        return x0 if t < 0 else levels[t]

    pairs = ddim.step_pairs(10, 0.5)
    y = method.masked_ddim_decode(fake, ddim, reference(pairs[0][0]), pairs, text, empty, 7.5, mask, reference, x0,
                                  blend, eta, generator, callback)
    return y, reference, pairs, ddim, fake


def test_paper_blend_pastes_the_encoded_latent_of_the_timestep_reached():
    traces = []
    y, reference, pairs, _, _ = decode("paper", half_mask(), traces.append)
    keep = (half_mask() == 0).expand(1, 4, 6, 6)
    assert torch.equal(y[keep], reference(-1)[keep])
    assert [(tr.t, tr.t_prev) for tr in traces] == pairs and pairs[-1][1] == -1
    for tr in traces:
        assert torch.equal(tr.x_t, reference(tr.t_prev))
        assert torch.equal(tr.y_t * (1 - tr.mask), reference(tr.t_prev) * (1 - tr.mask))
    assert torch.equal(traces[-1].y_t, y)


def test_diffusers_blend_is_one_step_off_and_never_pastes_x0():
    traces = []
    y, reference, pairs, _, _ = decode("diffusers", half_mask(), traces.append)
    for tr in traces:
        assert torch.equal(tr.x_t, reference(tr.t))  # the latent of the level the step LEFT
    outside = (half_mask() == 0).expand(1, 4, 6, 6)
    assert torch.equal(y[outside], reference(pairs[-1][0])[outside])
    assert (y[outside] - reference(-1)[outside]).abs().max() > 1e-3


def test_full_mask_is_no_mask_and_empty_mask_is_the_input():
    free, *_ = decode("paper", None)
    for blend in ("paper", "diffusers", "glide"):
        ones, *_ = decode(blend, torch.ones(1, 1, 6, 6))
        assert torch.equal(ones, free) if blend != "glide" else (ones - free).abs().max() < TOL
    zeros, reference, *_ = decode("paper", torch.zeros(1, 1, 6, 6))
    assert torch.equal(zeros, reference(-1))


def test_glide_blend_steps_from_the_blended_x0_along_the_models_eps():
    """One GLIDE step by hand: x_prev = sqrt(a_prev) (M x0_hat + (1 - M) x0) + sqrt(1 - a_prev) eps."""
    traces = []
    mask = half_mask()
    y, reference, pairs, ddim, fake = decode("glide", mask, traces.append)
    x0, text, empty = latents(0), states(2), states(3)
    y_t = reference(pairs[0][0])
    t, t_prev = pairs[0]
    eps = method.predict_guided(FakeUNet(), y_t, t, text, empty, 7.5)
    x0_hat = ddim.predict_x0_and_eps(eps, y_t, t)[0]
    a_prev = ddim.alpha_bar_at(t_prev)
    expected = a_prev ** 0.5 * (mask * x0_hat + (1 - mask) * x0) + (1 - a_prev) ** 0.5 * eps
    assert (traces[0].y_t - expected).abs().max() < TOL
    assert traces[0].x_t is None and torch.equal(traces[0].pred_x0, x0_hat)


def test_soft_mask_blends_linearly():
    traces_soft, traces_free = [], []
    decode("paper", torch.full((1, 1, 6, 6), 0.25), traces_soft.append)
    _, reference, pairs, ddim, _ = decode("paper", None, traces_free.append)
    # first step: same input, so the step output is the free run's; the blend weighs it 1/4
    expected = 0.25 * traces_free[0].y_t + 0.75 * reference(pairs[0][1])
    assert (traces_soft[0].y_t - expected).abs().max() < TOL


def test_tracing_does_not_change_the_result():
    for blend in ("paper", "glide", "diffusers"):
        quiet, *_ = decode(blend, half_mask())
        traced, *_ = decode(blend, half_mask(), lambda trace: None)
        assert torch.equal(quiet, traced)
    g = torch.Generator()
    a, *_ = decode("paper", half_mask(), eta=0.5, generator=g.manual_seed(0))
    b, *_ = decode("paper", half_mask(), lambda trace: None, eta=0.5, generator=g.manual_seed(0))
    assert torch.equal(a, b)


# ====================================================================== part 2: the pipeline

@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> DiffEditPipeline:
    folder, _ = build_reference("tiny", tmp_path_factory.mktemp("tiny"), seed=0)
    return DiffEditPipeline.from_pretrained(folder)


def image(seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.4 * math.cos(seed)) ** 2 + (yy - 0.4 * math.sin(seed)) ** 2) / 0.2)
    return (torch.stack([0.5 + 0.3 * xx, blob, 0.5 - 0.3 * yy]) + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)


def spent(pipe: DiffEditPipeline, run) -> tuple[object, dict]:
    before = pipe.counters.as_dict()
    out = run()
    return out, {k: v - before[k] for k, v in pipe.counters.as_dict().items()}


def noise_for(pipe, encoded, n: int, seed: int) -> torch.Tensor:
    return torch.randn((encoded.latents.shape[0], n, *encoded.latents.shape[1:]),
                       generator=torch.Generator().manual_seed(seed))


def test_one_inversion_serves_every_smaller_strength(pipe):
    encoded = pipe.encode_image(image(0))
    mask = pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, num_inference_steps=10)
    inversion, cost = spent(pipe, lambda: pipe.invert(encoded, strength=0.8, num_inference_steps=10))
    assert cost["unet_samples"] == 8 and inversion.latents.shape[1] == 9
    for r in (0.3, 0.5, 0.8):
        out, cost = spent(pipe, lambda: pipe.edit(inversion, mask, TARGET, strength=r))
        k = int(10 * r)
        assert cost["unet_samples"] == 2 * k and out.timesteps == pipe.scheduler.timesteps(10)[10 - k:].tolist()
        alone = pipe.edit(pipe.invert(encoded, strength=r, num_inference_steps=10), mask, TARGET)
        assert torch.equal(out.latents, alone.latents)
    # a larger strength, or another grid, needs a new inversion (done for the caller)
    _, cost = spent(pipe, lambda: pipe.edit(inversion, mask, TARGET, strength=1.0))
    assert cost["unet_samples"] == 10 + 2 * 10
    _, cost = spent(pipe, lambda: pipe.edit(inversion, mask, TARGET, num_inference_steps=5))
    assert cost["unet_samples"] == 4 + 2 * 4


def test_ablations(pipe):
    img, gen = image(1), torch.Generator()
    common = dict(num_inference_steps=10, num_mask_samples=2, generator=gen)
    full, cost = spent(pipe, lambda: pipe(img, SOURCE, TARGET, **common))
    assert cost["unet_samples"] == 2 * 2 + 8 + 16

    # no mask: plain encode-decode, the same as an all-ones mask
    no_mask, cost = spent(pipe, lambda: pipe(img, SOURCE, TARGET, use_mask=False, **common))
    assert cost["unet_samples"] == 8 + 16 and no_mask.mask is None
    ones = pipe(img, SOURCE, TARGET, mask=torch.ones(8, 8), **common)
    assert torch.equal(no_mask.edit.latents, ones.edit.latents)
    assert not torch.equal(no_mask.edit.latents, full.edit.latents)

    # no encoding: fresh q(x_t | x0) samples instead of encoded latents, reproducible by seed
    gen.manual_seed(5)
    no_encode, cost = spent(pipe, lambda: pipe(img, SOURCE, TARGET, encode=False, mask=full.mask, **common))
    assert cost["unet_samples"] == 16 and no_encode.inversion is None
    gen.manual_seed(5)
    again = pipe(img, SOURCE, TARGET, encode=False, mask=full.mask, **common)
    assert torch.equal(no_encode.edit.latents, again.edit.latents)
    outside = ~full.mask.mask[:, None].expand_as(full.edit.latents)
    x0 = pipe.encode_image(img).latents
    assert torch.equal(no_encode.edit.latents[outside], x0[outside])

    # SDEdit: noise x0 to t_k, decode under the target, nothing pasted
    gen.manual_seed(7)
    sdedit, cost = spent(pipe, lambda: pipe(img, SOURCE, TARGET, encode=False, use_mask=False, **common))
    assert cost["unet_samples"] == 16
    gen.manual_seed(7)
    pairs = pipe.scheduler.step_pairs(10, 0.8)
    start = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), pairs[0][0])
    by_hand = method.masked_ddim_decode(pipe.predict_noise, pipe.scheduler, start, pairs, pipe.encode_prompt([TARGET]),
                                        pipe.encode_prompt([""]), 7.5, None, None, x0)
    assert torch.equal(sdedit.edit.latents, by_hand)


def test_blends_differ_and_keep_the_outside(pipe):
    encoded = pipe.encode_image(image(2))
    mask = pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, num_inference_steps=10)
    assert 0 < int(mask.mask.sum()) < 64
    inversion = pipe.invert(encoded, strength=0.8, num_inference_steps=10)
    outs = {b: pipe.edit(inversion, mask, TARGET, blend=b).latents for b in method.BLENDS}
    outside = ~mask.mask[:, None].expand_as(encoded.latents)
    assert torch.equal(outs["paper"][outside], encoded.latents[outside])
    glide_gap = (outs["glide"][outside] - encoded.latents[outside]).abs().max()
    diffusers_gap = (outs["diffusers"][outside] - encoded.latents[outside]).abs().max()
    assert glide_gap < 0.1 and diffusers_gap < 0.1   # near x0, not on it
    assert glide_gap > 0 and diffusers_gap > 0
    assert not torch.equal(outs["paper"], outs["glide"]) and not torch.equal(outs["paper"], outs["diffusers"])
    with pytest.raises(ParameterError):
        pipe.edit(inversion, mask, TARGET, blend="average")


@pytest.mark.parametrize("normalization", ["paper", "mean_ratio"])
def test_each_images_mask_is_independent_of_the_batch(pipe, normalization):
    """Two images in one call get the masks they get alone (diffusers' mean over the whole batch
    would not): the same noise samples per image, per-image normalisation."""
    n = 3
    alone = []
    for seed in (3, 4):
        enc = pipe.encode_image(image(seed))
        alone.append((enc, noise_for(pipe, enc, n, seed)))
    batch = pipe.encode_image([image(3), image(4)])
    noise = torch.cat([nz for _, nz in alone])
    together, cost = spent(pipe, lambda: pipe.generate_mask(batch, SOURCE, [TARGET, "a photo of a bird"], num_samples=n,
                                                             normalization=normalization, noise=noise))
    assert cost["unet_samples"] == 2 * 2 * n and cost["vae_encodes"] == 0   # batch latents were cached
    targets = [TARGET, "a photo of a bird"]
    for b, (enc, nz) in enumerate(alone):
        single = pipe.generate_mask(enc, SOURCE, targets[b], num_samples=n, normalization=normalization, noise=nz)
        assert (together.soft[b] - single.soft[0]).abs().max() < BATCH_TOL
        assert torch.equal(together.mask[b], single.mask[0])
    # and the whole edit of the batch is each image's edit
    inv = pipe.invert(batch, strength=0.8, num_inference_steps=10)
    edits = pipe.edit(inv, together, targets)
    for b, (enc, _) in enumerate(alone):
        single = pipe.edit(pipe.invert(enc, strength=0.8, num_inference_steps=10), together.mask[b], targets[b])
        assert (edits.latents[b] - single.latents[0]).abs().max() < BATCH_TOL


def test_soft_mask_uses_the_soft_map(pipe):
    encoded = pipe.encode_image(image(5))
    mask = pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, num_inference_steps=10)
    inversion = pipe.invert(encoded, strength=0.8, num_inference_steps=10)
    soft = pipe.edit(inversion, mask, TARGET, soft_mask=True)
    assert torch.equal(soft.mask[:, 0], mask.soft)
    assert torch.equal(soft.latents, pipe.edit(inversion, mask.soft, TARGET, soft_mask=True).latents)
    assert not torch.equal(soft.latents, pipe.edit(inversion, mask, TARGET).latents)
    # soft: the cells where the map is 0 are exactly the input
    zero = (mask.soft == 0)[:, None].expand_as(encoded.latents)
    assert zero.any() and torch.equal(soft.latents[zero], encoded.latents[zero])
    one_shot = pipe(encoded, SOURCE, TARGET, mask=mask, soft_mask=True, num_inference_steps=10)
    assert torch.equal(one_shot.edit.latents, soft.latents)


def test_tracing_exposes_each_step_without_changing_the_result(pipe):
    encoded = pipe.encode_image(image(6))
    mask = pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, num_inference_steps=10)
    inversion = pipe.invert(encoded, strength=0.8, num_inference_steps=10)
    traces: list[method.StepTrace] = []
    traced = pipe.edit(inversion, mask, TARGET, callback=traces.append)
    quiet = pipe.edit(inversion, mask, TARGET)
    assert torch.equal(traced.latents, quiet.latents)
    assert [tr.t for tr in traces] == traced.timesteps and traces[-1].t_prev == -1
    for tr in traces:
        assert tr.y_t.shape == tr.x_t.shape == tr.pred_x0.shape == encoded.latents.shape
        assert torch.equal(tr.x_t, inversion.latent_at(tr.t_prev))
        assert tr.mask.shape == (1, 1, 8, 8)
    assert torch.equal(traces[-1].y_t, traced.latents)
    # the predicted x0 comes closer to the final latent as the steps go
    gaps = [float((tr.pred_x0 - traced.latents).abs().mean()) for tr in traces]
    assert gaps[-1] < gaps[0]


def test_one_negative_prompt_makes_the_mask_guided(pipe):
    encoded = pipe.encode_image(image(7))
    _, cost = spent(pipe, lambda: pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, guidance_scale=5.0,
                                                      target_negative_prompt="blurry"))
    assert cost["unet_samples"] == 4 * 2
    _, cost = spent(pipe, lambda: pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=2, guidance_scale=5.0,
                                                      source_negative_prompt="blurry", target_negative_prompt="blurry"))
    assert cost["unet_samples"] == 2 * 2


def test_bad_masks_raise(pipe):
    encoded = pipe.encode_image(image(8))
    inversion = pipe.invert(encoded, strength=0.5, num_inference_steps=4)
    with pytest.raises(ParameterError):
        pipe.edit(inversion, torch.full((8, 8), 2.0), TARGET)
    with pytest.raises(ParameterError):
        pipe.edit(inversion, torch.ones(3, 8, 8), TARGET)
    assert isinstance(pipe.generate_mask(encoded, SOURCE, TARGET, num_samples=1), MaskResult)
