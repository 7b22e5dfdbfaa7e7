"""The public API: `DiffEditPipeline`, in the names users of diffusers' pipeline know.

    pipe = DiffEditPipeline.from_pretrained(path_or_id)          # or no argument: the embedded model
    mask = pipe.generate_mask(image, source_prompt, target_prompt)  # DiffEdit step 1
    inv = pipe.invert(image)                                      # step 2 (unconditional DDIM)
    out = pipe.edit(inv, mask, target_prompt)                     # step 3
    res = pipe(image, source_prompt=..., target_prompt=...)       # all three, one VAE encode

The maths lives in method.py; this file turns images and prompts into tensors, caches what
does not change (text embeddings per prompt, the latents of an image), counts UNet samples and
checks the numbers stay finite.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from diffedit import method
from diffedit.arguments import (
    check_finite,
    check_prompt_pairs,
    door,
    finite_decode_callback,
    finite_inversion_callback,
    prompts,
)
from diffedit.checkpoints.loading import StableDiffusion, load_model
from diffedit.devices import parse_device, parse_dtype
from diffedit.errors import ModelLoadError, ParameterError
from diffedit.io.images import as_pil, fit_to_model, load_image, restore
from diffedit.io.pictures import latent_mask_of, mask_to_pil
from diffedit.mask_maps import maps_of_difference
from diffedit.models import host_memory, packed_conv, packed_linear
from diffedit.models.vae import decode_sliced, encode_sliced
from diffedit.models.unet import text_projections_reused
from diffedit.results import (
    Counters,
    DiffEditResult,
    EditResult,
    EncodedImage,
    Inversion,
    MaskResult,
)
from diffedit.sampler import DDIM
from diffedit.settings import DEFAULT

__all__ = ["DiffEditPipeline", "check_prompt_pairs"]
PROMPTS_KEPT = 256     # encoded prompts kept per pipeline (SD 1.x: 0.24 MB each in fp32)
PER_SAMPLE_UP_TO = 64  # MaskResult.per_sample is kept up to this n unless asked (memory grows with n)

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "weights" / "shapes-64"
ImageInput = "str | os.PathLike | PIL.Image.Image | torch.Tensor | EncodedImage"


class DiffEditPipeline:
    def __init__(self, model: StableDiffusion, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.config = model.config
        self.tokenizer, self.text_encoder, self.vae, self.unet = model.tokenizer, model.text_encoder, model.vae, model.unet
        # predict_noise hands the method epsilon whatever the model predicts, so the sampler is
        # the checkpoint's schedule read as an epsilon-prediction one.
        self.prediction_type = model.config.scheduler.prediction_type
        self.scheduler = DDIM(replace(model.config.scheduler, prediction_type="epsilon"))
        self.device, self.dtype = device, dtype
        self.counters = Counters()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._latent_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, variant: str | None = None,
                        preset: str | None = None, pack_convolutions: bool = True,
                        linear_backend: str | None = None) -> "DiffEditPipeline":
        """Load a diffusers-layout folder, a single original-layout file or a hub id (None: the
        small model embedded in the repository). On the CPU the UNet's and VAE's 3x3 convolutions
        (in bf16 the 1x1 ones too) keep their weights in oneDNN's layout (models/packed_conv.py:
        same results up to rounding, faster; figures in the README); pack_convolutions=False keeps
        plain `nn.Conv2d`s. The linear layers of all three models run on `linear_backend` ("auto",
        "torch", "onednn", "kernel"; None: the DIFFEDIT_CPU_LINEAR variable, else "auto";
        models/packed_linear.py); on "kernel", with packed convolutions, the UNet's and VAE's 1x1
        convolutions too."""
        if not isinstance(pack_convolutions, bool):
            raise ParameterError(f"pack_convolutions must be True or False, got {pack_convolutions!r}.")
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
        linear = packed_linear.linear_backend(device, dtype, linear_backend)  # refuses before loading
        if path_or_id is None and not EMBEDDED_MODEL.is_dir():
            raise ModelLoadError(f"the embedded model {EMBEDDED_MODEL} is not installed; pass a model folder, a "
                                 "checkpoint file or a hub id (--model on the command line).")
        with host_memory.big_blocks_mapped():  # no heap holes from loading and repacking (host_memory.py)
            model = load_model(EMBEDDED_MODEL if path_or_id is None else path_or_id, device, dtype, variant, preset)
            if dtype == torch.bfloat16 and device.type == "cpu":
                model.unet.to(memory_format=torch.channels_last)
                model.vae.to(memory_format=torch.channels_last)
            if pack_convolutions and packed_conv.can_pack(device, dtype):
                one_by_one = dtype == torch.bfloat16  # 1x1 too: faster in bf16 only (packed_conv.py)
                for network in (model.unet, model.vae):
                    packed_conv.pack_convolutions(network, one_by_one)
                    if linear == "kernel":  # fp32 1x1s on the linear kernel: the activations are channels-last now
                        packed_linear.pack_pointwise_convolutions(network)
            if linear != "torch":
                for network in (model.unet, model.vae, model.text_encoder):
                    packed_linear.pack_linears(network, linear)
        host_memory.release_free_heap()
        return cls(model, device, dtype)

    # ------------------------------------------------------------------ model calls

    def encode_prompt(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text hidden states (B, L, D) in the model dtype. The last PROMPTS_KEPT prompts are kept, so a
        prompt in use is encoded once, and a long sweep's memory does not grow with its prompts."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        cache = self._prompt_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            ids = self.tokenizer(missing).to(self.device)
            with torch.inference_mode():
                states = self.text_encoder(ids)
            self.counters.text_encodes += len(missing)
            cache.update((p, state.clone()) for p, state in zip(missing, states))  # not views of the batch
        for p in dict.fromkeys(prompts):
            cache.move_to_end(p)
        states = torch.stack([cache[p] for p in prompts])
        while len(cache) > PROMPTS_KEPT:
            cache.popitem(last=False)
        return states

    def predict_noise(self, x_t: torch.Tensor, t, context: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """The UNet's noise prediction eps (fp32) for fp32 latents x_t at timestep t; v-prediction
        models are converted to epsilon here (eps = sqrt(a) v + sqrt(1 - a) x_t, a = alpha_bar at
        `level`, the noise level of x_t: t unless given), so the method only ever sees eps."""
        x = x_t.to(self.dtype)
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.unet(x, t, context).float()
        self.counters.unet_samples += x_t.shape[0]
        if self.prediction_type == "v_prediction":
            out = self.scheduler.predict_x0_and_eps(out, x_t, t if level is None else level, "v_prediction")[1]
        return out

    @door
    def encode_image(self, image, sample_posterior: bool = False, generator: torch.Generator | None = None,
                     resolution: int | None = None) -> EncodedImage:
        """Load, fit to a multiple of 8 and VAE-encode one image or a list of same-size images.
        The posterior mean is cached per pixel content: generate_mask, invert and __call__ on the
        same image encode it once."""
        if isinstance(image, EncodedImage):
            return image
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        inputs = [load_image(x) if isinstance(x, (str, os.PathLike)) else as_pil(x) for x in images]
        native = resolution or self.config.resolution
        fitted = [fit_to_model(img, multiple=8, max_side=native) for img in inputs]
        sizes = {tuple(px.shape[-2:]) for px, _ in fitted}
        if len(sizes) > 1:
            raise ParameterError(f"the images of one batch must have the same size after fitting (got {sorted(sizes)}); "
                                 "resize them to one size or run them separately.")
        pixels = torch.cat([px for px, _ in fitted]).to(self.device)
        latents = self._encode_pixels(pixels, sample_posterior, generator)
        return EncodedImage(pixels=pixels, latents=latents, geometry=[g for _, g in fitted], inputs=inputs)

    def _encode_pixels(self, pixels: torch.Tensor, sample_posterior: bool, generator) -> torch.Tensor:
        key = None
        if not sample_posterior:
            key = hashlib.sha1(pixels.cpu().numpy().tobytes() + str(pixels.shape).encode()).hexdigest()
            if key in self._latent_cache:
                self._latent_cache.move_to_end(key)
                return self._latent_cache[key]
        x = pixels.to(self.dtype)
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            posterior = encode_sliced(self.vae, x)  # one image at a time, tiled above vae.TILE_ABOVE px
            z = posterior.sample(generator) if sample_posterior else posterior.mean
        self.counters.vae_encodes += pixels.shape[0]
        latents = z.float() * self.config.vae.scaling_factor
        check_finite(latents, "the VAE encoding", self.dtype)
        if key is not None:
            self._latent_cache[key] = latents
            if len(self._latent_cache) > 16:
                self._latent_cache.popitem(last=False)
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w), C the VAE's latent channels -> images in [-1, 1] (fp32), clamped."""
        channels = self.config.vae.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != channels:
            shown = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ParameterError(f"latents must be a tensor (batch, {channels}, height / 8, width / 8), got {shown}.")
        z = (latents / self.config.vae.scaling_factor).to(self.dtype)
        with torch.inference_mode():
            pixels = decode_sliced(self.vae, z).float()
        self.counters.vae_decodes += latents.shape[0]
        check_finite(pixels, "the VAE decoding", self.dtype)
        return pixels.clamp(-1, 1)

    # ------------------------------------------------------------------ DiffEdit step 1

    @door
    def generate_mask(self, image, source_prompt: str | Sequence[str] = "", target_prompt: str | Sequence[str] = "",
                      *, num_samples: int = DEFAULT["mask_samples"],
                      noise_strength: float = DEFAULT["mask_noise_strength"],
                      num_inference_steps: int = DEFAULT["num_inference_steps"],
                      normalization: str = DEFAULT["normalization"], threshold: float = DEFAULT["threshold"],
                      clamp_std: float = DEFAULT["clamp_std"], mean_ratio: float = DEFAULT["mean_ratio"],
                      guidance_scale: float = DEFAULT["mask_guidance_scale"],
                      source_negative_prompt: str | Sequence[str] | None = None,
                      target_negative_prompt: str | Sequence[str] | None = None,
                      blur: float = DEFAULT["blur"], dilate: int = DEFAULT["dilate"],
                      chunk_size: int | None = DEFAULT["chunk_size"],
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                      resolution: int | None = None, return_per_sample: bool | None = None) -> MaskResult:
        """The mask (paper step 1): noise the image `num_samples` times to `noise_strength` (the
        timestep of that strength on the `num_inference_steps` grid), compare the noise
        predicted under `target_prompt` (the query) and `source_prompt` (a caption, or "").

        normalization "paper" (outlier clamp, rescale to [0, 1]) or "mean_ratio" (diffusers'
        clamp at mean_ratio x mean), per image; mask = soft > threshold; `blur` (Gaussian sigma
        in latent cells) smooths the map before thresholding, `dilate` grows the mask by that
        many latent cells. Guidance only matters with two different negative prompts (one given
        means "" for the other). `noise` (B, n, C, h, w), if given, replaces the n samples drawn
        from `generator` (and sets n). UNet batches hold at most `chunk_size` rows (default: 2
        on the CPU, where the packed UNet costs the same per sample at batch 2 as at 8 and 10
        and the decoding runs at batch 2 too, so the weights stay packed for one shape; 8 on GPUs).
        The samples are streamed, so memory does not depend on n; the per-sample maps (B, n, h, w)
        are kept with return_per_sample=True, by default (None) only up to n = PER_SAMPLE_UP_TO.
        One `generator` draws a batch's noise image after image, so an image's mask depends on its
        place in the batch; to reproduce one image's mask, run it alone with the same seed."""
        if chunk_size is None:
            chunk_size = 2 if self.device.type == "cpu" else 8
        encoded = self.encode_image(image, resolution=resolution)
        B = encoded.latents.shape[0]
        sources, targets = prompts(source_prompt, B, "source_prompt"), prompts(target_prompt, B, "target_prompt")
        check_prompt_pairs(sources, targets, lambda text: self.tokenizer.encode(text)[:self.tokenizer.max_length - 2])
        t = self.scheduler.step_pairs(num_inference_steps, noise_strength, "noise_strength")[0][0]
        x0 = encoded.latents
        if noise is not None and (noise.dim() != 5 or noise.shape[0] != B or noise.shape[2:] != x0.shape[1:]):
            raise ParameterError(f"noise must have shape (batch, samples, {', '.join(map(str, x0.shape[1:]))}) for "
                                 f"these images, got {tuple(noise.shape)}; or pass no noise and a generator.")
        n = num_samples if noise is None else noise.shape[1]
        uncond = [None, None]  # one negative prompt given means the other is "" (unconditional)
        if guidance_scale != 1.0 and (source_negative_prompt, target_negative_prompt) != (None, None):
            uncond = [self.encode_prompt(prompts(negative if negative is not None else "", B, "negative prompt"))
                      for negative in (source_negative_prompt, target_negative_prompt)]
        with text_projections_reused(self.unet):
            difference, per_sample = method.mask_difference(
                self.predict_noise, self.scheduler, x0, method.NoiseStream((B, n, *x0.shape[1:]), generator, x0.device,
                                                                           noise), n, t,
                self.encode_prompt(sources), self.encode_prompt(targets), uncond[0], uncond[1], guidance_scale, chunk_size,
                n <= PER_SAMPLE_UP_TO if return_per_sample is None else return_per_sample,
                check=lambda eps: check_finite(eps, f"the mask's noise predictions (t={int(t)})", self.dtype))
        maps = maps_of_difference(difference, normalization, threshold, clamp_std, mean_ratio, blur, dilate)
        soft = maps.soft
        return MaskResult(
            mask=maps.mask, soft=soft, difference=maps.difference,
            per_sample=per_sample, timestep=int(t),
            threshold=threshold, encoded=encoded,
            # pixel masks: the soft map upsampled bilinearly, then thresholded (no blocky edge)
            mask_images=[mask_to_pil(soft[b], g, threshold=threshold) for b, g in enumerate(encoded.geometry)],
            soft_images=[mask_to_pil(soft[b], g) for b, g in enumerate(encoded.geometry)])

    # ------------------------------------------------------------------ DiffEdit step 2

    @door
    def invert(self, image, prompt: str | Sequence[str] = "", *, strength: float = DEFAULT["strength"],
               num_inference_steps: int = DEFAULT["num_inference_steps"],
               guidance_scale: float = DEFAULT["inversion_guidance_scale"], negative_prompt: str | Sequence[str] | None = None,
               sample_posterior: bool = False, generator: torch.Generator | None = None,
               resolution: int | None = None,
               callback: Callable[[int, int, torch.Tensor], None] | None = None) -> Inversion:
        """DDIM encoding (paper step 2) up to `strength` = r on the `num_inference_steps` grid.
        Unconditional by default (prompt "", no guidance), as the paper encodes; every
        intermediate latent is kept, so one inversion serves every edit strength <= r.
        `callback(i, t, x)` is called after each step i with the timestep t reached and its latent x."""
        encoded = self.encode_image(image, sample_posterior=sample_posterior, generator=generator,
                                    resolution=resolution)
        B = encoded.latents.shape[0]
        texts = prompts(prompt, B, "prompt")
        negatives = prompts(negative_prompt if negative_prompt is not None else "", B, "negative prompt")
        pairs = self.scheduler.inverse_pairs(num_inference_steps, strength)
        uncond = self.encode_prompt(negatives) if guidance_scale != 1.0 else None
        with text_projections_reused(self.unet):
            latents = method.ddim_invert(self.predict_noise, self.scheduler, encoded.latents, pairs,
                                         self.encode_prompt(texts), uncond, guidance_scale,
                                         callback=finite_inversion_callback(self.dtype, callback))
        return Inversion(latents=torch.stack(latents, dim=1), timesteps=[int(t) for _, t in pairs],
                         num_inference_steps=num_inference_steps, strength=strength, prompt=texts,
                         guidance_scale=guidance_scale, negative_prompt=negatives if uncond is not None else None,
                         encoded=encoded)

    # ------------------------------------------------------------------ DiffEdit step 3

    @door
    def edit(self, inversion: Inversion, mask, prompt: str | Sequence[str], *, strength: float | None = None,
             num_inference_steps: int | None = None, guidance_scale: float = DEFAULT["guidance_scale"],
             negative_prompt: str | Sequence[str] | None = None, blend: str = DEFAULT["blend"],
             soft_mask: bool = DEFAULT["soft_mask"], encode: bool = DEFAULT["encode"],
             use_mask: bool = DEFAULT["use_mask"], eta: float = DEFAULT["eta"], generator: torch.Generator | None = None,
             callback: Callable[[method.StepTrace], None] | None = None) -> EditResult:
        """Decode under `prompt` from the encoded latent at `strength` (default: the inversion's),
        the region outside `mask` following the encoded latents (paper step 3).

        Ablations: use_mask=False (encode-decode, no mask), encode=False (start from and blend
        with noised latents: "DiffEdit w/o encoding"), both False = SDEdit; blend "paper",
        "glide" (x0 interpolation) or "diffusers" (the deprecated pipeline's off-by-one blend).
        A strength above the inversion's, or another step count, re-runs the inversion. `mask`: a
        MaskResult (its binary mask, or its soft map with soft_mask=True), or a tensor, array,
        image or path (1 = edit) of latent or pixel size; a pixel mask is averaged over each latent
        cell, and without soft_mask a cell is edited when that average is at least 0.5."""
        steps = num_inference_steps or inversion.num_inference_steps
        strength = inversion.strength if strength is None else strength
        pairs = self.scheduler.step_pairs(steps, strength)
        if float(self.scheduler.alpha_bar_at(pairs[0][0])) == 0.0:   # zero terminal SNR, the last timestep
            raise ParameterError(f"this model's schedule has no signal left at timestep {pairs[0][0]} (alpha_bar = 0, "
                                 f"zero terminal SNR), where a noise prediction cannot give the image back; use a "
                                 f"strength below 1 (e.g. {1 - 1 / steps:g}).")
        if encode and (steps != inversion.num_inference_steps or strength > inversion.strength):
            inversion = self.invert(inversion.encoded, inversion.prompt, strength=strength, num_inference_steps=steps,
                                    guidance_scale=inversion.guidance_scale, negative_prompt=inversion.negative_prompt)
        encoded = inversion.encoded
        B = encoded.latents.shape[0]
        x0 = encoded.latents
        texts = prompts(prompt, B, "prompt")
        negatives = prompts(negative_prompt if negative_prompt is not None else "", B, "negative prompt")
        latent_mask = latent_mask_of(mask, x0, soft_mask) if use_mask else None
        if latent_mask is not None and not bool(latent_mask.any()):
            warnings.warn("the mask is empty (no latent cell is marked), so the edit only reconstructs the input; "
                          "mark a region, or for a generated mask lower the threshold or rephrase the prompts.",
                          UserWarning, stacklevel=3)
        if encode:
            reference = inversion.latent_at
        else:
            def reference(t: int) -> torch.Tensor:  # a fresh q(x_t | x0) sample at every step
                if t < 0:
                    return x0
                fresh = torch.randn(x0.shape, generator=generator, device=_gen_device(generator)).to(x0.device)
                return self.scheduler.add_noise(x0, fresh, t)
        y = reference(pairs[0][0])
        uncond = self.encode_prompt(negatives) if guidance_scale != 1.0 else None
        with text_projections_reused(self.unet):
            y = method.masked_ddim_decode(self.predict_noise, self.scheduler, y, pairs, self.encode_prompt(texts),
                                          uncond, guidance_scale, latent_mask, reference, x0, blend, eta, generator,
                                          callback=finite_decode_callback(self.dtype, callback))
        pixels = self.decode_latents(y)
        images = [restore(pixels[b], g) for b, g in enumerate(encoded.geometry)]
        settings = dict(strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, blend=blend,
                        soft_mask=soft_mask, encode=encode, use_mask=use_mask, eta=eta)
        return EditResult(images=images, pixels=pixels, latents=y, mask=latent_mask,
                          timesteps=[int(t) for t, _ in pairs], settings=settings)

    # ------------------------------------------------------------------ one shot

    @door
    def __call__(self, image, source_prompt: str | Sequence[str] = "", target_prompt: str | Sequence[str] = "", *,
                 strength: float = DEFAULT["strength"], num_inference_steps: int = DEFAULT["num_inference_steps"],
                 guidance_scale: float = DEFAULT["guidance_scale"], negative_prompt: str | Sequence[str] | None = None,
                 num_mask_samples: int = DEFAULT["mask_samples"],
                 mask_noise_strength: float = DEFAULT["mask_noise_strength"],
                 mask_threshold: float = DEFAULT["threshold"], mask_normalization: str = DEFAULT["normalization"],
                 mask=None, blend: str = DEFAULT["blend"], soft_mask: bool = DEFAULT["soft_mask"],
                 encode: bool = DEFAULT["encode"], use_mask: bool = DEFAULT["use_mask"], generator: torch.Generator | None = None, resolution: int | None = None,
                 callback: Callable | None = None) -> DiffEditResult:
        """generate_mask + invert + edit on one encoded image (given `mask` skips step 1).
        `callback` receives a method.StepTrace per decoding step."""
        before = self.counters.as_dict()
        self.scheduler.step_pairs(num_inference_steps, strength)
        if mask is None and use_mask:
            self.scheduler.step_pairs(num_inference_steps, mask_noise_strength, "mask_noise_strength")
        encoded = self.encode_image(image, resolution=resolution)
        if mask is None and use_mask:
            mask = self.generate_mask(encoded, source_prompt, target_prompt, num_samples=num_mask_samples,
                                      noise_strength=mask_noise_strength, num_inference_steps=num_inference_steps,
                                      normalization=mask_normalization, threshold=mask_threshold,
                                      generator=generator)
        if encode:
            inversion = self.invert(encoded, strength=strength, num_inference_steps=num_inference_steps)
        else:
            inversion = Inversion.unencoded(encoded, num_inference_steps, strength)
        out = self.edit(inversion, mask, target_prompt, strength=strength, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, negative_prompt=negative_prompt, blend=blend,
                        soft_mask=soft_mask, encode=encode, use_mask=use_mask, generator=generator, callback=callback)
        spent = {k: v - before[k] for k, v in self.counters.as_dict().items()}
        return DiffEditResult(images=out.images, mask=mask if isinstance(mask, MaskResult) else None,
                              inversion=inversion if encode else None, edit=out, counters=spent)


# ---------------------------------------------------------------------- helpers

def _gen_device(generator: torch.Generator | None) -> str | torch.device:
    return generator.device if generator is not None else "cpu"
