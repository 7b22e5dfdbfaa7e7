"""Attention on the CPU at the shapes of SD 1.x / 2.x: does anything beat torch's
`scaled_dot_product_attention` (SDPA) as diffedit.models.attention calls it? (A study, not a test.)

    python benchmarks/bench_attention_cpu.py                 # the shapes of a 256-px edit, all variants
    python benchmarks/bench_attention_cpu.py --repeats 3 --shapes self-64 --variants sdpa onednn-heads

Every variant takes q, k, v as the UNet hands them over, (B, N, heads * d), and returns
(B, Nq, heads * d), so layout changes are paid for inside the timing. Variants:

- sdpa            what diffedit.models.attention does: rearrange to (B, h, N, d) views, SDPA
- sdpa-contig     the same on contiguous (B*h, N, d) copies (heads folded into the batch)
- sdpa-pad48      head dim zero-padded to a multiple of 16 (q·k unchanged; scale set explicitly)
- blocks-fp32     query blocks of 1024 rows: softmax(q k^T * s) v with fp32 matmuls
- blocks-bf16mm   query blocks, the two matmuls in bf16 (fp32 accumulation), softmax in fp32
- onednn-heads    one head at a time, both matmuls as oneDNN inner products (q k^T with k as the
                  weight, then p v with v^T as the weight), softmax in between: oneDNN uses
                  AVX-512 where torch's BLAS (MKL) does not (packed_linear.py)
- sdpa-bf16       SDPA on bf16 inputs (what the bf16 pipeline runs)
- blocks-bf16     query blocks of 256 rows on bf16 inputs: bf16 matmuls (oneDNN), softmax in fp32
- kernel-bf16     diffedit's fused C kernel (kernels/cpu_attention.c) on bf16 inputs: what the bf16
                  pipeline runs on CPUs with AVX512-BF16 (elsewhere its portable path: slow)
- kernel-fp32     diffedit's fused fp32 C kernel (kernels/cpu_attention_fp32.c): what the fp32
                  pipeline runs where torch's CPU kernels are AVX2 ones (AVX2 + FMA path; else portable)

Each is warmed up once, then timed `repeats` times in rotating order; the table gives medians,
effective GFLOP/s (4 B h Nq Nk d per call) and the max abs error against fp32 SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

# name -> (batch, heads, query tokens, key tokens, head dim), batch 2 (guidance). SD 1.5 has 8 heads
# (head dim 40, 80, 160 at the three attention levels), SD 2.x heads of dim 64, the VAE one head
# of 512. The default set is a 256-px edit (latents 32x32: 1024, 256 and 64 tokens); "-512" are
# SD 1.5 at 512 px.
SHAPES = {
    "sd1-self-1024": (2, 8, 1024, 1024, 40),
    "sd1-cross-1024": (2, 8, 1024, 77, 40),
    "sd1-self-256": (2, 8, 256, 256, 80),
    "sd1-cross-256": (2, 8, 256, 77, 80),
    "sd1-self-64": (2, 8, 64, 64, 160),
    "sd2-self-1024": (2, 5, 1024, 1024, 64),
    "sd2-self-256": (2, 10, 256, 256, 64),
    "sd2-self-64": (2, 20, 64, 64, 64),
    "vae-self-1024": (1, 1, 1024, 1024, 512),
    "sd1-self-4096-512": (2, 8, 4096, 4096, 40),
    "sd1-cross-4096-512": (2, 8, 4096, 77, 40),
}
DEFAULT_SHAPES = [name for name in SHAPES if not name.endswith("-512")]
BLOCK = 1024


def sdpa(q, k, v, heads):
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


def sdpa_contig(q, k, v, heads):
    q, k, v = (rearrange(x, "b n (h d) -> (b h) n d", h=heads).contiguous() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "(b h) n d -> b n (h d)", h=heads)


def sdpa_pad48(q, k, v, heads):
    d = q.shape[-1] // heads
    pad = -d % 16
    q, k, v = (F.pad(rearrange(x, "b n (h d) -> b h n d", h=heads), (0, pad)) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)[..., :d]
    return rearrange(out, "b h n d -> b n (h d)")


def blocks(q, k, v, heads, mm_dtype):
    d = q.shape[-1] // heads
    q, k, v = (rearrange(x, "b n (h d) -> (b h) n d", h=heads) for x in (q, k, v))
    kt, v = (k * d ** -0.5).transpose(1, 2).to(mm_dtype), v.to(mm_dtype)
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(0, q.shape[1], BLOCK):
        scores = torch.bmm(q[:, i:i + BLOCK].to(mm_dtype), kt).float()
        out[:, i:i + BLOCK] = torch.bmm(scores.softmax(dim=-1).to(mm_dtype), v)
    return rearrange(out, "(b h) n d -> b n (h d)", h=heads)


def onednn_heads(q, k, v, heads):
    linear = torch.ops.mkldnn._linear_pointwise
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = linear(q[b, :, cols] * d ** -0.5, k[b, :, cols].contiguous(), None, "none", [], "")
            out[b, :, cols] = linear(scores.softmax(dim=-1), v[b, :, cols].t().contiguous(), None, "none", [], "")
    return out


def sdpa_bf16(q, k, v, heads):
    return sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads).float()


def blocks_bf16(q, k, v, heads, block=256):
    d = q.shape[-1] // heads
    q, k, v = (rearrange(x.bfloat16(), "b n (h d) -> (b h) n d", h=heads) for x in (q, k, v))
    kt = (k * d ** -0.5).transpose(1, 2).contiguous()
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(0, q.shape[1], block):
        scores = torch.softmax(torch.bmm(q[:, i:i + block], kt), dim=-1, dtype=torch.float32)
        out[:, i:i + block] = torch.bmm(scores.bfloat16(), v)
    return rearrange(out, "(b h) n d -> b n (h d)", h=heads).float()


def kernel_bf16(q, k, v, heads):
    from diffedit.kernels import cpu_attention
    return cpu_attention.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads).float()


def kernel_fp32(q, k, v, heads):
    from diffedit.kernels import cpu_attention
    return cpu_attention.attention(q, k, v, heads)


VARIANTS = {
    "sdpa": sdpa,
    "sdpa-contig": sdpa_contig,
    "sdpa-pad48": sdpa_pad48,
    "blocks-fp32": lambda q, k, v, h: blocks(q, k, v, h, torch.float32),
    "blocks-bf16mm": lambda q, k, v, h: blocks(q, k, v, h, torch.bfloat16),
    "onednn-heads": onednn_heads,
    "sdpa-bf16": sdpa_bf16,
    "blocks-bf16": blocks_bf16,
    "kernel-bf16": kernel_bf16,
    "kernel-fp32": kernel_fp32,
}


@dataclass
class Row:
    shape: str
    variant: str
    seconds: float
    gflops: float
    error: float


@torch.inference_mode()
def bench_shape(name: str, repeats: int, variants: list[str]) -> list[Row]:
    B, h, nq, nk, d = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, nq, h * d, generator=g)
    k, v = torch.randn(B, nk, h * d, generator=g), torch.randn(B, nk, h * d, generator=g)
    reference = sdpa(q, k, v, h)
    errors = {n: (VARIANTS[n](q, k, v, h).float() - reference).abs().max().item() for n in variants}  # + warm-up
    times = {n: [] for n in variants}
    for r in range(repeats):
        for n in variants[r % len(variants):] + variants[:r % len(variants)]:
            start = time.perf_counter()
            VARIANTS[n](q, k, v, h)
            times[n].append(time.perf_counter() - start)
    flops = 4 * B * h * nq * nk * d
    return [Row(name, n, statistics.median(times[n]), flops / statistics.median(times[n]) / 1e9, errors[n])
            for n in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from bench_pipeline import cpu_name
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}")
    print("| shape (B, heads, Nq, Nk, d) | variant | median ms | GFLOP/s | vs sdpa | max abs err |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        rows = bench_shape(name, args.repeats, args.variants)
        base = next((r.seconds for r in rows if r.variant == "sdpa"), rows[0].seconds)
        for r in rows:
            print(f"| {name} {SHAPES[name]} | {r.variant} | {1e3 * r.seconds:.1f} | {r.gflops:.0f} | "
                  f"{base / r.seconds:.2f}x | {r.error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
