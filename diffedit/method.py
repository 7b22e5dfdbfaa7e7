"""DiffEdit (Couairon et al., ICLR 2023), the three steps, in tensor terms.

    1. mask    noise the image latent x0 n times to strength 0.5, predict the noise under the
               source text and under the target query, M = normalise(mean |eps_t - eps_s|)
    2. encode  DDIM-invert x0 along the sampling grid up to the encoding ratio r, keeping every
               intermediate latent x_t
    3. decode  DDIM-sample from x_r under the query; after every step, outside the mask, go back
               to the encoded latent of the same timestep:  y_t = M * y_t + (1 - M) * x_t

Latents here are the UNet's (already multiplied by the VAE scaling factor), fp32. The UNet is
reached through `predict_noise(x_t, t, context, level=None) -> eps`, which casts to the model's
dtype and converts v-predictions to epsilon, so this file never depends on the model's precision
or prediction type: the `sampler` given here must be an epsilon-prediction DDIM. `level` is the
timestep whose noise level x_t is at, used for that conversion; it is t except during inversion,
where the UNet is evaluated at the destination timestep on a latent of the level below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffedit.sampler import DDIM, classifier_free_guidance
from diffedit.settings import BLENDS  # noqa: F401  (the blends implemented by masked_ddim_decode)

PredictNoise = Callable[..., torch.Tensor]  # (x_t, t, context, level=None) -> eps, fp32


def predict_guided(predict_noise: PredictNoise, x_t: torch.Tensor, t, context: torch.Tensor,
                   uncond: torch.Tensor | None, guidance_scale: float, level: int | None = None) -> torch.Tensor:
    """eps under `context`, with classifier-free guidance when `uncond` is given and scale != 1
    (one UNet batch of 2B rows: unconditional first, as diffusers orders them)."""
    if uncond is None or guidance_scale == 1.0:
        return predict_noise(x_t, t, context, level)
    eps_uncond, eps_cond = predict_noise(torch.cat([x_t, x_t]), t, torch.cat([uncond, context]), level).chunk(2)
    return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)


# ------------------------------------------------------------------ DiffEdit step 1: the mask

def mask_noise_predictions(predict_noise: PredictNoise, sampler: DDIM, x0: torch.Tensor, noise: torch.Tensor,
                           t: int, source: torch.Tensor, target: torch.Tensor,
                           source_uncond: torch.Tensor | None = None, target_uncond: torch.Tensor | None = None,
                           guidance_scale: float = 1.0, chunk_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_target and eps_source, each (B, n, C, h, w), for n noisings of each image at timestep t.

    x0 (B, C, h, w), noise (B, n, C, h, w), source/target text states (B, L, D).
    Without negative prompts, or with equal ones, the result needs exactly 2n UNet samples per
    image: guidance u + g (c - u) with the same u for both texts makes the difference
    g (eps_target - eps_source), a constant factor that the per-image normalisation removes.
    Only negative prompts that differ (passed as source_uncond != target_uncond) make guidance
    change the map, and then it costs 4n samples. UNet batches hold at most `chunk_size` rows."""
    B, n = noise.shape[:2]
    x_t = sampler.add_noise(x0[:, None], noise, t).flatten(0, 1)  # (B*n, C, h, w)
    rows = [(x_t, source.repeat_interleave(n, 0)), (x_t, target.repeat_interleave(n, 0))]
    guided = guidance_scale != 1.0 and source_uncond is not None and target_uncond is not None \
        and not torch.equal(source_uncond, target_uncond)
    if guided:
        rows += [(x_t, source_uncond.repeat_interleave(n, 0)), (x_t, target_uncond.repeat_interleave(n, 0))]
    latents = torch.cat([x for x, _ in rows])
    contexts = torch.cat([c for _, c in rows])
    eps = torch.cat([predict_noise(latents[i:i + chunk_size], t, contexts[i:i + chunk_size])
                     for i in range(0, len(latents), chunk_size)])
    eps = eps.view(len(rows), B, n, *eps.shape[1:])  # (rows, B, n, C, h, w)
    if guided:
        return (classifier_free_guidance(eps[3], eps[1], guidance_scale),
                classifier_free_guidance(eps[2], eps[0], guidance_scale))
    return eps[1], eps[0]


class NoiseStream:
    """The mask's n noise samples of each image, (B, n, C, h, w) in (image, sample) order, handed
    out a few at a time: a given tensor is sliced (no copy); from a generator they are drawn in
    pieces of 16 samples (the last piece 16 to 31), which on the CPU gives exactly the values of
    one `torch.randn((B, n, C, h, w))` draw while never holding more than 31 samples."""

    PIECE = 16

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", noise: torch.Tensor | None = None):
        self.shape, self.generator, self.device = tuple(shape), generator, device
        self.flat = noise.flatten(0, 1) if noise is not None else None
        self.total, self.given, self.buffer = shape[0] * shape[1], 0, None

    def take(self, k: int) -> torch.Tensor:
        """The next k samples, (k, C, h, w), on `device`."""
        if self.flat is not None:
            out = self.flat[self.given:self.given + k]
        else:
            have = self.buffer
            while (0 if have is None else len(have)) < k:
                left = self.total - self.given - (0 if have is None else len(have))
                if left <= 0:
                    raise IndexError("NoiseStream: more samples taken than (B, n) holds")
                z = torch.randn((left if left < 2 * self.PIECE else self.PIECE, *self.shape[2:]),
                                generator=self.generator,
                                device=self.generator.device if self.generator is not None else "cpu")
                have = z if have is None else torch.cat([have, z])
            out, self.buffer = have[:k], (have[k:] if len(have) > k else None)
        self.given += k
        return out.to(self.device)


def mask_difference(predict_noise: PredictNoise, sampler: DDIM, x0: torch.Tensor, noise: NoiseStream, n: int,
                    t: int, source: torch.Tensor, target: torch.Tensor,
                    source_uncond: torch.Tensor | None = None, target_uncond: torch.Tensor | None = None,
                    guidance_scale: float = 1.0, chunk_size: int = 8, keep_per_sample: bool = False,
                    check: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `mask_noise_predictions` and `mask_maps.noise_difference` compute, streamed: the
    difference map (B, h, w) = mean over the n samples and the channels of |eps_target - eps_source|,
    and each sample's map (B, n, h, w) if `keep_per_sample` (else None). The UNet rows of one
    noise sample (source, target, and with differing negative prompts their unconditional rows)
    follow each other, `chunk_size` rows per batch; a sample is reduced into the running sum as
    soon as its rows are predicted, so memory does not depend on n. `check(eps)` sees each batch."""
    B = x0.shape[0]
    guided = guidance_scale != 1.0 and source_uncond is not None and target_uncond is not None \
        and not torch.equal(source_uncond, target_uncond)
    texts = [source, target] + ([source_uncond, target_uncond] if guided else [])
    R, total = len(texts), B * n * len(texts)
    total_sum = torch.zeros(B, *x0.shape[2:], device=x0.device)
    per_sample = torch.zeros(B, n, *x0.shape[2:], device=x0.device) if keep_per_sample else None
    noised: dict[int, torch.Tensor] = {}   # sample index (b * n + j) -> its x_t, while its rows are predicted
    pending: list[torch.Tensor] = []       # eps rows of the samples not yet reduced
    done = 0                               # samples reduced so far
    for row in range(0, total, chunk_size):
        rows = range(row, min(row + chunk_size, total))
        new = [s for s in dict.fromkeys(r // R for r in rows) if s not in noised]
        if new:
            fresh = noise.take(len(new))
            for s, z in zip(new, fresh):
                noised[s] = sampler.add_noise(x0[s // n], z, t)
        eps = predict_noise(torch.stack([noised[r // R] for r in rows]), t,
                            torch.stack([texts[r % R][r // R // n] for r in rows]))
        if check is not None:
            check(eps)
        pending.extend(eps)
        while len(pending) >= R:
            e, pending = pending[:R], pending[R:]
            eps_t, eps_s = (classifier_free_guidance(e[3], e[1], guidance_scale),
                            classifier_free_guidance(e[2], e[0], guidance_scale)) if guided else (e[1], e[0])
            d = (eps_t.float() - eps_s.float()).abs().mean(dim=0)  # (h, w)
            b, j = divmod(done, n)
            total_sum[b] += d
            if per_sample is not None:
                per_sample[b, j] = d
            del noised[done]
            done += 1
    return total_sum / n, per_sample


# ------------------------------------------------------------------ DiffEdit step 2: encoding

def ddim_invert(predict_noise: PredictNoise, sampler: DDIM, x0: torch.Tensor,
                pairs: list[tuple[int, int]], context: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance_scale: float = 1.0, callback: Callable | None = None) -> list[torch.Tensor]:
    """[x0, x_{t_1}, ..., x_{t_k}]: DDIM run backwards (DDIM eq. 12 reversed for inversion) over
    the (t_from, t_to) pairs. As in diffusers and null-text inversion, the UNet is evaluated at
    the destination timestep t_to on the latent of the previous level t_from (a v-prediction is
    read at the level t_from, as diffusers' DDIMInverseScheduler reads it)."""
    latents = [x0]
    x = x0
    for i, (t_from, t_to) in enumerate(pairs):
        eps = predict_guided(predict_noise, x, t_to, context, uncond, guidance_scale, level=t_from)
        x = sampler.inverse_step(eps, t_from, t_to, x)
        latents.append(x)
        if callback is not None:
            callback(i, t_to, x)
    return latents


# ------------------------------------------------------------------ DiffEdit step 3: decoding

@dataclass
class StepTrace:
    """What one decoding step saw and produced (given to the `callback` of `masked_ddim_decode`)."""
    index: int                     # step number, 0 = the noisiest
    t: int                         # timestep of the UNet call (y was at this level)
    t_prev: int                    # timestep reached by the step (-1: the clean image)
    y_t: torch.Tensor              # the edited latent after the step and the blend (level t_prev)
    x_t: torch.Tensor | None       # the input's latent pasted outside the mask (level t_prev for the
                                   # paper's blend, t for diffusers'; None: glide blend or no mask)
    pred_x0: torch.Tensor          # the UNet's (guided) estimate of the clean latent at this step
    mask: torch.Tensor | None      # the latent-resolution mask used


def masked_ddim_decode(predict_noise: PredictNoise, sampler: DDIM, y: torch.Tensor, pairs: list[tuple[int, int]],
                       context: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                       mask: torch.Tensor | None, reference: Callable[[int], torch.Tensor], x0: torch.Tensor,
                       blend: str = "paper", eta: float = 0.0, generator: torch.Generator | None = None,
                       callback: Callable[[StepTrace], None] | None = None) -> torch.Tensor:
    """DDIM sampling from y (at pairs[0][0]) under `context`, the region outside `mask` following
    the input. `reference(t)` gives the latent of the input at timestep t (encoded, or noised for
    the "w/o encoding" ablation; t < 0 gives x0). mask (B, 1, h, w) in [0, 1], or None for no
    masking (plain encode-decode, or SDEdit).

    blend "paper":     y_{t_prev} = M * y_{t_prev} + (1 - M) * x_{t_prev}   (DiffEdit sec. 3.2; the
                       last step pastes x0 itself)
    blend "diffusers": y_{t_prev} = M * y_{t_prev} + (1 - M) * x_t          (the deprecated pipeline:
                       one step off, x0 never pasted)
    blend "glide":     pred_x0 <- M * pred_x0 + (1 - M) * x0, then the DDIM step from that x0
                       along the model's own eps (GLIDE-style x0 interpolation)"""
    for i, (t, t_prev) in enumerate(pairs):
        eps = predict_guided(predict_noise, y, t, context, uncond, guidance_scale)
        pred_x0 = sampler.predict_x0_and_eps(eps, y, t)[0] if callback is not None or blend == "glide" else None
        y_in = y
        if mask is not None and blend == "glide":
            # add_noise(x0', eps, t) is the latent whose DDIM decomposition is (x0', eps), so `step`
            # takes the blended clean latent along the model's noise direction (eq. 12 unchanged).
            y_in = sampler.add_noise(mask * pred_x0 + (1 - mask) * x0, eps, t)
        y_next = sampler.step(eps, t, t_prev, y_in, eta=eta, generator=generator)
        x_ref = None
        if mask is not None and blend != "glide":
            x_ref = reference(t_prev if blend == "paper" else t)
            y_next = mask * y_next + (1 - mask) * x_ref
        if callback is not None:
            callback(StepTrace(i, int(t), int(t_prev), y_next, x_ref, pred_x0, mask))
        y = y_next
    return y
