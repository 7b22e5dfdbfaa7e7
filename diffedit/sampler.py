"""DDIM (Song et al., ICLR 2021, arXiv 2010.02502): the sampler and its inverse, on the training
noise schedule of a checkpoint.

    alpha_bar_t = prod_{s <= t} (1 - beta_s)              (the DDIM paper's alpha_t)
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps

Timestep conventions (the pipeline relies on them):
- `timesteps(n)` is the descending grid of n training timesteps. A decoding step goes from a grid
  timestep t to the next one, t_prev; the last step goes to t_prev = -1, the clean image, whose
  alpha_bar is 1 (set_alpha_to_one) or alpha_bar[0].
  diffusers' DDIMScheduler.step uses t_prev = t - T // n instead: the same for "leading" spacing
  (Stable Diffusion's), off the grid for "trailing"/"linspace" when n does not divide T (diffusers
  issues #9261, #12633). `step` itself takes any (t, t_prev), so it reproduces either.
- Inversion walks the same pairs backwards, (t_from, t_to) = (t_prev, t). The UNet is evaluated at
  the destination t_to on the latent x_{t_from}, as in diffusers' DDIMInverseScheduler and
  null-text inversion, so both directions of a pair call the UNet at the same timestep.
- A strength r on an n-step grid keeps the last k = min(floor(n r), n) steps (diffusers' DiffEdit
  `get_timesteps`, whose int() also drops a step where n r falls just short of an integer in
  floating point, e.g. 50 x 0.58; here those keep their step). Inversion pairs are ascending, so one inversion to strength R holds, after
  its k-th pair, the latent a decode at any strength r <= R with k steps starts from.

All arithmetic is float32 whatever the latents' dtype, and results are float32.
"""

from __future__ import annotations

import math

import torch

from diffedit.errors import ParameterError
from diffedit.models.config import SchedulerConfig
from diffedit.settings import check

SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule, Improved DDPM eq. 17 (Nichol & Dhariwal 2021), capped at max_beta."""
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 and alpha_bar_0 is unchanged
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alpha_bar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """The training schedule beta_0..beta_{T-1} (float32)."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
        if len(betas) != T:
            raise ParameterError(f"the scheduler has {len(betas)} trained betas but num_train_timesteps {T}; "
                                 "make them agree.")
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise ParameterError(f"beta_schedule {config.beta_schedule!r} is not supported; "
                             "use linear, scaled_linear or squaredcos_cap_v2.")
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps_u + s (eps_c - eps_u), in float32."""
    eps_uncond = eps_uncond.float()
    return eps_uncond + scale * (eps_cond.float() - eps_uncond)


class DDIM:
    """Deterministic (eta = 0) or stochastic DDIM steps on the noise schedule of `config`."""

    def __init__(self, config: SchedulerConfig):
        if config.timestep_spacing not in SPACINGS:
            raise ParameterError(f"timestep_spacing {config.timestep_spacing!r} is not supported; "
                                 f"use one of {', '.join(SPACINGS)}.")
        if config.prediction_type not in PREDICTIONS:
            raise ParameterError(f"prediction_type {config.prediction_type!r} is not supported; use epsilon or v_prediction.")
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        self.alpha_bar = torch.cumprod(1.0 - make_betas(config), dim=0)
        self.alpha_bar_clean = torch.tensor(1.0) if config.set_alpha_to_one else self.alpha_bar[0]

    def alpha_bar_at(self, t: int) -> torch.Tensor:
        """alpha_bar_t (0-dim float32); t < 0 is the clean image."""
        t = int(t)
        return self.alpha_bar[t] if t >= 0 else self.alpha_bar_clean

    # ------------------------------------------------------------------ the grid

    def timesteps(self, num_inference_steps: int, steps_name: str = "num_inference_steps") -> torch.Tensor:
        """The n grid timesteps, descending (Lin et al. 2024, Table 2 for the three spacings)."""
        T, n, spacing = self.num_train_timesteps, num_inference_steps, self.config.timestep_spacing
        if not 1 <= n <= T:
            raise ParameterError(f"{steps_name} must be between 1 and {T} (the schedule's length), got {n}.")
        j = torch.arange(n, dtype=torch.float64)
        if spacing == "leading":    # multiples of T // n from 0, shifted by steps_offset
            t = (torch.arange(n) * (T // n) + self.config.steps_offset).flip(0)
        elif spacing == "trailing":  # from T - 1 down by T / n; stride taken as numpy.arange does
            t = (T + j * ((T - T / n) - T)).round().long() - 1
        else:                        # n points from 0 to T - 1 inclusive, as numpy.linspace
            t = (j * ((T - 1) / max(n - 1, 1))).round().long()
            t[-1] = T - 1 if n > 1 else 0
            t = t.flip(0)
        if t[0] >= T:
            raise ParameterError(f"{n} 'leading' steps with steps_offset {self.config.steps_offset} reach timestep "
                                 f"{int(t[0])}, past the schedule's last timestep {T - 1}; use fewer steps.")
        return t

    def num_steps(self, num_inference_steps: int, strength: float, name: str = "strength") -> int:
        """k = min(floor(n * strength), n): the steps a strength keeps (diffusers' DiffEdit get_timesteps),
        forgiving float error: 50 x 0.58 = 28.999999999999996 keeps 29 steps (diffusers' int(): 28).
        `name` is the caller's name of the strength in messages (e.g. noise_strength, --mask-noise)."""
        check("strength", strength, name)
        k = min(int(num_inference_steps * strength + 1e-9), num_inference_steps)
        if k < 1:
            raise ParameterError(f"{name} {strength} leaves no step out of {num_inference_steps} "
                                 f"(floor(steps * {name}) = 0); raise {name} or the number of steps.")
        return k

    def step_pairs(self, num_inference_steps: int, strength: float = 1.0, name: str = "strength",
                   steps_name: str = "num_inference_steps") -> list[tuple[int, int]]:
        """(t, t_prev) of the last k grid steps, in decoding order; the last t_prev is -1."""
        grid = self.timesteps(num_inference_steps, steps_name).tolist()  # first: a bad step count is named as such
        k = self.num_steps(num_inference_steps, strength, name)
        return list(zip(grid, grid[1:] + [-1]))[len(grid) - k:]

    def inverse_pairs(self, num_inference_steps: int, strength: float = 1.0) -> list[tuple[int, int]]:
        """(t_from, t_to) in encoding order: the mirror of `step_pairs`; the first t_from is -1."""
        return [(t_prev, t) for t, t_prev in reversed(self.step_pairs(num_inference_steps, strength))]

    # ------------------------------------------------------------------ the maths

    def _predict(self, model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                 prediction_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if prediction_type is not None and prediction_type not in PREDICTIONS:
            raise ParameterError(f"prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction.")
        out, x = model_output.float(), x_t.float()
        if (prediction_type or self.config.prediction_type) == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, sec. 4)
            return alpha_bar ** 0.5 * x - (1 - alpha_bar) ** 0.5 * out, alpha_bar ** 0.5 * out + (1 - alpha_bar) ** 0.5 * x
        return (x - (1 - alpha_bar) ** 0.5 * out) / alpha_bar ** 0.5, out  # "predicted x0" of DDIM eq. 12

    def predict_x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int,
                           prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_x0, eps) from the model output at timestep t; prediction_type defaults to the config's."""
        return self._predict(model_output, x_t, self.alpha_bar_at(t), prediction_type)

    def eps_from_x0(self, pred_x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The eps that makes x_t from pred_x0 at timestep t >= 0 (the forward process solved for eps)."""
        a = self.alpha_bar_at(t)
        return (x_t.float() - a ** 0.5 * pred_x0.float()) / (1 - a) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """A sample of q(x_t | x0), DDPM eq. 4 (Ho et al. 2020); t an int or one timestep per sample."""
        a = self.alpha_bar[torch.as_tensor(t).cpu()].to(x0.device)
        if a.ndim:
            a = a.view(-1, *(1,) * (x0.ndim - 1))  # (B,) -> (B, 1, ..., 1)
        return a ** 0.5 * x0.float() + (1 - a) ** 0.5 * noise.float()

    def _clip(self, pred_x0: torch.Tensor) -> torch.Tensor:
        bound = self.config.clip_sample_range
        return pred_x0.clamp(-bound, bound) if self.config.clip_sample else pred_x0

    def step(self, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, prediction_type: str | None = None) -> torch.Tensor:
        """x_{t_prev} from x_t, DDIM eq. 12:
            x_{t_prev} = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
            sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)       (DDIM eq. 16)
        eta = 0 is deterministic DDIM, eta = 1 DDPM's posterior. z is one float32 randn of x_t's shape
        drawn on the generator's device (diffusers' draw, so the same generator state gives the same z)."""
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        pred_x0, eps = self._predict(model_output, x_t, a_t, prediction_type)
        pred_x0 = self._clip(pred_x0)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            device = generator.device if generator is not None else x_t.device
            z = torch.randn(x_t.shape, generator=generator, device=device, dtype=torch.float32).to(x_t.device)
            x_prev = x_prev + sigma * z
        return x_prev

    def inverse_step(self, model_output: torch.Tensor, t_from: int, t_to: int, x: torch.Tensor,
                     prediction_type: str | None = None) -> torch.Tensor:
        """x_{t_to} from x = x_{t_from}, t_to > t_from: DDIM eq. 12 (eta = 0) read backwards, i.e. the
        DDIM ODE (eq. 13) integrated towards noise:
            x_{t_to} = sqrt(a_to) pred_x0 + sqrt(1 - a_to) eps,
        pred_x0 and eps from the model output on x at level t_from (t_from < 0: the clean image)."""
        a_from, a_to = self.alpha_bar_at(t_from), self.alpha_bar_at(t_to)
        pred_x0, eps = self._predict(model_output, x, a_from, prediction_type)
        pred_x0 = self._clip(pred_x0)
        return a_to ** 0.5 * pred_x0 + (1 - a_to) ** 0.5 * eps
