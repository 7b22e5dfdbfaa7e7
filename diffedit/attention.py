"""The one attention function every model in diffedit calls.

softmax(q k^T * scale) v over heads, with q, k, v given as (batch, tokens, heads * head_dim).
On CPU (and wherever the Triton kernel cannot serve) it is torch's
`scaled_dot_product_attention`; on CUDA with Triton installed it is the fused kernel of
`diffedit.kernels.attention`. The backend is chosen per call:

- `backend` argument of `set_attention_backend` or the environment variable
  `DIFFEDIT_ATTENTION` = "auto" (default), "torch" or "triton";
- "auto" takes Triton for CUDA tensors when it is importable, torch otherwise;
- "triton" on a tensor or shape the kernel cannot serve raises instead of silently falling back
  (CPU tensors are served only under Triton's interpreter, TRITON_INTERPRET=1, for the tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import ParameterError

_BACKENDS = ("auto", "torch", "triton")
_backend_override: str | None = None


def set_attention_backend(backend: str | None) -> None:
    """Force the attention backend for the whole process ("auto", "torch", "triton"), or None to
    follow the DIFFEDIT_ATTENTION environment variable again."""
    global _backend_override
    if backend is not None and backend not in _BACKENDS:
        raise ParameterError(f"unknown attention backend {backend!r}; use one of {', '.join(_BACKENDS)}.")
    _backend_override = backend


def attention_backend() -> str:
    """The backend asked for, by `set_attention_backend` or else by DIFFEDIT_ATTENTION."""
    backend = _backend_override or os.environ.get("DIFFEDIT_ATTENTION", "auto").strip().lower() or "auto"
    if backend not in _BACKENDS:
        raise ParameterError(f"DIFFEDIT_ATTENTION={backend!r} is not a backend; use one of {', '.join(_BACKENDS)}.")
    return backend


def _triton_kernel():
    """The Triton attention entry point, or None when Triton cannot be imported."""
    try:
        from .kernels import attention as triton_attention
    except ImportError:
        return None
    return triton_attention if triton_attention.available() else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False,
              causal: bool = False) -> torch.Tensor:
    """Multi-head attention. q: (B, Nq, heads*d), k and v: (B, Nk, heads*d) -> (B, Nq, heads*d).

    `upcast` computes in fp32 and casts back (SD 2's `upcast_attention`); in fp32 it changes nothing.
    `causal` (the text encoder's mask) is always served by torch: 77 tokens, nothing to fuse."""
    backend = "torch" if causal else attention_backend()
    if backend == "triton" or (backend == "auto" and q.is_cuda):  # CPU "auto" never imports Triton
        kernel = _triton_kernel()
        if kernel is not None and kernel.supports(q, k, v, heads):
            return kernel.attention(q, k, v, heads=heads, upcast=upcast)
        if backend == "triton":
            raise ParameterError("the Triton attention kernel cannot serve these tensors "
                                 f"(device {q.device.type}, dtype {q.dtype}, head dim {q.shape[-1] // heads}); "
                                 "set DIFFEDIT_ATTENTION=torch or auto.")
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "b h n d -> b n (h d)").to(dtype)
