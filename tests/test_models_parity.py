"""Our tokenizer-to-UNet models against the reference implementations (diffusers' UNet2DConditionModel
and AutoencoderKL, transformers' CLIPTextModel), fp32, same random weights, same inputs.

Two tiny architectures from tests/reference_models.py, loaded from their diffusers-layout folders
with `diffedit.checkpoints.loading.load_model`:
- "tiny":   SD 1.x style (epsilon, 1x1-conv projections, quick-GELU text encoder, <|endoftext|> pad);
- "tiny-v": SD 2.x style (v-prediction, linear projections, attention upcast, heads per level,
            GELU text encoder, "!" pad). Like diffusers' SD 2 folders, its text encoder holds
            only the layers SD 2 runs (the penultimate of OpenCLIP's), so its last hidden state,
            after the final LayerNorm, is what SD 2 conditions on.

The bar (`compare` of reference_models.py): max|ours - ref| / max|ref| < 1e-4 for every
output. The full-size SD 1.5 / 2.1 versions of these comparisons are in test_full_size.py (slow)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass

import pytest
import torch

from diffedit.checkpoints.loading import load_model
from reference_models import build_reference, compare

ARCHS = ("tiny", "tiny-v")
PROMPTS = ["a photo of a cat", "", "A Red CAR, parked by the sea!!  at dusk; 1980s film photo",
           "a very long prompt " * 30]  # the last one is truncated to 77 tokens


@dataclass
class Reference:
    arch: str
    folder: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


@pytest.fixture(scope="module", params=ARCHS)
def reference(request, tmp_path_factory) -> Reference:
    folder, (unet, vae, text) = build_reference(request.param, tmp_path_factory.mktemp(request.param), seed=7,
                                                with_models=True)
    return Reference(request.param, folder, unet, vae, text)


@pytest.fixture(scope="module")
def ours(reference):
    return load_model(reference.folder)


def unet_inputs(model, size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, model.config.unet.in_channels, *size, generator=g)
    context = torch.randn(2, 77, model.config.unet.cross_attention_dim, generator=g)
    return latents, context


# ---------------------------------------------------------------- fp32 parity, folder weights

@pytest.mark.parametrize("size", [(8, 8), (12, 20)], ids=["8x8", "12x20"])
@pytest.mark.parametrize("timestep", [1, 981])
@torch.no_grad()
def test_unet(reference, ours, size, timestep):
    latents, context = unet_inputs(ours, size)
    expected = reference.unet(latents, timestep, encoder_hidden_states=context).sample
    compare(f"{reference.arch} UNet {size[0]}x{size[1]} t={timestep}", ours.unet(latents, timestep, context), expected)


@torch.no_grad()
def test_unet_per_sample_timesteps(reference, ours):
    latents, context = unet_inputs(ours, (8, 8), seed=1)
    t = torch.tensor([10, 900])
    expected = reference.unet(latents, t, encoder_hidden_states=context).sample
    compare(f"{reference.arch} UNet t=(10, 900)", ours.unet(latents, t, context), expected)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)], ids=["32x32", "24x40"])
@torch.no_grad()
def test_vae_encode(reference, ours, size):
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = reference.vae.encode(images).latent_dist
    posterior = ours.vae.encode(images)
    name = f"{reference.arch} VAE encode {size[0]}x{size[1]}"
    compare(f"{name} mean", posterior.mean, expected.mean)
    compare(f"{name} logvar", posterior.logvar, expected.logvar)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)  # same noise as diffusers draws
    compare(f"{name} sample", posterior.sample(g1), expected.sample(g2))


@torch.no_grad()
def test_vae_logvar_clamp(reference, ours):
    """Push the log-variance far out of range in both models: both clamp to [-30, 20]."""
    theirs, mine = copy.deepcopy(reference.vae), copy.deepcopy(ours.vae)
    c = ours.config.vae.latent_channels
    theirs.quant_conv.bias[c:] += 60.0
    mine.quant_conv.bias[c:] += 60.0
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    posterior = mine.encode(images)
    assert posterior.logvar.max().item() == 20.0
    compare(f"{reference.arch} VAE clamped logvar", posterior.logvar, theirs.encode(images).latent_dist.logvar)


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["16x16", "12x20"])
@torch.no_grad()
def test_vae_decode(reference, ours, size):
    z = torch.randn(2, ours.config.vae.latent_channels, *size, generator=torch.Generator().manual_seed(4))
    compare(f"{reference.arch} VAE decode {size[0]}x{size[1]}", ours.vae.decode(z), reference.vae.decode(z).sample)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the long prompt's truncation warning
@torch.no_grad()
def test_text_encoder(reference, ours):
    ids = ours.tokenizer(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.long
    expected = reference.text_encoder(ids).last_hidden_state
    compare(f"{reference.arch} text encoder", ours.text_encoder(ids), expected)


def test_config_read_from_the_folder(reference, ours):
    """What the tiny-v architecture is meant to exercise is really switched on."""
    unet, text = ours.config.unet, ours.config.text_encoder
    is_v = reference.arch == "tiny-v"
    assert ours.config.scheduler.prediction_type == ("v_prediction" if is_v else "epsilon")
    assert (unet.use_linear_projection, unet.upcast_attention) == (is_v, is_v)
    assert unet.heads == ((2, 4) if is_v else (2, 2))
    assert text.activation == ("gelu" if is_v else "quick_gelu")
    assert ours.tokenizer.pad_token == ("!" if is_v else "<|endoftext|>")


# ---------------------------------------------------------------- variants, dtypes, .bin

def _fp16_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).half()


@torch.no_grad()
def test_fp16_variant(reference, tmp_path):
    """A folder holding fp32 files and fp16 `variant` files (as the hub repositories do):
    variant="fp16" reads the fp16 ones; dtype decides what the weights become."""
    folder = shutil.copytree(reference.folder, tmp_path / "model")
    half = {"unet": _fp16_copy(reference.unet), "vae": _fp16_copy(reference.vae),
            "text_encoder": _fp16_copy(reference.text_encoder)}
    for name, module in half.items():
        module.save_pretrained(folder / name, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()

    model = load_model(folder, variant="fp16")  # fp16 files, fp32 weights
    ref_weight = reference.unet.conv_in.weight
    assert model.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(model.unet.conv_in.weight, ref_weight.half().float())
    assert not torch.equal(model.unet.conv_in.weight, ref_weight), "the fp32 files were read, not the variant"
    assert torch.equal(model.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight.half().float())
    oracle = {k: m.float() for k, m in half.items()}  # the reference on the same fp16-rounded weights
    latents, context = unet_inputs(model, (8, 8))
    expected = oracle["unet"](latents, 500, encoder_hidden_states=context).sample
    compare(f"{reference.arch} UNet, fp16 variant read as fp32", model.unet(latents, 500, context), expected)
    ids = model.tokenizer(PROMPTS[:3])
    compare(f"{reference.arch} text encoder, fp16 variant", model.text_encoder(ids),
            oracle["text_encoder"](ids).last_hidden_state)

    model16 = load_model(folder, variant="fp16", dtype=torch.float16)
    assert {p.dtype for m in (model16.unet, model16.vae, model16.text_encoder) for p in m.parameters()} == {torch.float16}
    out = model16.unet(latents.half(), 500, context.half())
    assert out.dtype == torch.float16
    compare(f"{reference.arch} UNet run in fp16", out.float(), expected, tol=1e-2)


@torch.no_grad()
def test_bf16_at_load(reference, ours):
    model = load_model(reference.folder, dtype=torch.bfloat16)
    assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    latents, context = unet_inputs(model, (8, 8))
    out = model.unet(latents.bfloat16(), 500, context.bfloat16())
    compare(f"{reference.arch} UNet run in bf16", out.float(), ours.unet(latents, 500, context), tol=5e-2)


@torch.no_grad()
def test_bin_files(reference, ours, tmp_path):
    """A folder with only pickle `.bin` weights (older repositories) loads to the same model."""
    folder = shutil.copytree(reference.folder, tmp_path / "model")
    for file in folder.rglob("*.safetensors"):
        file.unlink()
    reference.unet.save_pretrained(folder / "unet", safe_serialization=False)
    reference.vae.save_pretrained(folder / "vae", safe_serialization=False)
    torch.save(reference.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    assert not list(folder.rglob("*.safetensors"))
    model = load_model(folder)
    for name in ("unet", "vae", "text_encoder"):
        theirs, mine = getattr(ours, name).state_dict(), getattr(model, name).state_dict()
        assert sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"{name} differs from the safetensors load"
    latents, context = unet_inputs(model, (8, 8))
    compare(f"{reference.arch} UNet from .bin", model.unet(latents, 1, context),
            reference.unet(latents, 1, encoder_hidden_states=context).sample)
