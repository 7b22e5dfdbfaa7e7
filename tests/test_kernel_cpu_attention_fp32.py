"""The fp32 CPU attention kernel (kernels/cpu_attention_fp32.c through kernels/cpu_attention.py)
against float64 attention and torch's fp32 SDPA, and the rule that chooses it.

On a CPU with AVX2 and FMA these tests run its fast path, elsewhere its portable C path; both are
built and compared where the fast one exists. "auto" takes it for fp32 inference only where torch's
own CPU kernels are AVX2 ones (measured faster than SDPA there: benchmarks/README.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffedit.devices import choose_kernel
from diffedit.kernels import cpu_attention as kernel
from diffedit.models import attention as attention_module
from diffedit.models.config import UNetConfig
from diffedit.models.unet import Attention, UNet

FP32 = torch.float32
PATH = kernel.path(FP32)
# |out - ref| / max|ref| against float64 attention: the kernel sums in fp32 in another order than SDPA;
# it must be within ERROR_VS_TORCH times SDPA's own error plus RTOL (measured: 0.5x-2.7x SDPA's, both ~1e-6)
ERROR_VS_TORCH, RTOL = 3.0, 2e-6

SHAPES = [  # (batch, heads, queries, keys, head_dim): SD's head dims, and every irregular edge
    (2, 8, 64, 64, 40), (2, 8, 64, 77, 40), (1, 4, 33, 33, 80), (2, 2, 16, 16, 160), (1, 5, 40, 40, 64),
    (1, 1, 64, 64, 512), (3, 2, 9, 50, 12), (1, 3, 1, 1, 7), (2, 1, 17, 31, 13), (1, 2, 8, 97, 50), (1, 1, 130, 5, 2),
    (1, 2, 7, 16, 24), (2, 1, 6, 17, 8),
]


def qkv(batch, heads, queries, keys, head_dim, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: scale * torch.randn(batch, n, heads * head_dim, generator=g)
    return make(queries), make(keys), make(keys)


def float64_attention(q, k, v, heads):
    split = lambda x: x.double().unflatten(2, (heads, -1)).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def sdpa(q, k, v, heads):
    split = lambda x: x.unflatten(2, (heads, -1)).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


def relative(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("portable", [False, True], ids=["machine-path", "portable"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_attention_as_closely_as_sdpa(shape, portable):
    built = kernel.build(("-DPORTABLE_ONLY",), dtype=FP32) if portable else None
    q, k, v = qkv(*shape)
    heads = shape[1]
    ref = float64_attention(q, k, v, heads)
    out = kernel.attention(q, k, v, heads, built=built)
    assert out.dtype == FP32 and out.shape == q.shape
    error, torch_error = relative(out, ref), relative(sdpa(q, k, v, heads), ref)
    path = "portable" if portable else PATH
    assert error <= ERROR_VS_TORCH * torch_error + RTOL, f"{path} path: error {error:.2e}, SDPA {torch_error:.2e}"


@torch.no_grad()
def test_peaked_softmax_large_scores_and_upcast():
    """Scores up to ~1e3: the row maximum is subtracted before exp, nothing overflows; in fp32 `upcast`
    (SD 2's attention) is the same computation."""
    q, k, v = qkv(2, 2, 24, 40, 40, seed=1, scale=6.0)
    out, ref = kernel.attention(q, k, v, 2), float64_attention(q, k, v, 2)
    assert torch.isfinite(out).all()
    assert relative(out, ref) <= ERROR_VS_TORCH * relative(sdpa(q, k, v, 2), ref) + RTOL
    assert torch.equal(kernel.attention(q, k, v, 2, upcast=True), out)


@torch.no_grad()
def test_strided_views_read_in_place():
    """(the same bits for every thread count: test_kernel_cpu_attention.py, for both kernels)"""
    heads, d = 2, 24
    fused = torch.randn(2, 19, 3 * heads * d)  # q, k, v of one fused projection: token stride 3C
    q, k, v = fused.chunk(3, dim=-1)
    expect = kernel.attention(q.contiguous(), k.contiguous(), v.contiguous(), heads)
    assert torch.equal(kernel.attention(q, k, v, heads), expect)
    k1, v1 = k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1)  # batch stride 0
    assert torch.equal(kernel.attention(q, k1, v1, heads), kernel.attention(q, k1.contiguous(), v1.contiguous(), heads))


def test_refusals_and_the_auto_rule(monkeypatch):
    q, k, v = qkv(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="no backward pass"):
        kernel.attention(q.requires_grad_(), k, v, 2)
    q = q.detach()
    monkeypatch.delenv("DIFFEDIT_ATTENTION", raising=False)
    kernel.chosen.cache_clear()
    try:
        for capability, expect in (("AVX2", kernel.fast(FP32)), ("AVX512", False), ("DEFAULT", False)):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            kernel.chosen.cache_clear()
            assert kernel.chosen(FP32) is expect, capability
            with torch.no_grad():
                assert choose_kernel("attention", (q, k, v, 2)) is (kernel if expect else None)
            assert choose_kernel("attention", (q.requires_grad_(), k, v, 2)) is None  # training: torch
            q = q.detach()
            expected_name = f"cpu kernel ({PATH})" if expect else "torch"
            assert attention_module.backend_name(FP32) == expected_name
    finally:
        kernel.chosen.cache_clear()


@torch.no_grad()
@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1-like", "sd2-like-upcast"])
def test_a_unet_with_the_kernel_is_sdpa_up_to_rounding(monkeypatch, linear_projection):
    torch.manual_seed(0)
    config = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True), heads=(2, 4),
                        cross_attention_dim=24, norm_num_groups=8, sample_size=8,
                        use_linear_projection=linear_projection, upcast_attention=linear_projection)
    unet = UNet(config).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 24)
    calls, served = [0], kernel.attention
    monkeypatch.setattr(kernel, "attention", lambda *a, **kw: calls.__setitem__(0, calls[0] + 1) or served(*a, **kw))
    outs = {}
    for backend in ("torch", "cpu"):
        monkeypatch.setenv("DIFFEDIT_ATTENTION", backend)
        outs[backend] = unet(x, t, text)
    assert calls[0] == sum(isinstance(m, Attention) for m in unet.modules())  # every attention on the kernel
    assert (outs["cpu"] - outs["torch"]).abs().max() <= 1e-5 * outs["torch"].abs().max()
