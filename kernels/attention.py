"""Fused attention forward in Triton (flash-attention style), for every attention of SD 1.x/2.x.

    out = softmax(q k^T / sqrt(d)) v        per batch element and head

Algorithm (Dao et al. 2022, "FlashAttention", with the online softmax of Milakov & Gimelshein
2018). One program owns a tile of BLOCK_M queries of one (batch, head) pair. It keeps the tile
q_i in registers and streams the keys and values past it in tiles of BLOCK_N tokens. For each
tile it computes the scores s = q_i k_j^T * scale and folds them into three running quantities
per query row:

    m   running maximum of the scores seen so far
    l   running sum of exp(s - m)
    acc running sum of exp(s - m) v_j                         (BLOCK_M, head_dim), fp32

When a tile raises the maximum from m to m', the old l and acc are rescaled by exp(m - m'),
so after the last tile acc / l is exactly softmax(s) v. The output is written once.

Memory traffic. Materialising the scores, as `softmax(q @ k.T) @ v` does, writes and reads
back B * heads * Nq * Nk scores (twice: scores, then probabilities). For SD 1.5 at 512 px that is
2 * 8 * 4096 * 4096 * 2 bytes = 537 MB per self-attention of the first level, against 21 MB of
q, k, v and output. The fused kernel reads q once, k and v once per query tile, writes the
output once, and never stores a score. Exponentials use exp2 with log2(e) folded into the scale.

Layout. q is (B, Nq, heads * d), k and v are (B, Nk, heads * d), the layout the UNet's linear
projections produce: head h is the column slice [h*d, (h+1)*d). Batch and token strides are free
(views are fine); the last dimension must be contiguous (the wrapper copies it otherwise). The
head dim is padded to the next power of two inside the kernel (masked loads), never in memory.
The grid is (query tiles, B * heads).

Precision. Scores, softmax and the output accumulator are always fp32. fp16/bf16 inputs go to
tl.dot in their own dtype (exact products, fp32 accumulation on tensor cores), and the
probabilities are rounded to that dtype for the product with v, as in FlashAttention.
`upcast=True` (SD 2's `upcast_attention`) instead casts q, k, v and the probabilities to fp32
before both products (input_precision="ieee"): full fp32 arithmetic, the output cast back to
the input dtype. Since the scores are accumulated in fp32 either way, the fp16 overflow that
SD 2's flag exists for cannot happen here; upcast only removes the rounding of the probabilities
(and costs tensor-core throughput). fp32 inputs always take the fp32 path.

Under Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) tl.dot is wrong for
bf16 (numpy has no bf16), so bf16 operands are cast to fp32 just before the products; since the
probabilities are still rounded to bf16 first and products of bf16 numbers are exact in fp32,
the arithmetic is the same as the bf16 tensor-core path up to summation order.

Interface. `attention` checks its inputs (`check_inputs`, plain TypeError / ValueError), picks
the tiles and the grid and launches the kernel; `attention_reference` is the same function in
plain torch. Tensors in, a tensor out: this file imports nothing of diffedit, which chooses
between this kernel and torch in `diffedit.devices.choose_kernel`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _attention_forward(
    Q, K, V, Out,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    heads, n_q, n_k, head_dim, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr, ROUND_P: tl.constexpr,
):
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    column = (batch_head % heads) * head_dim  # first column of this head

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_q
    d_ok = offs_d < head_dim

    q_ptrs = Q + b * stride_qb + rows[:, None] * stride_qn + column + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + column
    v_base = V + b * stride_vb + column

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_k
        # k tile loaded transposed, (BLOCK_D, BLOCK_N), so that s = q @ k_t
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                      mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            s = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        s = tl.where(col_ok[None, :], s * scale_log2, float("-inf"))  # masked tail keys

        # online softmax: new running max, rescale of the old sums, this tile's probabilities
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if ROUND_P:
            p = p.to(V.dtype.element_ty)
        if FP32_DOT:
            pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + rows[:, None] * stride_on + column + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


INTERPRETED = not isinstance(_attention_forward, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def available() -> bool:
    """True when the kernel can run at all: on a CUDA device, or on the CPU under the interpreter."""
    return INTERPRETED or torch.cuda.is_available()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> None:
    """Raise TypeError (types, dtypes) or ValueError (devices, shapes, gradients) unless the kernel can
    serve these tensors (with or without `upcast`: it serves both)."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)) or not isinstance(heads, int):
        raise TypeError("q, k and v must be torch tensors and heads an int.")
    if not all(x.dim() == 3 for x in (q, k, v)):
        raise ValueError("q, k and v must have shape (batch, tokens, heads * head_dim), "
                         f"not {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    devices = {x.device for x in (q, k, v)}
    if len(devices) != 1 or not (q.is_cuda or (INTERPRETED and q.device.type == "cpu")):
        raise ValueError("q, k and v must be on one CUDA device (or the CPU under TRITON_INTERPRET=1), "
                         f"not {sorted(map(str, devices))}.")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("q, k and v must share one dtype among float16, bfloat16 and float32, "
                        f"not {q.dtype}, {k.dtype}, {v.dtype}.")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("the Triton attention kernel has no backward pass; it serves inference only.")
    width = q.shape[-1]
    if heads < 1 or width % heads or k.shape[-1] != width or v.shape[-1] != width:
        raise ValueError("q, k and v must all have width heads * head_dim "
                         f"(widths {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}, heads {heads}).")
    if not 0 < width // heads <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim must be between 1 and {MAX_HEAD_DIM}, not {width // heads}.")
    if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0] or min(q.shape[1], k.shape[1]) == 0:
        raise ValueError("q, k and v must share the batch, k and v the token count, and no count may be zero "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}).")


def block_sizes(head_dim: int, fp32_operands: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): BLOCK_D is the head dim padded to a power of two;
    the tiles keep the fp32 accumulator at <= 64 registers per thread and the double-buffered
    k, v tiles with the q tile under ~100 KB of shared memory (consumer GPUs), fp32 operands
    taking half as many keys per tile. Fixed rather than autotuned; bench_gpu.py measures them."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n = (64, 64) if block_d <= 64 else (64, 32) if block_d <= 128 else (32, 32)
    if fp32_operands:
        block_n //= 2
    return block_m, block_n, block_d, 4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False,
              block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over heads. q: (B, Nq, heads*d), k, v: (B, Nk, heads*d) -> (B, Nq, heads*d).

    `upcast` computes both products in fp32 (see the module docstring); the output has q's dtype.
    `block_m`, `block_n` override the tile sizes (powers of two, >= 16), for tests and tuning."""
    check_inputs(q, k, v, heads)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, n_q, width = q.shape
    n_k, head_dim = k.shape[1], width // heads
    fp32_operands = upcast or q.dtype == torch.float32
    default_m, default_n, block_d, num_warps = block_sizes(head_dim, fp32_operands)
    block_m, block_n = block_m or default_m, block_n or default_n
    for block in (block_m, block_n):
        if block < 16 or block & (block - 1):
            raise ValueError(f"tile sizes must be powers of two of at least 16, not {block}.")

    out = torch.empty(batch, n_q, width, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    # Triton launches on the current CUDA device, not on the tensors' one: make theirs current
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attention_forward[grid](
            q, k, v, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            heads, n_q, n_k, head_dim, math.log2(math.e) / math.sqrt(head_dim),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            FP32_DOT=fp32_operands or (INTERPRETED and q.dtype == torch.bfloat16), ROUND_P=not fp32_operands,
            num_warps=num_warps, num_stages=2,
        )
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same function in plain torch, scores materialised, all in fp32 (the tests' oracle)."""
    batch, n_q, width = q.shape
    head_dim = width // heads
    q4, k4, v4 = (x.float().reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2) for x in (q, k, v))
    scores = q4 @ k4.transpose(-1, -2) / math.sqrt(head_dim)  # (B, heads, Nq, Nk)
    out = scores.softmax(dim=-1) @ v4
    return out.transpose(1, 2).reshape(batch, n_q, width).to(q.dtype)
