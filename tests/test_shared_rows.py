"""One x_t for several texts (models/unet.py, UNet.forward): when every row of a UNet call has the
same latents and timestep -- guidance's unconditional and text rows, the mask's (source, target)
pairs -- everything before the first cross-attention runs once, on one row. The outputs are those of
each row computed alone (up to rounding), the rows part at the cross-attention (at the first level,
the second or only the middle block), skips and timestep embeddings broadcast; rows that differ in
latents or timestep run as before; weight gradients flow through the shared part, and latents that
need their own gradients are not shared."""

import pytest
import torch

from diffedit.models.config import UNetConfig
from diffedit.models.unet import UNet

CONFIG = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True), heads=(2, 4),
                    cross_attention_dim=24, norm_num_groups=8, sample_size=8)
REL = 1e-5  # another batch size for the shared part: rounding only (measured <= 1e-6)


def unet(config: UNetConfig = CONFIG, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(config).eval()


def rows_alone(model: UNet, latents, t, context) -> torch.Tensor:
    return torch.cat([model(latents[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(latents.shape[0])])


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def batches_seen(model: UNet) -> list[int]:
    """Batch sizes conv_in sees (one entry per call)."""
    seen = []
    model.conv_in.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("batch", [2, 3])
def test_rows_sharing_x_t_run_the_prefix_once_and_match_rows_alone(batch):
    model = unet()
    seen = batches_seen(model)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 4, 8, 8, generator=g).expand(batch, -1, -1, -1).contiguous()
    t, context = torch.full((batch,), 500.0), torch.randn(batch, 77, 24, generator=g)
    with torch.inference_mode():
        shared = model(x_t, t, context)
        seen.clear()
        alone = rows_alone(model, x_t, t, context)
    assert shared.shape == (batch, 4, 8, 8) and shared.is_contiguous()
    assert rel_err(shared, alone) < REL
    assert not torch.equal(shared[0], shared[1])  # the texts still differ after the prefix
    with torch.inference_mode():
        seen.clear()
        model(x_t, 500, context)  # a scalar timestep too
    assert seen == [1]


@pytest.mark.parametrize("case", ["latents differ", "timesteps differ"])
def test_rows_that_differ_run_at_full_batch(case):
    model = unet()
    seen = batches_seen(model)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t, context = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 24, generator=g)
    if case == "latents differ":
        x_t[1, 0, 0, 0] += 1e-3
    else:
        t[1] = 499.0
    with torch.inference_mode():
        out = model(x_t, t, context)
        assert seen == [2]
        assert rel_err(out, rows_alone(model, x_t, t, context)) < REL


@pytest.mark.parametrize("cross_attention", [(False, True), (False, False)], ids=["second-level", "middle-only"])
def test_a_later_first_cross_attention_broadcasts_the_earlier_skips(cross_attention):
    config = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=cross_attention,
                        heads=(2, 4), cross_attention_dim=24, norm_num_groups=8, sample_size=8)
    model = unet(config)
    x_t, t, context = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 24)
    with torch.inference_mode():
        assert rel_err(model(x_t, t, context), rows_alone(model, x_t, t, context)) < REL


def test_gradients_flow_through_the_shared_part_and_latents_needing_them_are_not_shared():
    model = unet()
    seen = batches_seen(model)
    x_t, context = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1), torch.randn(2, 77, 24)
    model(x_t, torch.tensor([500.0, 500.0]), context).square().sum().backward()  # weights only: shared
    shared_grad = model.conv_in.weight.grad.clone()
    model.zero_grad()
    rows_alone(model, x_t, torch.tensor([500.0, 500.0]), context).square().sum().backward()
    assert seen[0] == 1 and rel_err(shared_grad, model.conv_in.weight.grad) < REL
    x = x_t.clone().requires_grad_()
    seen.clear()
    model(x, torch.tensor([500.0, 500.0]), context).square().sum().backward()
    assert seen == [2] and (x.grad[0] != x.grad[1]).any() and (x.grad[1] != 0).any()
