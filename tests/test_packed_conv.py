"""Packed convolutions (diffedit/packed_conv.py): the same map as nn.Conv2d up to rounding, on
irregular shapes, strides and batch sizes; re-packing when the input shape changes; the plain
weights in state_dict and back through unpack; autograd falls back to the plain path; the
pipeline packs on the CPU and can be told not to."""

import threading
import warnings

import pytest
import torch
import torch.nn as nn

from diffedit.devices import PrecisionWarning
from diffedit.models import packed_conv
from diffedit.models.packed_linear import PointwiseConv2d
from diffedit.models.packed_conv import PackedConv2d, can_pack, pack_convolutions, unpack_convolutions
from diffedit.pipeline import DiffEditPipeline

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="torch built without oneDNN")

REL = 1e-5  # another summation order only: measured <= 5e-7 relative on these shapes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cin,cout,k,stride,pad,shape", [
    (3, 5, 3, 1, 1, (1, 3, 7, 9)),
    (6, 4, 3, 2, 1, (3, 6, 11, 5)),
    (5, 7, 3, 2, 0, (2, 5, 9, 8)),
    (16, 8, 5, 1, 2, (2, 16, 6, 6)),
    (33, 17, 3, 1, 1, (1, 33, 4, 13)),
])
def test_same_map_as_conv2d_on_irregular_shapes(cin, cout, k, stride, pad, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad).eval()
    packed = PackedConv2d(conv)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected, got = conv(x), packed(x)
        assert got.shape == expected.shape and rel_err(got, expected) < REL
        channels_last = packed(x.contiguous(memory_format=torch.channels_last))
        assert rel_err(channels_last, expected) < REL


def test_repacks_when_the_shape_changes_and_keeps_plain_weights_in_state_dict():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    packed = PackedConv2d(conv)
    with torch.inference_mode():
        for shape in [(2, 8, 6, 6), (1, 8, 10, 7), (2, 8, 6, 6)]:
            x = torch.randn(shape)
            assert rel_err(packed(x), conv(x)) < REL
            assert packed.packed_for == shape and packed.weight.layout == torch._mkldnn
    state = packed.state_dict()
    assert list(state) == ["weight", "bias"]
    assert torch.equal(state["weight"], conv.weight) and torch.equal(state["bias"], conv.bias)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in conv.parameters())
    assert torch.equal(packed.state_dict(keep_vars=True)["weight"], conv.weight)
    assert "packed_for=(2, 8, 6, 6)" in repr(packed)


def test_first_packs_share_one_channels_last_buffer_that_the_next_plain_call_frees(monkeypatch):
    """Each first pack copies the weight channels-last into one shared buffer (torch's op would copy
    it into fresh memory): the layout is the op's own from the plain weight, bit for bit, for 3x3,
    1x1, strided and grouped weights; the packed weights never alias the buffer; the first call that
    packs nothing frees it."""
    torch.manual_seed(6)
    convs = [nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 8, 1),
             nn.Conv2d(8, 12, 3, padding=1, groups=2)]
    shapes = [(2, 8, 9, 7), (2, 16, 9, 7), (2, 24, 9, 7), (2, 8, 5, 4)]
    modules = [PackedConv2d(conv) for conv in convs]
    packed_conv._release_scratch()  # as after a plain call (earlier tests may have left one)
    handed, pack = [], torch.ops.mkldnn._reorder_convolution_weight  # the op gets channels-last: it copies nothing
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight",
                        lambda w, *a: handed.append(w.is_contiguous(memory_format=torch.channels_last)) or pack(w, *a))
    with torch.inference_mode():
        buffers = []
        for conv, module, shape in zip(convs, modules, shapes):
            x = torch.randn(shape)
            got = module(x)
            buffers.append((packed_conv._scratch.numel(), packed_conv._scratch.data_ptr()))
            by_op = pack(conv.weight.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                         list(shape))
            expect = torch.ops.mkldnn._convolution_pointwise(x, by_op, conv.bias, list(conv.padding),
                                                            list(conv.stride), list(conv.dilation), conv.groups,
                                                            "none", [], "")
            assert torch.equal(got, expect)
        assert [n for n, _ in buffers] == [8 * 8 * 9] + [24 * 16 * 9] * 3  # grown once, then reused
        assert len({address for _, address in buffers[1:]}) == 1 and handed == [True] * 4
        for conv, module, shape in zip(convs, modules, shapes):  # the buffer was overwritten since
            x = torch.randn(shape)
            assert rel_err(module(x), conv(x)) < REL
            assert packed_conv._scratch is None  # freed by the first call that packed nothing


def test_the_buffer_serves_packs_inside_and_outside_inference_mode():
    """Made inside inference_mode, the buffer still takes a pack under no_grad (an inference tensor
    could not be written there), and the other way round."""
    torch.manual_seed(8)
    convs = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)]
    modes = [torch.inference_mode, torch.no_grad, torch.no_grad, torch.inference_mode]
    packed_conv._release_scratch()
    for conv, mode in zip(convs, modes):
        module, x = PackedConv2d(conv), torch.randn(1, 8, 5, 5)
        with mode():
            assert rel_err(module(x), conv(x)) < REL


def test_a_channels_last_weight_is_handed_over_as_it_is():
    """A weight already channels-last (bf16 models are) needs no copy: the buffer is not made."""
    torch.manual_seed(9)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    packed_conv._release_scratch()
    module, x = PackedConv2d(conv), torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        assert rel_err(module(x), conv(x)) < REL
    assert packed_conv._scratch is None


def test_threads_packing_at_once_get_their_own_weights():
    torch.manual_seed(7)
    pairs = [(nn.Conv2d(8, 8 + 4 * i, 3, padding=1), torch.randn(1, 8, 6, 6)) for i in range(8)]
    modules = [PackedConv2d(conv) for conv, _ in pairs]
    results = [None] * len(pairs)

    def run(i):
        with torch.inference_mode():
            results[i] = modules[i](pairs[i][1])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (conv, x), got in zip(pairs, results):
        assert rel_err(got, conv(x)) < REL


def test_autograd_takes_the_plain_path():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    packed = PackedConv2d(conv)
    with torch.inference_mode():
        packed(torch.randn(1, 4, 5, 5))  # now packed
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    packed(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    conv(x2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < REL


def test_pack_skips_1x1_and_unpack_restores_plain_convolutions():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1),
                          nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1)))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        expected = model(x)
        assert pack_convolutions(model) == 2
        assert type(model[2]) is nn.Conv2d and isinstance(model[3][0], PackedConv2d)
        assert rel_err(model(x), expected) < REL
        assert model.state_dict().keys() == reference.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
        assert unpack_convolutions(model) == 2
        assert not any(isinstance(m, PackedConv2d) for m in model.modules())
        assert torch.equal(model(x), expected)
        assert pack_convolutions(model, one_by_one=True) == 3  # what the pipeline asks for in bf16
        assert isinstance(model[2], PackedConv2d) and rel_err(model(x), expected) < REL
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_pipeline_packs_on_the_cpu_and_can_be_told_not_to(tmp_path):
    from reference_models import build_reference
    folder = build_reference("tiny", tmp_path / "tiny", seed=0)[0]
    packed, plain = DiffEditPipeline.from_pretrained(folder), DiffEditPipeline.from_pretrained(folder,
                                                                                             pack_convolutions=False)
    assert any(isinstance(m, PackedConv2d) for m in packed.unet.modules())
    assert any(isinstance(m, PackedConv2d) for m in packed.vae.modules())
    assert not any(isinstance(m, PackedConv2d) for m in plain.unet.modules())
    assert not any(isinstance(m, PointwiseConv2d) for m in plain.unet.modules())  # activations NCHW: plain 1x1s
    latents = torch.randn(2, 4, 8, 8)
    context = plain.encode_prompt(["a red circle", ""])
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        assert rel_err(packed.unet(latents, t, context), plain.unet(latents, t, context)) < REL
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        assert rel_err(packed.vae.encode(image).mean, plain.vae.encode(image).mean) < REL
    assert packed.unet.state_dict().keys() == plain.unet.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(packed.unet.state_dict().values(), plain.unet.state_dict().values()))


def test_pipeline_packs_1x1_convolutions_in_bf16_only(tmp_path):
    from reference_models import build_reference
    folder = build_reference("tiny", tmp_path / "tiny", seed=0)[0]
    fp32 = DiffEditPipeline.from_pretrained(folder, linear_backend="torch")  # (the kernel's: test_pointwise_conv)
    one_by_one = [name for name, m in fp32.unet.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert one_by_one, "the tiny reference UNet has 1x1 convolutions"
    assert not any(isinstance(m, PackedConv2d) and m.kernel_size == (1, 1) for m in fp32.unet.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # emulated bf16 warns that it is slow
        bf16 = DiffEditPipeline.from_pretrained(folder, dtype="bf16")
    modules = dict(bf16.unet.named_modules())
    if not can_pack(torch.device("cpu"), torch.bfloat16):  # emulated bf16 (AVX2): nothing is packed
        assert not any(isinstance(m, PackedConv2d) for m in modules.values())
        return
    assert all(isinstance(modules[name], PackedConv2d) for name in one_by_one)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    context = bf16.encode_prompt(["a red circle", ""])
    plain = DiffEditPipeline.from_pretrained(folder, dtype="bf16", pack_convolutions=False)
    with torch.inference_mode():
        x = latents.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert rel_err(bf16.unet(x, t, context).float(), plain.unet(x, t, context).float()) < 1e-2


def test_no_packing_off_the_cpu_or_in_emulated_bf16(monkeypatch):
    assert not can_pack(torch.device("cuda"), torch.float32)
    monkeypatch.setattr("diffedit.devices.cpu_has_fast_bf16", lambda: False)
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    assert packed_conv.can_pack(torch.device("cpu"), torch.float32)


def test_big_weights_keep_their_layout_across_batch_sizes(monkeypatch):
    monkeypatch.setattr(packed_conv, "REPACK_BYTES", 8 * 8 * 9 * 4)  # an 8 -> 8 3x3 fp32 weight counts as big
    torch.manual_seed(4)
    big, small = PackedConv2d(nn.Conv2d(8, 8, 3, padding=1)), PackedConv2d(nn.Conv2d(8, 4, 3, padding=1))
    assert big.batch_blind and not small.batch_blind
    with torch.inference_mode():
        for module in (big, small):
            module(torch.randn(2, 8, 6, 6))
            layout = module.weight
            y = module(torch.randn(1, 8, 6, 6))  # another batch size
            assert (module.weight is layout) == module.batch_blind
            module(torch.randn(1, 8, 5, 7))  # another image size: always re-packed
            assert module.packed_for == (1, 8, 5, 7)
        x = torch.randn(3, 8, 6, 6)
        assert rel_err(big(x), nn.functional.conv2d(x, big.plain_weight(), big.bias, padding=1)) < REL
        assert y.shape == (1, 4, 6, 6)
