"""The model card of the embedded model: what it is, how it was trained, what it can and cannot do."""

from __future__ import annotations

import torch

from diffedit.devices import cpu_name
from diffedit.shapes import world


def model_card(tc, n_params: int, minutes: float) -> str:
    """The README.md of the trained model folder (tc: the run's TrainConfig)."""
    return f"""# shapes-64: the embedded DiffEdit demo model

A {n_params / 1e6:.1f} M-parameter latent diffusion model with Stable Diffusion 1.x's architecture
(CLIP text transformer, KL autoencoder, cross-attention UNet, SD's noise schedule) at a tiny size,
trained from scratch by `python -m diffedit.shapes.training` (diffedit/shapes/training.py) on the synthetic
shapes world of diffedit/shapes/world.py: 64 x 64 images of one to three circles, squares and
triangles in six colours on plain or textured backgrounds, with captions such as
"a red circle and a blue square on a striped gray background". It loads with this repository's
classes and with diffusers' (`StableDiffusionPipeline.from_pretrained`).

## Training
- Data: {tc.scenes} scenes in {tc.scenes // 2} minimal pairs: each training seed's scene and the same
  scene with one object's colour or shape changed, trained with the same noise and timestep, so
  that the caption's one changed word is the only explanation of the difference.
- Autoencoder: {tc.vae_steps} steps x {tc.vae_batch} crops of {tc.vae_crop} px, L1 + MSE + {tc.kl_weight:g} KL.
- UNet + text encoder, jointly from scratch: {tc.unet_steps} steps x {tc.unet_batch} latents, AdamW at
  {tc.unet_lr:g} (warm-up {tc.warmup}, cosine to 10 %), caption dropped {tc.uncond_prob:.0%} of the time
  (for classifier-free guidance), EMA {tc.ema_decay} (what is saved); the noise loss weighted over t:
  {tc.loss_weight} (diffedit/shapes/training.py, `loss_weights`).
- Seed {tc.seed}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {minutes:.0f} minutes on
  {cpu_name()}.
  The same command, seed, software, CPU kind and thread count give the same weights bit for bit
  (other CPU kinds or thread counts give slightly different weights). A checkpoint is saved every
  {tc.checkpoint_every} steps; `--resume` continues an interrupted run to the same weights.
- training_log.txt: the loss curve and timings.

## What it can do, and cannot
It generates and edits scenes of this world (colour and shape edits of one object) with DiffEdit,
in seconds on a CPU, and its outputs can be scored against the world's ground truth
(`diffedit eval shapes`; the repository README's section on the embedded model has this model's
table). It knows nothing outside the world: words outside its {len(world.vocabulary())}-word vocabulary
({", ".join(world.vocabulary())}), photographs, other sizes than 64 x 64, more than three objects, text
rendering. A prompt with other words is not refused: the tokenizer spells them in byte pieces that
training never showed, the edit follows whatever the model makes of them, and a warning
(`UnknownWordWarning`) names them. It is a teaching and testing model, not an image generator.

License: MIT, like the repository.
"""
