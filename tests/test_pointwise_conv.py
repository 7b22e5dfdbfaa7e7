"""1x1 convolutions on diffedit's fp32 linear kernel (packed_linear.PointwiseConv2d): the same map as
F.conv2d up to rounding on odd shapes, channels-last in and out; every other input, autograd and
other dtypes on F.conv2d; plain weights in state_dict and back through unpack; which convolutions
qualify; the profiler's name for it."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from diffedit.models.packed_linear import (PointwiseConv2d, PackedLinear, backend_of, fits_kernel, pack_linears,
                                           pack_pointwise_convolutions, unpack_linears)

REL = 1e-5  # another summation order (measured <= 3e-6 on SD's shapes)
CL = torch.channels_last


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def conv(cin: int, cout: int, bias: bool = True, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 1, bias=bias)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), cin=st.integers(1, 70), panels=st.integers(1, 4), h=st.integers(1, 9),
       w=st.integers(1, 9), bias=st.booleans())
def test_same_map_as_the_convolution_on_channels_last_input(batch, cin, panels, h, w, bias):
    plain = conv(cin, 16 * panels, bias)
    pointwise = PointwiseConv2d(plain)
    x = torch.randn(batch, cin, h, w).contiguous(memory_format=CL)
    with torch.inference_mode():
        expected, got = plain(x), pointwise(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=CL)  # the layout oneDNN's convolution gives
    assert rel_err(got, expected) < REL


def test_kernel_runs_only_on_channels_last_fp32_inference(monkeypatch):
    plain = conv(24, 32)
    pointwise = PointwiseConv2d(plain)
    calls = []
    real = pointwise.forward.__globals__["cpu_linear"].linear
    monkeypatch.setattr(pointwise.forward.__globals__["cpu_linear"], "linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 24, 5, 7)
    with torch.inference_mode():
        for variant in (x,  # NCHW: F.conv2d, NCHW out as the plain convolution gives
                        x.contiguous(memory_format=CL)[:, :, :, 1:],  # a channels-last slice: not dense
                        x[:, :, ::2]):  # strided
            got = pointwise(variant)
            assert not calls and rel_err(got, plain(variant)) < REL
            assert got.is_contiguous() == plain(variant).is_contiguous()
        assert rel_err(pointwise(x.contiguous(memory_format=CL)), plain(x)) < REL and calls == [1]
        assert pointwise(torch.zeros(0, 24, 3, 3).contiguous(memory_format=CL)).shape == (0, 32, 3, 3)
    calls.clear()
    leaf = x.contiguous(memory_format=CL).requires_grad_()
    pointwise(leaf).square().sum().backward()  # autograd: F.conv2d, gradients as the plain layer's
    leaf2 = leaf.detach().clone().requires_grad_()
    plain(leaf2).square().sum().backward()
    assert not calls and rel_err(leaf.grad, leaf2.grad) < REL
    double = PointwiseConv2d(plain).double()
    with torch.inference_mode():
        assert rel_err(double(x.double().contiguous(memory_format=CL)), plain.double()(x.double())) < 1e-12
    assert not calls
    with pytest.raises(RuntimeError):  # a dtype mismatch: torch's own error, as nn.Conv2d gives
        PointwiseConv2d(conv(24, 32))(x.double())


def test_plain_weights_in_state_dict_and_unpack_restores_the_convolution():
    model = nn.Sequential(conv(20, 48, seed=1), nn.SiLU(), nn.Sequential(conv(48, 16, bias=False, seed=2)),
                          nn.Conv2d(16, 16, 1, stride=2), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1, groups=2), nn.Linear(6, 32))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 20, 6, 12).contiguous(memory_format=CL)
    model_convolutions = copy.deepcopy(model[:7])
    with torch.inference_mode():
        expected = model(x)
        assert pack_linears(model, "onednn") == 1 and not any(isinstance(m, PointwiseConv2d) for m in model)
        unpack_linears(model)
        assert pack_linears(model, "kernel") == 1 and not any(isinstance(m, PointwiseConv2d) for m in model)
        assert pack_pointwise_convolutions(model) == 2 and backend_of(model) == "kernel"
        assert [type(m).__name__ for m in model] == ["PointwiseConv2d", "SiLU", "Sequential", "Conv2d", "Conv2d",
                                                     "Conv2d", "Conv2d", "PackedLinear"]
        assert isinstance(model[2][0], PointwiseConv2d) and isinstance(model[7], PackedLinear)
        assert rel_err(model(x), expected) < REL
        assert model.state_dict().keys() == reference.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
        assert sum(p.numel() for p in model.parameters()) == parameters
        assert "20, 48, kernel_size=(1, 1), bias=True, kernel" in repr(model[0])
        assert unpack_linears(model) == 3 and backend_of(model) == "torch"
        assert type(model[0]) is nn.Conv2d and type(model[2][0]) is nn.Conv2d and type(model[7]) is nn.Linear
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
        assert all(p.is_contiguous() for p in model.parameters())  # single-panel weights too
        assert torch.equal(model[:7](x), model_convolutions(x))  # (MKL's linear depends on alignment)


def test_which_convolutions_qualify():
    assert fits_kernel(nn.Conv2d(3, 16, 1)) and fits_kernel(nn.Conv2d(5, 32, (1, 1), bias=False))
    for other in (nn.Conv2d(3, 8, 1), nn.Conv2d(3, 16, 3), nn.Conv2d(3, 16, 1, stride=2),
                  nn.Conv2d(3, 16, 1, padding=1), nn.Conv2d(4, 16, 1, groups=2), nn.Conv2d(3, 16, 1, dilation=2),
                  nn.Linear(3, 16), nn.Conv1d(3, 16, 1)):
        assert not fits_kernel(other)
    with pytest.raises(AssertionError):
        PointwiseConv2d(nn.Conv2d(3, 8, 1))


def test_the_profiler_sees_it_as_a_convolution():
    pointwise = PointwiseConv2d(conv(16, 16))
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=CL)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        pointwise(x)
    names = {event.key for event in prof.key_averages()}
    assert PointwiseConv2d.PROFILER_NAME in names and "diffedit::cpu_linear" not in names
