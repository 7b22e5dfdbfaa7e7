"""The attention kernel (kernels/attention.py) on the CPU, under Triton's interpreter, against the
model's torch attention.

Run by `test_kernels_under_the_interpreter` (test_kernels.py, which explains why these tests are
named `interpreted_test_*` and run in a child process), or directly:

    TRITON_INTERPRET=1 pytest tests/test_kernel_attention.py -o python_functions=interpreted_test_
"""

from __future__ import annotations

import pytest
import torch

from diffedit.errors import ParameterError
from diffedit.models import attention as attention_module
from reference_models import interpreted_kernel

kernel_attention = interpreted_kernel("attention")  # None outside the interpreter's process


# attention: |out - ref| <= atol + rtol * |ref|, ref computed in fp32 from the same (rounded) inputs.
# Measured worst ratios to these bounds: fp32 0.09, fp16 0.24, bf16 0.47.
ATTENTION_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def qkv(batch, heads, head_dim, n_q, n_k, dtype, seed=0, q_scale=2.0):
    """Random q, k, v; q scaled up so the softmax is peaked and the running max matters."""
    g = torch.Generator().manual_seed(seed)
    q = q_scale * torch.randn(batch, n_q, heads * head_dim, generator=g)
    k, v = (torch.randn(batch, n_k, heads * head_dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _assert_attention_close(out, q, k, v, heads):
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = kernel_attention.attention_reference(q.float(), k.float(), v.float(), heads)
    atol, rtol = ATTENTION_TOL[q.dtype]
    assert torch.isfinite(out).all()
    worst = ((out.float() - ref).abs() / (atol + rtol * ref.abs())).max().item()
    assert worst <= 1.0, f"attention off by {worst:.2f}x the {q.dtype} tolerance"


# A covering subset: head dims 40/64/80/160, query lengths 77/100/256/1000, keys 77 (cross) or
# as many as the queries (self), batch x heads 1/3/16, each dtype with upcast off and on.
ATTENTION_CASES = [
    # batch, heads, head_dim, n_q, n_k, dtype, upcast
    (1, 1, 40, 77, 77, torch.float32, False),
    (1, 3, 64, 100, 77, torch.float16, False),
    (2, 8, 80, 256, 256, torch.float16, False),
    (1, 1, 160, 1000, 77, torch.float16, True),
    (1, 1, 40, 1000, 1000, torch.bfloat16, False),
    (3, 1, 160, 100, 100, torch.bfloat16, True),
    (1, 16, 64, 256, 77, torch.float32, True),
    (1, 3, 80, 77, 77, torch.float16, True),
    (2, 8, 40, 256, 77, torch.bfloat16, False),
    (1, 3, 160, 77, 77, torch.float32, False),
    (1, 1, 64, 1000, 1000, torch.float16, False),
]


@pytest.mark.parametrize("batch,heads,head_dim,n_q,n_k,dtype,upcast", ATTENTION_CASES)
def interpreted_test_attention_matches_reference(batch, heads, head_dim, n_q, n_k, dtype, upcast):
    q, k, v = qkv(batch, heads, head_dim, n_q, n_k, dtype)
    _assert_attention_close(kernel_attention.attention(q, k, v, heads=heads, upcast=upcast), q, k, v, heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def interpreted_test_upcast_leaves_only_the_output_rounding(dtype):
    """With upcast everything is fp32 until the output cast: within 1 ulp of the fp32 result
    (the interpreter truncates bf16). Without it the probabilities are rounded: a larger error."""
    q, k, v = qkv(1, 3, 64, 100, 100, dtype)
    ref = kernel_attention.attention_reference(q.float(), k.float(), v.float(), 3)
    ulps = {}
    for upcast in (True, False):
        out = kernel_attention.attention(q, k, v, heads=3, upcast=upcast).float()
        ulps[upcast] = ((out - ref).abs() / (1e-6 + torch.finfo(dtype).eps * ref.abs())).max().item()
    assert ulps[True] <= 1.0 < ulps[False], ulps


def interpreted_test_attention_scores_beyond_fp16_range():
    """q.k = 40 * 40 * 64 > 65504 overflows a half-precision score matrix; the kernel accumulates
    scores in fp32 (the reason SD 2 needs `upcast` elsewhere), so it stays finite and exact."""
    q, k, v = qkv(1, 2, 64, 77, 77, torch.float16, q_scale=1.0)
    q, k = torch.full_like(q, 40.0), k.abs() * 40.0
    out = kernel_attention.attention(q, k, v, heads=2)
    _assert_attention_close(out, q, k, v, 2)


def interpreted_test_attention_strided_views_and_small_tiles():
    """Batch/token strides of views are used as they are; a non-contiguous last dim is copied;
    16-wide tiles give many masked tail tiles (77 = 4 * 16 + 13)."""
    batch, heads, head_dim, n_q, n_k = 2, 3, 40, 77, 50
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n_q, batch, heads * head_dim, generator=g).transpose(0, 1)  # batch stride < token stride
    kv = torch.randn(batch, n_k, 2 * heads * head_dim, generator=g)
    k, v = kv[..., : heads * head_dim], kv[..., heads * head_dim:]             # token stride 2 * width
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    _assert_attention_close(kernel_attention.attention(q, k, v, heads, block_m=16, block_n=16), q, k, v, heads)
    q_t = torch.randn(batch, heads * head_dim, n_q, generator=g).transpose(1, 2)  # last dim strided
    assert q_t.stride(-1) != 1
    _assert_attention_close(kernel_attention.attention(q_t, k, v, heads, block_m=32), q_t, k, v, heads)


def interpreted_test_attention_refuses_what_it_cannot_serve():
    """The kernel file stands alone: it refuses with plain TypeError / ValueError, not diffedit's errors."""
    q, k, v = qkv(1, 2, 64, 16, 16, torch.float32)
    assert kernel_attention.available()
    kernel_attention.check_inputs(q, k, v, 2)
    refused = [
        (TypeError, (q.double(), k.double(), v.double(), 2)),         # dtype
        (TypeError, (q, k.half(), v, 2)),                              # mixed dtypes
        (TypeError, (q.numpy(), k, v, 2)),                             # not a tensor
        (ValueError, (q, k, v, 3)),                                    # width not a multiple of heads
        (ValueError, (q.repeat(1, 1, 8), k.repeat(1, 1, 8), v.repeat(1, 1, 8), 2)),  # head dim 512 > 256
        (ValueError, (q, k[:, :5], v, 2)),                             # k and v token counts differ
        (ValueError, (q[0], k[0], v[0], 2)),                           # not 3-D
    ]
    for error, args in refused:
        with pytest.raises(error):
            kernel_attention.check_inputs(*args)
        with pytest.raises(error) as refusal:
            kernel_attention.attention(*args)
        assert not isinstance(refusal.value, ParameterError)
    with pytest.raises(ValueError):
        kernel_attention.attention(q, k, v, 2, block_m=24)


def interpreted_test_attention_reference_matches_torch_sdpa():
    """The oracle itself against torch's scaled_dot_product_attention (the torch path)."""
    q, k, v = qkv(2, 3, 40, 30, 20, torch.float32)
    attention_module.set_attention_backend("torch")
    try:
        expected = attention_module.attention(q, k, v, heads=3)
    finally:
        attention_module.set_attention_backend(None)
    torch.testing.assert_close(kernel_attention.attention_reference(q, k, v, 3), expected, atol=1e-5, rtol=1e-5)
