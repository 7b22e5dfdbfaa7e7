"""DDIM sampler and inverter against diffusers' DDIMScheduler / DDIMInverseScheduler (oracles,
built `from_config` of the same dict as our SchedulerConfig), plus exact-invertibility properties."""

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
    StableDiffusionDiffEditPipeline,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffedit.models.config import PRESETS, SchedulerConfig
from diffedit.errors import ModelLoadError, ParameterError
from diffedit.sampler import DDIM, classifier_free_guidance

TOL = 1e-6  # max abs difference allowed against the oracles (latents of unit scale, fp32)
MEASURED: dict[str, float] = {}  # worst errors seen, printed by test_zz_report (pytest -s)

SD = asdict(PRESETS["sd1"].scheduler)  # SD's own noise schedule, every key spelled out (diffusers' names)
DEFAULTS: dict = {}  # DDIMScheduler's defaults: linear, clip_sample, set_alpha_to_one, no offset
CONFIGS = {"sd": SD, "defaults": DEFAULTS}
SCHEDULES = {
    **CONFIGS,
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "trained": dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
    "zero_snr_sd": dict(SD, rescale_betas_zero_snr=True),
    "zero_snr_linear": dict(rescale_betas_zero_snr=True, num_train_timesteps=500),
}
SPACINGS = ("leading", "trailing", "linspace")


def ours(d: dict) -> DDIM:
    return DDIM(SchedulerConfig.from_dict(d))


def record(name: str, err: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), err)


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, x- and t-dependent stand-in for the UNet (unit-scale outputs)."""
    t = float(t)
    return torch.tanh(0.8 * x + t / 1000) + 0.3 * torch.sin(3 * x.flip(-1) + t / 97)


def start_latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ schedule and grid

@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_bar_is_bit_identical(name):
    d = SCHEDULES[name]
    oracle, mine = DDIMScheduler.from_config(d), ours(d)
    assert mine.alpha_bar.dtype == torch.float32
    assert torch.equal(mine.alpha_bar, oracle.alphas_cumprod)
    assert torch.equal(mine.alpha_bar_at(-1), oracle.final_alpha_cumprod)
    assert torch.equal(mine.alpha_bar_at(-1), DDIMInverseScheduler.from_config(d).initial_alpha_cumprod)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", CONFIGS)
def test_timesteps_match_for_every_step_count(config, spacing):
    d = dict(CONFIGS[config], timestep_spacing=spacing)
    oracle, mine = DDIMScheduler.from_config(d), ours(d)
    for n in range(1, 1001):  # includes 1, 7, 20, 50 and 1000
        oracle.set_timesteps(n)
        expected = oracle.timesteps
        if spacing == "leading" and expected[0] >= 1000:  # SD with 1000 steps reaches t = 1000
            with pytest.raises(ParameterError):
                mine.timesteps(n)
            assert config == "sd" and n == 1000
            continue
        got = mine.timesteps(n)
        assert got.dtype == torch.long and len(got) == n
        if len(expected) == n + 1:  # diffusers' arange makes an extra t = -1 for some trailing n
            assert spacing == "trailing" and expected[-1] == -1
            expected = expected[:n]
        assert torch.equal(got, expected), n


@pytest.mark.parametrize("spacing", ("leading", "trailing"))
@pytest.mark.parametrize("config", CONFIGS)
def test_inverse_grid_is_the_forward_grid_reversed(config, spacing):
    d = dict(CONFIGS[config], timestep_spacing=spacing)
    inverse, mine = DDIMInverseScheduler.from_config(d), ours(d)
    for n in (1, 7, 20, 50, 999):
        inverse.set_timesteps(n)
        assert torch.equal(inverse.timesteps[:n], mine.timesteps(n).flip(0))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", CONFIGS)
def test_strength_arithmetic_matches_diffedit_pipeline(config, spacing):
    d = dict(CONFIGS[config], timestep_spacing=spacing)
    pipe = SimpleNamespace(scheduler=DDIMScheduler.from_config(d))
    mine = ours(d)
    if spacing != "linspace":  # DDIMInverseScheduler has no linspace spacing
        pipe.inverse_scheduler = DDIMInverseScheduler.from_config(d)
    for n in (1, 7, 20, 50):
        pipe.scheduler.set_timesteps(n)
        grid = pipe.scheduler.timesteps
        for strength in (0.05, 0.1, 0.3, 0.5, 0.58, 0.8, 0.99, 1.0):
            if int(n * strength) == 0:
                with pytest.raises(ParameterError):
                    mine.step_pairs(n, strength)
                continue
            k = round(n * strength) if abs(n * strength - round(n * strength)) < 1e-9 else int(n * strength)
            assert mine.num_steps(n, strength) == k  # 50 x 0.58 keeps 29 steps; diffusers' int() gives 28
            oracle = (k + 0.5) / n if k != int(n * strength) else strength  # diffusers at the same k
            decode, _ = StableDiffusionDiffEditPipeline.get_timesteps(pipe, n, oracle, "cpu")
            pairs = mine.step_pairs(n, strength)
            assert [t for t, _ in pairs] == decode.tolist()
            # t_prev is the next grid timestep; diffusers' stride t - T // n agrees for "leading"
            assert [p for _, p in pairs] == [int(t) for t in grid[len(grid) - len(pairs) + 1:]] + [-1]
            if spacing == "leading":
                assert [p for _, p in pairs] == [max(int(t) - 1000 // n, -1) for t in decode]
            if spacing != "linspace":
                pipe.inverse_scheduler.set_timesteps(n)
                encode, _ = StableDiffusionDiffEditPipeline.get_inverse_timesteps(pipe, n, oracle, "cpu")
                assert [t for _, t in mine.inverse_pairs(n, strength)] == encode.tolist()


# ------------------------------------------------------------------ steps against the oracles

@pytest.mark.parametrize("eta", (0.0, 0.5))
@pytest.mark.parametrize("prediction", ("epsilon", "v_prediction"))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config", CONFIGS)
def test_step_matches_ddim_over_a_trajectory(config, spacing, prediction, eta):
    d = dict(CONFIGS[config], timestep_spacing=spacing, prediction_type=prediction)
    oracle, mine = DDIMScheduler.from_config(d), ours(d)
    for n in (7, 20):
        oracle.set_timesteps(n)
        g_oracle, g_mine = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        x_oracle = x_mine = start_latent(n)
        err = 0.0
        for t in oracle.timesteps:
            x_oracle = oracle.step(fake_unet(x_oracle, t), t, x_oracle, eta=eta, generator=g_oracle).prev_sample
            # diffusers' own t_prev; for "leading" it is also our step_pairs' (tested above)
            x_mine = mine.step(fake_unet(x_mine, t), int(t), int(t) - 1000 // n, x_mine, eta=eta, generator=g_mine)
            err = max(err, (x_mine - x_oracle).abs().max().item())
        assert x_mine.dtype == torch.float32 and torch.isfinite(x_mine).all()
        record(f"step eta={eta}", err)
        assert err <= TOL, (n, err)


@pytest.mark.parametrize("prediction", ("epsilon", "v_prediction"))
@pytest.mark.parametrize("config", CONFIGS)
def test_step_pairs_trajectory_matches_ddim_for_leading(config, prediction):
    """The pairs the pipeline uses, end to end, on Stable Diffusion's spacing."""
    d = dict(CONFIGS[config], prediction_type=prediction)
    oracle, mine = DDIMScheduler.from_config(d), ours(d)
    oracle.set_timesteps(50)
    x_oracle = x_mine = start_latent()
    for t, t_prev in mine.step_pairs(50):
        x_oracle = oracle.step(fake_unet(x_oracle, t), t, x_oracle).prev_sample
        x_mine = mine.step(fake_unet(x_mine, t), t, t_prev, x_mine)
    err = (x_mine - x_oracle).abs().max().item()
    record("step_pairs trajectory", err)
    assert err <= TOL


@pytest.mark.parametrize("prediction", ("epsilon", "v_prediction"))
@pytest.mark.parametrize("spacing", ("leading", "trailing"))  # the oracle has no linspace
@pytest.mark.parametrize("config", CONFIGS)
def test_inverse_step_matches_ddim_inverse_over_a_trajectory(config, spacing, prediction):
    d = dict(CONFIGS[config], timestep_spacing=spacing, prediction_type=prediction)
    oracle, mine = DDIMInverseScheduler.from_config(d), ours(d)
    for n in (7, 20):
        oracle.set_timesteps(n)
        x_oracle = x_mine = start_latent(n)
        err = 0.0
        for t in oracle.timesteps[:n]:
            x_oracle = oracle.step(fake_unet(x_oracle, t), t, x_oracle).prev_sample
            x_mine = mine.inverse_step(fake_unet(x_mine, t), int(t) - 1000 // n, int(t), x_mine)
            err = max(err, (x_mine - x_oracle).abs().max().item())
        record("inverse_step", err)
        assert err <= TOL, (n, err)
        if spacing == "leading":  # and the pairs the pipeline uses are diffusers' pairs
            assert mine.inverse_pairs(n) == [(max(int(t) - 1000 // n, -1), int(t)) for t in oracle.timesteps]


def test_helpers_match_the_oracle():
    oracle, mine = DDIMScheduler.from_config(dict(SD, prediction_type="v_prediction")), ours(dict(SD))
    oracle.set_timesteps(50)
    x0, noise, x_t = start_latent(1), start_latent(2), start_latent(3)
    for t in (1, 481, 981):
        assert torch.equal(mine.add_noise(x0, noise, t), oracle.add_noise(x0, noise, torch.tensor(t)))
        pred_x0, _ = mine.predict_x0_and_eps(noise, x_t, t, "v_prediction")
        expected = oracle.step(noise, t, x_t).pred_original_sample
        assert (pred_x0 - expected).abs().max() <= TOL
        eps_pred_x0, eps = mine.predict_x0_and_eps(noise, x_t, t)  # config: epsilon
        assert torch.allclose(mine.eps_from_x0(eps_pred_x0, x_t, t), eps, atol=1e-4)
    per_sample = torch.tensor([1, 981])
    assert torch.equal(mine.add_noise(x0, noise, per_sample), oracle.add_noise(x0, noise, per_sample))


def test_low_precision_inputs_compute_and_return_float32():
    mine = ours(SD)
    x, eps = start_latent(4).bfloat16(), start_latent(5).bfloat16()
    out = mine.step(eps, 981, 961, x, eta=0.5, generator=torch.Generator().manual_seed(0))
    ref = mine.step(eps.float(), 981, 961, x.float(), eta=0.5, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert mine.inverse_step(eps, 1, 21, x).dtype == torch.float32
    assert mine.add_noise(x, eps, 21).dtype == torch.float32
    guided = classifier_free_guidance(eps, x, 7.5)
    assert guided.dtype == torch.float32
    assert torch.allclose(guided, eps.float() + 7.5 * (x.float() - eps.float()))
    assert torch.equal(classifier_free_guidance(eps, x, 1.0), x.float())


# ------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None)
@given(config=st.sampled_from(["sd", "defaults"]), spacing=st.sampled_from(SPACINGS),
       n=st.integers(1, 1000), strength=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_decoding_inverted_latent_with_fixed_eps_returns_the_image(config, spacing, n, strength, seed):
    """DDIM is exactly invertible when eps does not depend on x: forward(inverse(x)) = x, up to fp32
    rounding amplified by 1 / sqrt(alpha_bar) at the top level (pred_x0 divides by it): the error,
    relative to max|x0| / sqrt(alpha_bar_top), stays below 1e-5 (measured <= 1.4e-6, ~12 ulps)."""
    d = dict(CONFIGS[config], timestep_spacing=spacing, clip_sample=False)
    mine = ours(d)
    assume(int(n * strength) >= 1 and not (n == 1000 and spacing == "leading" and config == "sd"))
    x0, eps = start_latent(seed), start_latent(seed + 1)
    x = x0
    for t_from, t_to in mine.inverse_pairs(n, strength):
        x = mine.inverse_step(eps, t_from, t_to, x)
    for t, t_prev in mine.step_pairs(n, strength):
        x = mine.step(eps, t, t_prev, x)
    top = mine.step_pairs(n, strength)[0][0]
    err = (x - x0).abs().max().item() * mine.alpha_bar[top].sqrt().item() / x0.abs().max().item()
    record("round trip, relative", err)
    assert err <= 1e-5


@settings(max_examples=60, deadline=None)
@given(spacing=st.sampled_from(SPACINGS), n=st.integers(1, 200), r=st.floats(0.0, 1.0), big_r=st.floats(0.0, 1.0))
def test_one_inversion_serves_every_smaller_strength(spacing, n, r, big_r):
    mine = ours(dict(SD, timestep_spacing=spacing))
    r, big_r = sorted((r, big_r))
    k = int(n * r + 1e-9)
    assume(k >= 1)
    encode = mine.inverse_pairs(n, big_r)
    decode = mine.step_pairs(n, r)
    assert len(decode) == k and mine.inverse_pairs(n, r) == encode[:k]
    assert decode[0][0] == encode[k - 1][1]  # the decode starts where the k-th inverse pair ends
    assert decode == mine.step_pairs(n, big_r)[len(encode) - k:]
    reached = [-1] + [t for _, t in encode]  # every t_prev of the decode is an encoded level
    assert all(t_prev in reached for _, t_prev in decode)


def test_a_strength_of_k_over_n_keeps_k_steps():
    """n x (k / n) is not always k in floating point (50 x 0.58 = 28.999999999999996): no step is lost."""
    mine = ours(SD)
    lost = [(n, k) for n in range(1, 1001) for k in range(1, n + 1) if mine.num_steps(n, k / n) != k]
    assert not lost, lost[:5]
    assert sum(int(n * (k / n)) != k for n in range(1, 1001) for k in range(1, n + 1)) > 1000  # int() would lose them


@pytest.mark.parametrize("steps", (0, -3, 1001))
def test_bad_step_counts_raise(steps):
    with pytest.raises(ParameterError, match="num_inference_steps"):
        ours(SD).timesteps(steps)
    with pytest.raises(ParameterError):
        ours(SD).step_pairs(steps, 0.5)


@pytest.mark.parametrize("strength", (-0.1, 1.5, 0.0, 0.01))
def test_bad_strengths_raise_one_sentence(strength):
    with pytest.raises(ParameterError) as info:
        ours(SD).inverse_pairs(50, strength)
    message = str(info.value)
    assert "strength" in message and "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("bad", (dict(timestep_spacing="karras"), dict(beta_schedule="sigmoid"),
                                 dict(trained_betas=[0.1, 0.2])))
def test_unsupported_schedules_raise(bad):
    with pytest.raises(ModelLoadError):  # refused when the scheduler config is read (issue 18)
        ours(bad)


def test_zz_report():
    """Prints the worst errors measured above (run with -s); fails if any exceeded the tolerance."""
    for name, err in sorted(MEASURED.items()):
        print(f"  max abs error  {name:28s} {err:.3e}")
    assert all(err <= 1e-4 for err in MEASURED.values())
