"""The embedded model's training recipe as data: `TrainConfig` (every setting of
`python -m diffedit.shapes.training`), QUICK (a smoke test), and `check_config`, which refuses in
one sentence, before any work, a config the training cannot run as its fields say."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffedit.errors import ParameterError
from diffedit.settings import MAX_SEED
from diffedit.shapes.world import IMAGE_SIZE, TRAINING_SEEDS

LOSS_WEIGHTS = ("simple", "p2", "v-capped")   # training.loss_weights implements the three


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0                  # every random draw (the scenes are those of world seeds 0 .. scenes / 2 - 1)
    scenes: int = 24000            # training scenes, rendered once: scenes / 2 seeds, each with its edited twin
    vae_steps: int = 3000          # autoencoder optimisation steps
    vae_batch: int = 16            # random crops per autoencoder step
    vae_crop: int = 32             # crop side: the convolutional autoencoder trains 4x cheaper on 32 px crops
    vae_lr: float = 1.5e-3           # AdamW peak learning rate of the autoencoder
    kl_weight: float = 1e-6        # weight of the KL term (SD: 1e-6): a nearly deterministic autoencoder
    unet_steps: int = 6400         # UNet + text encoder optimisation steps
    unet_batch: int = 32           # latents per UNet step (unet_batch / 2 minimal pairs)
    unet_lr: float = 1e-3          # AdamW peak learning rate of UNet and text encoder
    warmup: int = 100              # linear warm-up steps, then cosine decay to 10 % of the peak
    uncond_prob: float = 0.1       # probability of training on the empty caption (for CFG)
    ema_decay: float = 0.999       # EMA of the UNet/text weights (what gets saved)
    bf16: bool = False             # bf16 autocast (much slower than fp32 for training on CPUs without native bf16)
    log_every: int = 50            # steps between log lines
    checkpoint_every: int = 250    # UNet steps between checkpoints (and after the autoencoder)
    snapshot_every: int = 0        # UNet steps between saved intermediate models (0: none), to measure progress
    loss_weight: str = "simple"    # weight of the noise loss over t (LOSS_WEIGHTS): "simple", "p2" or "v-capped"


QUICK = TrainConfig(scenes=64, vae_steps=3, vae_batch=4, vae_crop=32, unet_steps=3, unet_batch=4, warmup=1, log_every=1,
                    checkpoint_every=2)

INTEGER_FIELDS = {  # field: (lowest, highest or None, a multiple of)
    "seed": (0, MAX_SEED - 2, 1),                  # the UNet stage draws from seed + 1
    "scenes": (2, 2 * len(TRAINING_SEEDS), 2),     # a seed's scene and its edited twin
    "vae_steps": (1, None, 1),
    "vae_batch": (1, None, 1),
    "vae_crop": (4, IMAGE_SIZE, 4),                # crops lie on the 4-px latent grid
    "unet_steps": (1, None, 1),
    "unet_batch": (2, None, 2),                    # minimal pairs
    "warmup": (0, None, 1),
    "log_every": (1, None, 1),
    "checkpoint_every": (1, None, 1),
    "snapshot_every": (0, None, 1),
}
NUMBER_FIELDS = {  # field: (allowed?, the allowed values in words)
    "vae_lr": (lambda v: v > 0, "a number > 0"),
    "unet_lr": (lambda v: v > 0, "a number > 0"),
    "kl_weight": (lambda v: v >= 0, "a number >= 0"),
    "uncond_prob": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ema_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def _integer_words(low: int, high: int | None, step: int) -> str:
    noun = {1: "an integer", 2: "an even integer"}.get(step, f"a multiple of {step}")
    return f"{noun} >= {low}" if high is None else f"{noun} in [{low}, {high}]"


def check_config(tc: TrainConfig) -> None:
    """ParameterError, in one sentence naming the field, unless the training can run `tc` as it says."""
    for name, (low, high, step) in INTEGER_FIELDS.items():
        value = getattr(tc, name)
        if (not isinstance(value, int) or isinstance(value, bool) or value < low
                or (high is not None and value > high) or value % step):
            raise ParameterError(f"{name} must be {_integer_words(low, high, step)}, got {value!r}.")
    for name, (allowed, words) in NUMBER_FIELDS.items():
        value = getattr(tc, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or (isinstance(value, float) and not math.isfinite(value)) or not allowed(value):
            raise ParameterError(f"{name} must be {words}, got {value!r}.")
    if not isinstance(tc.bf16, bool):
        raise ParameterError(f"bf16 must be True or False, got {tc.bf16!r}.")
    if tc.loss_weight not in LOSS_WEIGHTS:
        raise ParameterError(f"unknown loss weight {tc.loss_weight!r}; choose one of {', '.join(LOSS_WEIGHTS)}.")
