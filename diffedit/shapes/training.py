"""Training the embedded model: a tiny Stable Diffusion (same classes as SD 1.x, small configs)
on the synthetic shapes world (shapes/world.py), from nothing, on a laptop CPU.

    python -m diffedit.shapes.training --out weights/shapes-64 [--seed 0] [--quick] [--resume]

Four stages, as SD itself was built (Rombach et al. 2022), each logged:
  1. tokenizer   a CLIP-style byte-level BPE learnt on the captions (tokenizer.train_bpe)
  2. VAE         KL autoencoder, 64 x 64 x 3 pixels <-> 4 x 16 x 16 latents (4x down, not SD's 8x:
                 a 64 px image would leave 8 x 8 latents, too coarse for 8 px objects)
                 loss = L1 + MSE reconstruction + kl_weight * KL(q(z|x) || N(0, I))
  3. latents     every training scene encoded once (posterior mean); scaling_factor = 1 / std(z),
                 SD's own recipe for its 0.18215
  4. UNet + text encoder, jointly: the DDPM objective (Ho et al. 2020) on SD's scaled-linear
                 schedule, w(t) || eps - eps_theta(sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps, t, c) ||^2
                 (w = 1 is DDPM's simple loss; `loss_weights` has the others), with the caption
                 dropped to "" for 10 % of samples (classifier-free guidance) and an exponential
                 moving average of the weights, which is what is saved.

The scenes come in minimal pairs: every training seed's scene and the same scene with one object's
colour or shape changed (world.make_edit), trained with the same noise and timestep, so that the
only difference the UNet sees between the two is the edited object and the one changed word.

The settings are a `TrainConfig` (train_config.py), refused in one sentence before any work when
the training cannot run them as they say. Everything is drawn from `--seed`: the same seed and step
counts give the same weights on the same machine (2 threads; thread count and CPU type may change
the last bits). The run saves a checkpoint (`.<out>.checkpoint.pt` beside `out`: weights, optimiser,
random state) every `checkpoint_every` steps; `--resume` continues from it and gives the same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffedit.checkpoints.export import save_pretrained
from diffedit.errors import DiffEditError, ParameterError
from diffedit.io.files import atomic_write, check_output
from diffedit.models.clip import TextEncoder
from diffedit.models.config import (
    PRESETS,
    ModelConfig,
    TextEncoderConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)
from diffedit.models.tokenizer import Tokenizer, train_bpe
from diffedit.models.unet import UNet
from diffedit.models.vae import AutoencoderKL
from diffedit.sampler import DDIM
from diffedit.shapes import world as world
from diffedit.shapes.card import model_card
from diffedit.shapes.train_config import LOSS_WEIGHTS, QUICK, TrainConfig, check_config


def model_config(tokenizer: Tokenizer, scaling_factor: float = 1.0) -> ModelConfig:
    """The embedded model's architecture: SD 1.x's blocks at a tiny size."""
    width = 128
    return ModelConfig(
        text_encoder=TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length, width=width,
                                       layers=2, heads=4, mlp_width=2 * width, activation="quick_gelu"),
        vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                      scaling_factor=scaling_factor),
        unet=UNetConfig(block_out_channels=(48, 96), layers_per_block=1, cross_attention=(True, True),
                        heads=(4, 4), cross_attention_dim=width, norm_num_groups=16, sample_size=16),
        scheduler=PRESETS["sd1"].scheduler,
        tokenizer=TokenizerConfig(max_length=tokenizer.max_length, pad_token=tokenizer.pad_token),
        resolution=world.IMAGE_SIZE,
    )


class Logger:
    """Timestamped log lines; a resumed run continues the clock and the lines of the interrupted one."""

    def __init__(self, path: Path | None, lines: list[str] = (), elapsed: float = 0.0):
        self.start = time.perf_counter() - elapsed
        self.lines: list[str] = list(lines)
        self.path = path

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)


def loss_weights(name: str, alpha_bar: torch.Tensor) -> torch.Tensor:
    """w(t) of the weighted DDPM loss  w(t) || eps - eps_theta(z_t, t, c) ||^2, normalised to mean 1 over t.

    simple    1 for every t (DDPM eq. 14): an error in the predicted image counts SNR(t) times, so
              the noisy steps, where the colour must come from the caption, weigh little.
    p2        1 - alpha_bar = 1 / (1 + SNR) (P2 weighting, Choi et al. 2022, k = 1, gamma = 1):
              the near-clean steps weigh less.
    v-capped  min(1 / alpha_bar, 10): || v - v_theta ||^2 = || eps - eps_theta ||^2 / alpha_bar, the weight
              v-prediction (Salimans & Ho 2022) puts on the noise loss, capped: the noisy steps weigh more.
    The model predicts the noise in every case."""
    alpha_bar = alpha_bar.double()
    if name == "simple":
        w = torch.ones_like(alpha_bar)
    elif name == "p2":
        w = 1 - alpha_bar
    elif name == "v-capped":
        w = (1 / alpha_bar).clamp(max=10.0)
    else:
        raise ParameterError(f"unknown loss weight {name!r}; choose one of {', '.join(LOSS_WEIGHTS)}.")
    return (w / w.mean()).float()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tokenizer(captions: list[str]) -> Tokenizer:
    """Stage 1: a BPE over the caption words; 24 positions hold the longest caption (16 words) + BOS/EOS."""
    learnt = train_bpe(captions, vocab_size=512 + 2 + 200)
    tokenizer = Tokenizer(learnt.vocab, learnt.merges, max_length=24)
    longest = max(len(tokenizer.encode(c)) for c in captions)
    assert longest + 2 <= tokenizer.max_length, f"captions need {longest + 2} positions"
    return tokenizer


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image, at offsets on the latent grid (multiples of 4)."""
    if size >= x.shape[-1]:
        return x
    offsets = torch.randint((x.shape[-1] - size) // 4 + 1, (x.shape[0], 2), generator=gen) * 4
    return torch.stack([img[:, i:i + size, j:j + size] for img, (i, j) in zip(x, offsets.tolist())])


def train_vae(config: VAEConfig, images: torch.Tensor, tc: TrainConfig, gen: torch.Generator, log: Logger) -> AutoencoderKL:
    """Stage 2: reconstruct pixels through the sampled latent z = mean + std * noise."""
    vae = AutoencoderKL(config).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0)
    running = None
    for step in range(tc.vae_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, tc.vae_steps, tc.vae_lr, tc.warmup)
        x = random_crops(images[torch.randint(len(images), (tc.vae_batch,), generator=gen)], tc.vae_crop, gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=tc.bf16):
            posterior = vae.encode(x)
            noise = torch.randn(posterior.mean.shape, generator=gen)
            z = posterior.mean + posterior.std * noise
            x_hat = vae.decode(z).float()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.std.float() ** 2 - 1 - posterior.logvar.float()).mean()
        loss = F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x) + tc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % tc.log_every == 0 or step == tc.vae_steps - 1:
            log(f"vae  step {step:5d}/{tc.vae_steps}  loss {running:.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Stage 3: posterior means of every training image (unscaled)."""
    return torch.cat([vae.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)])


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    err = (a.clamp(-1, 1) - b) ** 2
    mse = (err[where] if where is not None else err).mean().item() / 4  # images in [-1, 1]: peak-to-peak 2
    return 10 * math.log10(1 / max(mse, 1e-12))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def training_data(tc: TrainConfig) -> tuple[list[str], torch.Tensor]:
    """Captions and images of the minimal pairs: seed i's scene at row 2i, its edited twin at 2i + 1."""
    captions, images = [], []
    for scene in world.training_scenes(0, tc.scenes // 2):
        try:
            edit = world.make_edit(scene, scene.seed)  # colour or shape of one object, drawn from the seed
        except ParameterError:                         # no shape edit keeps the pairs distinct: a colour edit
            edit = world.make_edit(scene, scene.seed, "colour")
        captions += [edit.source_caption, edit.target_caption]
        images += [edit.source_image, edit.target_image]
    return captions, world.to_tensor(np.stack(images))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically: an interruption while saving leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f), overwrite=True)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # tensors, numbers and strings only: never code


def train_unet(config: ModelConfig, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               tc: TrainConfig, gen: torch.Generator, log: Logger, checkpoint: Path, state: dict,
               snapshot=None) -> tuple[TextEncoder, UNet]:
    """Stage 4: the DDPM objective with SD's schedule; text encoder trained jointly from scratch.

    `state` is the checkpoint of an interrupted run ({} for a fresh one): the loop continues from
    its step with its weights, optimiser moments and random state, so the result is bit-identical."""
    text_encoder, unet = TextEncoder(config.text_encoder).train(), UNet(config.unet).train()
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=tc.unet_lr, weight_decay=0.01)
    modules = {"text_encoder": text_encoder, "unet": unet, "ema_text": ema_text, "ema_unet": ema_unet}
    first, running = 0, None
    if "step" in state:
        for name, module in modules.items():
            module.load_state_dict(state[name], strict=True)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first, running = state["step"], state["running"]
        log(f"unet resumed at step {first}")
    alpha_bar = DDIM(config.scheduler).alpha_bar
    weight = loss_weights(tc.loss_weight, alpha_bar)
    T = config.scheduler.num_train_timesteps
    pairs = tc.unet_batch // 2
    for step in range(first, tc.unet_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, tc.unet_steps, tc.unet_lr, tc.warmup)
        rows = (2 * torch.randint(len(latents) // 2, (pairs,), generator=gen)[:, None] + torch.arange(2)).flatten()
        z0, c = latents[rows], ids[rows].clone()
        c[torch.rand(tc.unet_batch, generator=gen) < tc.uncond_prob] = empty_ids
        t = torch.randint(T, (pairs,), generator=gen).repeat_interleave(2)   # a pair shares t and eps
        eps = torch.randn((pairs, *z0.shape[1:]), generator=gen).repeat_interleave(2, dim=0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps               # q(z_t | z_0), DDPM eq. 4
        with torch.autocast("cpu", torch.bfloat16, enabled=tc.bf16):
            eps_pred = unet(z_t, t, text_encoder(c)).float()
        if tc.loss_weight == "simple":
            loss = F.mse_loss(eps_pred, eps)                         # DDPM eq. 14 (simple loss)
        else:                                                        # the same, weighted over t
            loss = (weight[t] * ((eps_pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % tc.log_every == 0 or step == tc.unet_steps - 1:
            log(f"unet step {step:5d}/{tc.unet_steps}  loss {running:.4f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 and done < tc.unet_steps:
            state.update({name: m.state_dict() for name, m in modules.items()},
                         optimizer=opt.state_dict(), generator=gen.get_state(), step=done, running=running,
                         log=log.lines, elapsed=log.elapsed())
            save_checkpoint(checkpoint, state)
        if snapshot is not None and tc.snapshot_every and done % tc.snapshot_every == 0 and done < tc.unet_steps:
            snapshot(done, ema_text, ema_unet)
    return ema_text.requires_grad_(False), ema_unet.requires_grad_(False)


def train(out: str | Path, tc: TrainConfig = TrainConfig(), threads: int | None = None, resume: bool = False) -> Path:
    """Run the four stages and save the model in diffusers layout at `out`.

    With `resume`, continue the interrupted run whose checkpoint lies beside `out` (same config)."""
    check_config(tc)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
        raise ParameterError(f"threads must be an integer >= 0 (0 or None: torch's own choice), got {threads!r}.")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    out = Path(out)
    checkpoint = out.with_name(f".{out.name}.checkpoint.pt")
    check_output(checkpoint, overwrite=True)  # a missing or read-only folder fails now, not after the autoencoder
    state = load_checkpoint(checkpoint) if resume and checkpoint.is_file() else {}
    if state and state["config"] != repr(tc):
        raise ParameterError(f"the checkpoint {checkpoint} is of another training config ({state['config']}); "
                             f"resume with that config or delete the checkpoint.")
    log = Logger(out, lines=state.get("log", []), elapsed=state.get("elapsed", 0.0))
    log(f"training config: {tc}" if not state else f"resuming from {checkpoint.name}")

    captions, images = training_data(tc)
    log(f"rendered {len(captions)} scenes ({len(captions) // 2} minimal pairs)")

    tokenizer = train_tokenizer(captions)
    ids, empty_ids = tokenizer(captions), tokenizer([""])[0]
    log(f"tokenizer: {tokenizer.vocab_size} tokens, {tokenizer.max_length} positions")

    config = model_config(tokenizer)
    if "vae" in state:
        vae = AutoencoderKL(config.vae)
        vae.load_state_dict(state["vae"], strict=True)
        vae.eval().requires_grad_(False)
        z = state["latents"]
    else:
        state["config"] = repr(tc)
        vae = train_vae(config.vae, images, tc, gen, log)
        scenes_held = world.heldout_scenes(64)
        with torch.no_grad():
            held = world.to_tensor(world.render_batch(scenes_held))
            recon = vae.decode(vae.encode(held).mean)
        background = torch.from_numpy(np.stack([~world.object_masks(sc).any(0) for sc in scenes_held]))
        log(f"vae: held-out reconstruction PSNR {psnr(recon, held):.2f} dB, background only "
            f"{psnr(recon, held, background[:, None].expand_as(held)):.2f} dB")
        z = encode_all(vae, images)
        state.update(vae=vae.state_dict(), latents=z, log=log.lines, elapsed=log.elapsed())
        save_checkpoint(checkpoint, state)
    gen.manual_seed(tc.seed + 1)  # the UNet stage's first draws, whether the autoencoder was resumed or not
    scaling = 1.0 / z.std().item()
    config = replace(config, vae=replace(config.vae, scaling_factor=round(scaling, 5)))
    vae.config = config.vae
    log(f"latents: {tuple(z.shape)}, scaling_factor {scaling:.5f}")

    def snapshot(step: int, text_encoder: TextEncoder, unet: UNet) -> None:
        save_pretrained(out.with_name(f"{out.name}-step{step}"), config, tokenizer, text_encoder, vae, unet)

    text_encoder, unet = train_unet(config, z * config.vae.scaling_factor, ids, empty_ids, tc, gen, log,
                                    checkpoint, state, snapshot)
    n_params = sum(p.numel() for m in (text_encoder, vae, unet) for p in m.parameters())
    log(f"parameters: {n_params / 1e6:.2f} M in all")
    card = model_card(tc, n_params, log.elapsed() / 60)
    save_pretrained(out, config, tokenizer, text_encoder, vae, unet,
                    extra_files={"README.md": card, "training_log.txt": "\n".join(log.lines) + "\n"})
    checkpoint.unlink(missing_ok=True)
    log(f"saved to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffedit.shapes.training", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="destination folder (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--loss-weight", choices=LOSS_WEIGHTS, default=None,
                        help="weight of the noise loss over t (default: the config's)")
    parser.add_argument("--snapshot-every", type=int, default=0, help="save the model every N UNet steps too")
    args = parser.parse_args(argv)
    tc = replace(QUICK if args.quick else TrainConfig(), seed=args.seed)
    if args.unet_steps is not None:
        tc = replace(tc, unet_steps=args.unet_steps)
    if args.vae_steps is not None:
        tc = replace(tc, vae_steps=args.vae_steps)
    if args.snapshot_every:
        tc = replace(tc, snapshot_every=args.snapshot_every)
    if args.loss_weight is not None:
        tc = replace(tc, loss_weight=args.loss_weight)
    try:
        train(args.out, tc, threads=args.threads, resume=args.resume)
    except DiffEditError as e:  # e.g. a checkpoint of another config: one sentence, no traceback
        print(f"training: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
