"""The one attention function every model in diffedit calls.

softmax(q k^T * scale) v over heads, with q, k, v given as (batch, tokens, heads * head_dim).
Three backends, chosen per call by `diffedit.devices.choose_kernel`: torch's
`scaled_dot_product_attention`; on CUDA with Triton installed, the fused kernel of
`diffedit.kernels.attention`; for inference on the CPU, the fused C kernels of
`diffedit.kernels.cpu_attention` (bf16 on CPUs with AVX512-BF16 and no AMX, fp32 on CPUs whose
widest vectors are AVX2). The choice is the one given to `set_attention_backend`, else the environment variable
DIFFEDIT_ATTENTION: "auto" (default: Triton for CUDA tensors when it is installed, the CPU kernel
where its rule chooses it, torch elsewhere), "torch", "triton" or "cpu" (the last two raise on
tensors the kernel cannot serve instead of silently falling back). The text encoder's causal
attention is always torch's; the CPU kernel leaves SD 2's `upcast` attention of bf16 inputs to
torch too (in fp32 upcasting changes nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from diffedit.devices import choose_kernel, kernel_backend

_backend_override: str | None = None


def set_attention_backend(backend: str | None) -> None:
    """Force the attention backend for the whole process ("auto", "torch", "triton", "cpu"), or None
    to follow the DIFFEDIT_ATTENTION environment variable again."""
    global _backend_override
    _backend_override = None if backend is None else kernel_backend("attention", backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False,
              causal: bool = False) -> torch.Tensor:
    """Multi-head attention. q: (B, Nq, heads*d), k and v: (B, Nk, heads*d) -> (B, Nq, heads*d).

    `upcast` computes in fp32 and casts back (SD 2's `upcast_attention`); in fp32 it changes nothing.
    `causal` (the text encoder's mask) is always served by torch: 77 tokens, nothing to fuse."""
    kernel = None if causal else choose_kernel("attention", (q, k, v, heads, upcast), _backend_override)
    if kernel is not None:
        return kernel.attention(q, k, v, heads=heads, upcast=upcast)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "b h n d -> b n (h d)").to(dtype)


def backend_name(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """What serves the model's (non-causal) attention for tensors of this dtype and device under the
    current choice: "torch", "triton" or "cpu kernel (avx512_bf16 | avx2_fma | portable)"."""
    probe = torch.zeros(1, 1, 8, dtype=dtype, device=device)
    kernel = choose_kernel("attention", (probe, probe, probe, 1), _backend_override)
    if kernel is None:
        return "torch"
    if kernel.__name__.endswith("cpu_attention"):
        return f"cpu kernel ({kernel.path(dtype)})"
    return "triton"
