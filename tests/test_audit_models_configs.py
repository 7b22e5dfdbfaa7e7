"""Model configs and single files of kinds this project does not run: refused in one sentence that
names them, never loaded into a network that computes something else (audit of the models).

Oracle for what the refused settings do: diffusers' UNet2DConditionModel / AutoencoderKL of the same
tiny config, whose output they change while the weights keep their names and shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import UNet2DConditionModel

from diffedit.checkpoints.architecture import check_supported, choose_preset, detect_original_architecture
from diffedit.errors import ModelLoadError
from diffedit.models.config import UNetConfig, VAEConfig

TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

# Settings with no weights of their own that change the UNet's output (diffusers reads them).
UNET_SETTINGS = [dict(downsample_padding=0), dict(mid_block_scale_factor=2.0),
                 dict(time_embedding_act_fn="silu"), dict(timestep_post_act="silu")]


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") == 0


def unet_output(settings: dict) -> torch.Tensor:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET, **settings).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 500, torch.randn(1, 77, 32, generator=g)).sample


@pytest.mark.parametrize("settings", UNET_SETTINGS, ids=lambda s: next(iter(s)))
def test_unet_settings_that_change_the_output_are_refused(settings):
    assert not torch.allclose(unet_output(settings), unet_output({}), rtol=1e-3)  # the oracle: they matter
    config = dict(UNet2DConditionModel(**TINY_UNET, **settings).config)
    with pytest.raises(ModelLoadError, match=f"a UNet with {next(iter(settings))}=") as e:
        UNetConfig.from_dict(config)
    assert one_sentence(e.value.args[0])


def test_real_sd_unet_configs_still_load():
    """The values SD 1.5's and SD 2.1's unet/config.json spell out (integers, as they are written)."""
    written = dict(downsample_padding=1, mid_block_scale_factor=1, time_embedding_act_fn=None, timestep_post_act=None)
    sd15 = dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768, **written)
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True, sample_size=96)
    assert UNetConfig.from_dict(sd15).heads == (8, 8, 8, 8)
    assert UNetConfig.from_dict(sd21).heads == (5, 10, 20, 20)
    assert UNetConfig.from_dict(dict(UNet2DConditionModel(**TINY_UNET).config)).block_out_channels == (32, 64)


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_vae_activation_other_than_silu_is_refused(act_fn):
    torch.manual_seed(0)
    plain, other = RefAutoencoderKL(**TINY_VAE).eval(), RefAutoencoderKL(**TINY_VAE, act_fn=act_fn).eval()
    other.load_state_dict(plain.state_dict())  # same weights: only the activation differs
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(plain.decode(z).sample, other.decode(z).sample, rtol=1e-3)
    with pytest.raises(ModelLoadError, match=f"VAE activation '{act_fn}' is not supported") as e:
        VAEConfig.from_dict(dict(other.config))
    assert one_sentence(e.value.args[0])
    assert VAEConfig.from_dict(dict(plain.config)).block_out_channels == (32, 64)


def test_depth_to_image_unet_config_is_named():
    """SD 2 depth (stabilityai/stable-diffusion-2-depth) takes 5 channels: latents and depth. It was
    accepted here and refused later as 'components from different models'."""
    with pytest.raises(ModelLoadError, match="looks like a depth-to-image model"):
        UNetConfig.from_dict(dict(UNet2DConditionModel(**TINY_UNET, in_channels=5).config))


def original_file(in_channels: int) -> dict[str, torch.Tensor]:
    """The keys an original-layout SD 2.x file's detection reads, with a UNet of `in_channels` inputs."""
    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, in_channels, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "cond_stage_model.model.ln_final.weight": (1024,)}
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


@pytest.mark.parametrize("in_channels, named", [
    (5, "a depth-to-image model"), (7, "an upscaler"), (6, "does not take SD's 4 latent channels")])
def test_single_files_of_other_input_channels_are_named(in_channels, named):
    """These files have UNet weights: the refusal said they had none (no model.diffusion_model.*)."""
    with pytest.raises(ModelLoadError, match=named) as e:
        check_supported(detect_original_architecture(original_file(in_channels)))
    assert "no model.diffusion_model" not in e.value.args[0] and one_sentence(e.value.args[0])


def test_sd2_preset_question_names_what_can_be_passed():
    """load_model and the command line take a preset, not a prediction type."""
    with pytest.raises(ModelLoadError) as e:
        choose_preset("sd2")
    message = e.value.args[0]
    assert "prediction_type" not in message and "--preset" in message and one_sentence(message)
