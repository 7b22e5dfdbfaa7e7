"""The text's keys and values kept across UNet calls inside `text_projections_reused` (models/unet.py):
the same bits as projecting the text afresh at every call; projected once while the text and the
weights stay; made again when the text changes (by value, also in place), when a weight changes in
place (an optimizer step under no_grad) or is replaced (packing); never kept while autograd records;
nothing kept outside the block (a dtype round trip swaps a weight's data without a version bump),
nested blocks; the pipeline's loops reuse them and leave nothing behind."""

import pytest
import torch

from diffedit.models.config import UNetConfig
from diffedit.models.packed_linear import onednn_problem, pack_linears
from diffedit.models.unet import Attention, UNet, text_projections_reused

CONFIG = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True), heads=(2, 4),
                    cross_attention_dim=24, norm_num_groups=8, sample_size=8)


def unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(CONFIG).eval()


def reusing(model: UNet) -> UNet:
    """The model's cross-attention layers as inside text_projections_reused (for tests that hold it open)."""
    for attention in text_attentions(model):
        attention.reuse_text = True
    return model


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500.0] * batch),
            torch.randn(batch, 77, CONFIG.cross_attention_dim, generator=g))


def text_attentions(model: UNet) -> list[Attention]:
    return [m for name, m in model.named_modules() if isinstance(m, Attention) and name.endswith("attn2")]


def fresh(model: UNet, x, t, text) -> torch.Tensor:
    """The call with every kept key and value dropped first."""
    for attention in text_attentions(model):
        attention.text_cache = None
    return model(x, t, text)


def count_projections(model: UNet) -> list[int]:
    calls = [0]
    for attention in text_attentions(model):
        attention.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@torch.no_grad()
def test_reused_keys_give_the_same_bits_and_are_projected_once():
    model, (x, t, text) = reusing(unet()), inputs()
    calls = count_projections(model)
    layers = len(text_attentions(model))
    first = model(x, t, text)
    assert calls[0] == layers
    for step in range(3):  # a sampling loop: new latents and timesteps, the same text (a new tensor each time)
        x_t, t_t = x + step, t - 100 * step
        assert torch.equal(model(x_t, t_t, text.clone()), fresh(model, x_t, t_t, text))
    assert calls[0] == layers + 3 * layers  # the three fresh calls projected; the cached ones did not
    assert torch.equal(model(x, t, text), first)


@torch.no_grad()
def test_a_changed_text_is_projected_again():
    model, (x, t, text) = reusing(unet()), inputs()
    model(x, t, text)
    other = text.clone()
    other[1, 5, 3] += 1e-3  # one element of the second row
    assert torch.equal(model(x, t, other), fresh(model, x, t, other))
    assert not torch.equal(model(x, t, other)[1], model(x, t, text)[1])
    text_in_place = text + 1  # a text not seen yet: kept now
    model(x, t, text_in_place)
    text_in_place.mul_(2)  # the caller reuses its tensor: the kept copy is not a view of it
    assert torch.equal(model(x, t, text_in_place), fresh(model, x, t, text_in_place))
    assert torch.equal(model(x[:1], t[:1], text[:1]), fresh(model, x[:1], t[:1], text[:1]))  # another batch


@torch.no_grad()
def test_weights_changed_in_place_or_replaced_are_seen():
    model, (x, t, text) = reusing(unet()), inputs()
    first = model(x, t, text)
    layer = text_attentions(model)[0]
    replacement = torch.nn.Parameter(layer.to_v.weight.detach() * 2)  # another tensor, brought to the same version
    with torch.no_grad():
        while replacement._version < layer.to_v.weight._version:
            replacement.mul_(1.0)
    assert replacement._version == layer.to_v.weight._version
    layer.to_v.weight = replacement
    assert torch.equal(model(x, t, text), fresh(model, x, t, text))
    assert not torch.equal(model(x, t, text), first)
    text_attentions(model)[0].to_v.weight.add_(0.5)  # e.g. an optimizer step between two no_grad samplings
    changed = model(x, t, text)
    assert torch.equal(changed, fresh(model, x, t, text))
    model.load_state_dict(unet(seed=3).state_dict())  # copies in place: versions move
    assert torch.equal(model(x, t, text), fresh(model, x, t, text))
    assert not torch.equal(model(x, t, text), changed)
    if onednn_problem(torch.device("cpu"), torch.float32) is None:
        plain = model(x, t, text)
        pack_linears(model)  # new weight tensors
        assert all(attention.text_cache[0][0][0] is not attention.to_k.weight for attention in text_attentions(model))
        packed = model(x, t, text)
        assert all(attention.text_cache[0][0][0] is attention.to_k.weight for attention in text_attentions(model))
        assert (packed - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_nothing_is_kept_while_autograd_records():
    model, (x, t, text) = reusing(unet()), inputs()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model(x, t, text)
    model(x, t, text).square().mean().backward()
    assert all(attention.text_cache is None for attention in text_attentions(model))
    assert all(attention.to_k.weight.grad is not None and attention.to_k.weight.grad.abs().sum() > 0
               for attention in text_attentions(model))


def test_inference_mode_weights_are_never_reused():
    with torch.inference_mode():  # weights made here have no version counter: an in-place change is invisible
        model, (x, t, text) = reusing(unet()), inputs()
        calls = count_projections(model)
        model(x, t, text)
        model(x, t, text)
    assert calls[0] == 2 * len(text_attentions(model))


@pytest.mark.parametrize("batch", [1, 3])
def test_inference_mode_inputs_with_normal_weights(batch):
    model = reusing(unet())
    x, t, text = inputs(batch)
    with torch.inference_mode():
        first = model(x, t, text)
        again = model(x, t, text)
    assert torch.equal(first, again)
    with torch.no_grad():
        assert torch.equal(fresh(model, x, t, text), first)


@torch.no_grad()
def test_outside_the_block_nothing_is_kept():
    model, (x, t, text) = unet(), inputs()
    calls = count_projections(model)
    model(x, t, text)
    model(x, t, text)
    assert calls[0] == 2 * len(text_attentions(model))
    assert all(attention.text_cache is None for attention in text_attentions(model))
    with text_projections_reused(model):
        model(x, t, text)
        with text_projections_reused(model):  # nested: the inner exit keeps the outer block's state
            model(x, t, text)
        model(x, t, text)
        assert calls[0] == 3 * len(text_attentions(model))
    assert all(not attention.reuse_text and attention.text_cache is None for attention in text_attentions(model))
    model.to(torch.bfloat16).to(torch.float32)  # weights rounded, swapped by .data: same tensors, same versions
    with text_projections_reused(model):
        assert torch.equal(model(x, t, text), fresh(model, x, t, text))


def test_the_pipeline_reuses_them_in_its_loops_and_keeps_nothing(tiny_model_folder):
    from diffedit.pipeline import DiffEditPipeline
    from reference_models import noise_image
    pipe = DiffEditPipeline.from_pretrained(tiny_model_folder)
    layers = text_attentions(pipe.unet)
    assert layers and not any(attention.reuse_text for attention in layers)
    calls = count_projections(pipe.unet)
    image = noise_image(32, 32)
    mask = pipe.generate_mask(image, "a cat", "a dog", num_samples=3, num_inference_steps=4)
    assert calls[0] == len(layers)  # one text pair for the 3 samples' 2 chunks
    inversion = pipe.invert(image, num_inference_steps=4, strength=1.0)
    assert calls[0] == 2 * len(layers)
    pipe.edit(inversion, mask, "a dog")
    assert calls[0] == 3 * len(layers)
    assert all(not attention.reuse_text and attention.text_cache is None for attention in layers)
