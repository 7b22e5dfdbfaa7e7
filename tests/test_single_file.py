"""Original-layout (CompVis / Stability) single files <-> our parameter names.

Oracles: diffusers' own single-file conversion functions (original -> diffusers) and the
reference models' state dicts (diffusers' UNet2DConditionModel / AutoencoderKL, transformers'
CLIPTextModel), random weights, tiny configs; full-size configs on the meta device (names and
shapes only), checked against key names that real SD 1.x / 2.x files carry. Every comparison
of tensors is bit-exact (torch.equal): the conversion only renames, splits and reshapes."""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from diffedit.models.clip import TextEncoder
from diffedit.models.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from diffedit.errors import ModelLoadError
from diffedit.checkpoints.loading import load_model
from diffedit.checkpoints.architecture import NOT_SD, choose_preset, detect_original_architecture, infer_configs
from diffedit.checkpoints.single_file import parameter_names, split_original_checkpoint, to_original_checkpoint
from diffedit.models.unet import UNet
from diffedit.models.vae import AutoencoderKL

CA, D, CAU, U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
OPEN_CLIP = "cond_stage_model.model."

# name -> (UNet kwargs, VAE kwargs, CLIPTextConfig kwargs, text layout)
TINY = {
    # SD 1.x shape: 2 levels, 1 ResNet per level, attention on the first level only, conv projections.
    "sd1": (dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=(CA, D), up_block_types=(U, CAU),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8),
            dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act="quick_gelu", vocab_size=49408),  # = PRESETS["tiny"], for load_model
            "openai"),
    # SD 2.x shape: 4 levels (12 input blocks: input_blocks.1 vs .10), 2 ResNets per level, linear
    # projections, 23 text layers run of OpenCLIP's 24 (the real count: diffusers' oracle hard-codes 23).
    "sd2": (dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, down_block_types=(CA, CA, CA, D),
                 up_block_types=(U, CAU, CAU, CAU), cross_attention_dim=16, attention_head_dim=(1, 2, 2, 2),
                 use_linear_projection=True, upcast_attention=True, norm_num_groups=4),
            dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4),
            dict(hidden_size=16, intermediate_size=32, num_hidden_layers=23, num_attention_heads=2, hidden_act="gelu"),
            "openclip"),
    # 3 levels, the first without attention, 2 transformer blocks per spatial transformer;
    # a 3-level VAE without mid attention.
    "mixed": (dict(block_out_channels=(8, 16, 16), layers_per_block=2, down_block_types=(D, CA, CA),
                   up_block_types=(CAU, CAU, U), cross_attention_dim=24, attention_head_dim=2,
                   transformer_layers_per_block=2, norm_num_groups=4),
              dict(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False),
              dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=3,
                   hidden_act="quick_gelu"),
              "openai"),
}

# Keys every original file may carry besides the weights; the loader must ignore them by rule.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights")
NON_MODEL = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1, dtype=torch.int32),
             "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
             **{name: torch.zeros(1000) for name in SCHEDULE_BUFFERS}}


def ours_from_transformers(key: str) -> str:
    """transformers' CLIPTextModel names -> ours (v4 has a `text_model.` level, v5 not)."""
    return re.sub(r"^(text_model\.)?(encoder\.)?", "", key)


def build_reference(name: str, seed: int = 0):
    """Random-weight reference models (every parameter random, so no two tensors coincide)."""
    unet_kw, vae_kw, clip_kw, layout = TINY[name]
    levels = len(vae_kw["block_out_channels"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, **unet_kw)
    vae = RefAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels, **vae_kw)
    text = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                        **{"vocab_size": 64, **clip_kw}))
    with torch.no_grad():
        for model in (unet, vae, text):
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
    config = ModelConfig(text_encoder=TextEncoderConfig.from_dict(text.config.to_dict()),
                         vae=VAEConfig.from_dict(dict(vae.config)), unet=UNetConfig.from_dict(dict(unet.config)))
    return unet, vae, text, config, layout


def reference_components(unet, vae, text) -> dict[str, dict[str, torch.Tensor]]:
    return {"unet": unet.state_dict(), "vae": vae.state_dict(),
            "text_encoder": {ours_from_transformers(k): v for k, v in text.state_dict().items()
                             if not k.endswith("position_ids")}}


def open_clip_layout(text_sd: dict[str, torch.Tensor], layers: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """An SD 2 text tower written by hand in OpenCLIP's layout, from transformers' state dict:
    q/k/v fused into in_proj, plus the 24th resblock, text_projection and logit_scale that SD 2
    never runs (random)."""
    g = torch.Generator().manual_seed(seed)
    t = {ours_from_transformers(k): v for k, v in text_sd.items()}
    width = t["final_layer_norm.weight"].shape[0]
    sd = {OPEN_CLIP + "token_embedding.weight": t["embeddings.token_embedding.weight"],
          OPEN_CLIP + "positional_embedding": t["embeddings.position_embedding.weight"],
          OPEN_CLIP + "ln_final.weight": t["final_layer_norm.weight"], OPEN_CLIP + "ln_final.bias": t["final_layer_norm.bias"],
          OPEN_CLIP + "text_projection": torch.randn(width, 8, generator=g), OPEN_CLIP + "logit_scale": torch.tensor(4.6)}
    for i in range(layers + 1):
        def get(name, i=i):
            ref = t[f"layers.{min(i, layers - 1)}.{name}"]
            return ref if i < layers else torch.randn(ref.shape, generator=g)
        r = f"{OPEN_CLIP}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            sd[r + f"attn.in_proj_{p}"] = torch.cat([get(f"self_attn.{x}_proj.{p}") for x in "qkv"])
            sd[r + f"attn.out_proj.{p}"] = get(f"self_attn.out_proj.{p}")
            sd[r + f"ln_1.{p}"], sd[r + f"ln_2.{p}"] = get(f"layer_norm1.{p}"), get(f"layer_norm2.{p}")
            sd[r + f"mlp.c_fc.{p}"], sd[r + f"mlp.c_proj.{p}"] = get(f"mlp.fc1.{p}"), get(f"mlp.fc2.{p}")
    return sd


@functools.cache
def original_checkpoint(name: str, seed: int = 0):
    """(reference models, our-name components, config, original-layout state dict with extras);
    built once per name, never modified by the tests."""
    unet, vae, text, config, layout = build_reference(name, seed)
    components = reference_components(unet, vae, text)
    if layout == "openai":
        original = to_original_checkpoint(components)
        original["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        original = to_original_checkpoint({"unet": components["unet"], "vae": components["vae"]})
        original.update(open_clip_layout(text.state_dict(), config.text_encoder.layers))
    original.update(NON_MODEL)
    return (unet, vae, text), components, config, original


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_conversion_of_our_export_gives_the_reference(name):
    """Our export is a true original layout: diffusers' converters read it back to the reference."""
    (unet, vae, text), components, _, original = original_checkpoint(name)
    assert_same(convert_ldm_unet_checkpoint(original, dict(unet.config)), components["unet"])
    assert_same(convert_ldm_vae_checkpoint(original, dict(vae.config)), components["vae"])
    if TINY[name][3] == "openai":
        text_sd = convert_ldm_clip_checkpoint(original)
        text_sd = {ours_from_transformers(k): v for k, v in text_sd.items() if not k.endswith("position_ids")}
    else:  # diffusers keeps text_projection (for CLIPTextModelWithProjection) and drops resblocks.23
        text_sd = {ours_from_transformers(k): v for k, v in convert_open_clip_checkpoint(text, original).items()
                   if k != "text_projection.weight"}
    assert_same(text_sd, components["text_encoder"])


@pytest.mark.parametrize("name", list(TINY))
def test_split_equals_diffusers_conversion_and_shares_tensors(name):
    _, components, config, original = original_checkpoint(name)
    for given in (None, config):  # names from the checkpoint's own shapes, or from a config
        split = split_original_checkpoint(original, given)
        assert sorted(split) == ["text_encoder", "unet", "vae"]
        for component in split:
            assert_same(split[component], components[component])
    storages = {t.untyped_storage().data_ptr() for t in original.values()}
    assert all(t.untyped_storage().data_ptr() in storages for c in split.values() for t in c.values()), \
        "split copied tensors"


@pytest.mark.parametrize("name", list(TINY))
def test_converted_weights_load_strictly_into_our_models(name):
    _, _, config, original = original_checkpoint(name)
    assert infer_configs(original, config) == config
    split = split_original_checkpoint(original, config)
    for model, component in ((UNet(config.unet), "unet"), (AutoencoderKL(config.vae), "vae"),
                             (TextEncoder(config.text_encoder), "text_encoder")):
        model.load_state_dict(split[component], strict=True)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in split[component].items())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_model_reads_an_original_single_file(tmp_path, suffix):
    """The whole path: file -> detection -> preset check -> split -> strict, lean build."""
    _, components, _, original = original_checkpoint("sd1")
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in original.items()}, path)
    else:
        torch.save({"state_dict": original, "global_step": 1}, path)  # Lightning-style, as the original files
    model = load_model(path, preset="tiny")
    assert model.config == PRESETS["tiny"]
    for component in ("unet", "vae", "text_encoder"):
        assert_same(getattr(model, component).state_dict(), components[component])
    with pytest.raises(ModelLoadError, match=r"looks like SD 1\.x .* does not fit the sd1 preset"):
        load_model(path)  # detected as SD 1.x, but the shapes are the tiny ones


def test_open_clip_export_roundtrip_and_fusion():
    _, components, config, original = original_checkpoint("sd2")
    exported = to_original_checkpoint(components, text_layout="openclip")
    text_keys = [k for k in exported if k.startswith(OPEN_CLIP)]
    assert len(text_keys) == 4 + 12 * config.text_encoder.layers  # embeddings, ln_final, 12 tensors per layer
    assert_same({k: exported[k] for k in text_keys}, {k: original[k] for k in text_keys})
    split = split_original_checkpoint(exported, config)  # no 24th layer: the config says 23
    for component in split:
        assert_same(split[component], components[component])


def test_vae_attention_is_1x1_conv_in_the_original():
    _, components, _, original = original_checkpoint("sd1")
    for ours, theirs in (("to_q", "q"), ("to_out.0", "proj_out")):
        weight = components["vae"][f"decoder.mid_block.attentions.0.{ours}.weight"]
        assert original[f"first_stage_model.decoder.mid.attn_1.{theirs}.weight"].shape == (*weight.shape, 1, 1)
    # files already holding linear (C, C) attention weights load too
    linear = {k: (v[:, :, 0, 0] if k.endswith(".q.weight") and v.ndim == 4 else v) for k, v in original.items()}
    assert_same(split_original_checkpoint(linear)["vae"], components["vae"])


@pytest.mark.parametrize("extra, reported", [
    ({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "label_emb"),
    ({"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(1)}, "input_blocks.1.2.weight"),
    ({"first_stage_model.loss.logvar": torch.zeros(1)}, "first_stage_model.loss.logvar"),
    ({"cond_stage_model.model.transformer.resblocks.24.ln_1.weight": torch.zeros(16)}, "resblocks.24"),
    ({"some_adapter.weight": torch.zeros(1)}, "some_adapter.weight"),
])
def test_unknown_keys_are_reported_not_dropped(extra, reported):
    _, _, config, original = original_checkpoint("sd2")
    with pytest.raises(ModelLoadError, match=re.escape(reported)):
        split_original_checkpoint({**original, **extra}, config)


# ---------------------------------------------------------------- full-size names (meta device)

SD1_UNET = dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280))
SD2_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                block_out_channels=(320, 640, 1280, 1280))
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# Names and shapes as they are in the released sd-v1-5 / v2-1_768 files.
KNOWN_SD1 = {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
             "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
             "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
             "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight": (5120, 640),
             "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
             "model.diffusion_model.time_embed.2.weight": (1280, 1280), "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
             "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
             "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
             "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
             "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
             "first_stage_model.encoder.norm_out.weight": (512,), "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
             "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
             "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,)}
KNOWN_SD2 = {"model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
             "cond_stage_model.model.positional_embedding": (77, 1024),
             "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
             "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight": (1024, 4096),
             "cond_stage_model.model.ln_final.weight": (1024,)}


@pytest.mark.parametrize("preset, unet_kw, known, layout, counts", [
    ("sd1", SD1_UNET, KNOWN_SD1, "openai", (686, 248, 196)),
    ("sd2-v", SD2_UNET, KNOWN_SD2, "openclip", (686, 248, 4 + 23 * 12)),
], ids=["sd1", "sd2-v"])
def test_full_size_names(preset, unet_kw, known, layout, counts):
    config = PRESETS[preset]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_kw), RefAutoencoderKL(**SD_VAE)
        text = TextEncoder(config.text_encoder)
    components = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    original = to_original_checkpoint(components, text_layout=layout)
    assert len(original) == sum(counts)
    for key, shape in known.items():
        assert tuple(original[key].shape) == shape, key
    for converted, component in ((convert_ldm_unet_checkpoint(original, dict(unet.config)), "unet"),
                                 (convert_ldm_vae_checkpoint(original, dict(vae.config)), "vae")):
        assert sorted(converted) == sorted(components[component])
        assert all(converted[k].shape == v.shape for k, v in components[component].items())
    if layout == "openclip":  # a real SD 2 file also has the 24th layer and the projection
        original.update({k.replace(".22.", ".23."): v for k, v in original.items() if ".resblocks.22." in k})
        original.update({OPEN_CLIP + "text_projection": torch.empty(1024, 1024, device="meta"),
                         OPEN_CLIP + "logit_scale": torch.empty((), device="meta")})
    assert infer_configs(original, preset) == config
    split = split_original_checkpoint(original, config)
    names = parameter_names(config)
    for component in split:  # our models' every parameter, with the shape it has
        assert sorted(split[component]) == sorted(names[component])
        assert all(split[component][k].shape == v.shape for k, v in components[component].items())
    other = "sd1" if preset != "sd1" else "sd2-base"
    with pytest.raises(ModelLoadError, match=r"looks like SD %s" % ("2" if preset != "sd1" else "1")):
        infer_configs(original, other)


# ---------------------------------------------------------------- detection, presets, configs

def fabricated(in_channels=4, context=768, extra=()) -> dict[str, torch.Tensor]:
    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, in_channels, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
            **dict(extra)}
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


SD1_TEXT = [("cond_stage_model.transformer.text_model.final_layer_norm.weight", (768,))]
SD2_TEXT = [("cond_stage_model.model.ln_final.weight", (1024,))]


@pytest.mark.parametrize("state_dict, expected", [
    (fabricated(extra=SD1_TEXT), "sd1"),
    (fabricated(), "sd1"),
    (fabricated(context=1024, extra=SD2_TEXT), "sd2"),
    (fabricated(context=1024), "sd2"),
    (fabricated(context=2048, extra=[("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                      (768,))]), "sdxl"),
    (fabricated(context=2048), "sdxl"),
    (fabricated(in_channels=9, extra=SD1_TEXT), "inpainting"),
    (fabricated(in_channels=9, context=1024, extra=SD2_TEXT), "inpainting"),
    (fabricated(in_channels=8, extra=SD1_TEXT), "instruct-pix2pix"),
    (fabricated(context=1024, extra=SD2_TEXT + [("model.diffusion_model.label_emb.0.0.weight", (1280, 1536))]),
     "unclip"),
    ({"encoder.conv_in.weight": torch.empty(128, 3, 3, 3, device="meta")}, NOT_SD),
    ({"text_model.final_layer_norm.weight": torch.empty(768, device="meta")}, NOT_SD),
    ({}, NOT_SD),
])
def test_detect_original_architecture(state_dict, expected):
    assert detect_original_architecture(state_dict) == expected


def test_choose_preset():
    assert choose_preset("sd1") == "sd1"
    assert choose_preset("sd2", prediction_type="v_prediction") == "sd2-v"
    assert choose_preset("sd2", prediction_type="epsilon") == "sd2-base"
    assert choose_preset("sd2", preset="sd2-base", prediction_type="v_prediction") == "sd2-base"
    with pytest.raises(ModelLoadError, match="sd2-base.*sd2-v"):
        choose_preset("sd2")
    with pytest.raises(ModelLoadError, match="unknown preset"):
        choose_preset("sd1", preset="sd3")
    for refused in ("sdxl", "inpainting", NOT_SD):
        with pytest.raises(ModelLoadError, match="only SD 1.x and 2.x"):
            choose_preset(refused)


def test_infer_configs_refuses_mismatches_in_one_sentence():
    _, _, config, original = original_checkpoint("sd1")
    with pytest.raises(ModelLoadError, match=r"looks like SD 1\.x .* UNet block_out_channels is \(32, 64\)") as e:
        infer_configs(original, "sd1")
    assert e.value.args[0].count(". ") == 0 and "\n" not in e.value.args[0]
    with pytest.raises(ModelLoadError, match="text encoder width is 32 where the preset has 24"):
        infer_configs(original, replace(config, text_encoder=replace(config.text_encoder, width=24)))
    inpainting = dict(original)
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(ModelLoadError, match="inpainting"):
        infer_configs(inpainting, config)
    without_vae = {k: v for k, v in original.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        infer_configs(without_vae, config)
