"""Benchmark of the Triton kernels against the torch paths, on an NVIDIA GPU.

    python -m diffedit.kernels.bench_gpu [--dtypes fp16 bf16] [--resolutions 512 768] [--batch 2] [--samples 10]

Attention: every attention shape of the SD 1.5 UNet (8 heads; levels of width 320, 640, 1280
and the 1280-wide middle block, so head dims 40, 80, 160, 160), self-attention over the latent
tokens and cross-attention to the 77 text tokens, at 512 px (64x64 latents: 4096, 1024, 256, 64
tokens) and 768 px (96x96: 9216, 2304, 576, 144). Batch 2 by default (classifier-free
guidance). Reports TFLOP/s of the fused kernel and of torch's scaled_dot_product_attention on
the same (B, N, heads * d) layout (the torch path of `diffedit.models.attention`), their ratio, and the
largest difference between the two outputs. FLOPs = 4 * B * heads * Nq * Nk * d (two matmuls).

Mask reduction: (B, n = 10, C = 4, h, w) noise predictions at the same latent sizes, against
`mask_reduction_reference` (the torch operations of `diffedit.mask_maps.mask_maps_torch`);
reports GB/s over the bytes the reduction must move (both inputs read once, the difference and
soft maps and the mask written once).

It needs a CUDA device and exits with a one-line message without one. Like the kernels, it imports
nothing of diffedit: the torch baselines are `sdpa` below and the kernel files' references.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_TOKENS = 77
SD15_LEVELS = ((320, 8), (640, 8), (1280, 8), (1280, 8))  # (width, heads): down levels 0-2, middle block


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    head_dim: int
    n_q: int
    n_k: int

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.n_q * self.n_k * self.head_dim

    @property
    def name(self) -> str:
        kind = "cross" if self.n_k == TEXT_TOKENS else "self"
        return f"{kind:5s} B={self.batch} h={self.heads} d={self.head_dim:3d} Nq={self.n_q:5d} Nk={self.n_k:5d}"


def attention_shapes(resolution: int, batch: int = 2) -> list[AttentionShape]:
    """Every distinct attention shape of the SD 1.5 UNet at this image resolution."""
    side = resolution // 8  # latent side
    shapes = []
    for level, (width, heads) in enumerate(SD15_LEVELS):
        tokens = (side >> level) ** 2
        for n_k in (tokens, TEXT_TOKENS):
            shapes.append(AttentionShape(batch, heads, width // heads, tokens, n_k))
    return shapes


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The torch path of diffedit.models.attention: SDPA on (B, heads, N, d) views, output as (B, N, heads * d)."""
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _do_bench(fn) -> float:
    """Median milliseconds of fn on the GPU (Triton's CUDA-event timer)."""
    from triton.testing import do_bench
    return do_bench(fn)


def bench_attention(shapes: list[AttentionShape], dtype: torch.dtype, device: str = "cuda",
                    timer=_do_bench) -> list[dict]:
    """Time the kernel and SDPA on each shape; print one row per shape and return the rows."""
    from . import attention as kernel
    print(f"{'shape':52s} {'triton TFLOP/s':>15s} {'sdpa TFLOP/s':>13s} {'ratio':>6s} {'max |diff|':>11s}")
    rows = []
    for shape in shapes:
        width = shape.heads * shape.head_dim
        q = torch.randn(shape.batch, shape.n_q, width, device=device, dtype=dtype)
        k, v = (torch.randn(shape.batch, shape.n_k, width, device=device, dtype=dtype) for _ in range(2))
        error = (kernel.attention(q, k, v, shape.heads).float() - sdpa(q, k, v, shape.heads).float()).abs().max()
        ms_triton = timer(lambda: kernel.attention(q, k, v, shape.heads))
        ms_torch = timer(lambda: sdpa(q, k, v, shape.heads))
        row = dict(shape=shape, error=error.item(), triton=shape.flops / ms_triton * 1e-9,
                   torch=shape.flops / ms_torch * 1e-9)  # TFLOP/s
        print(f"{shape.name:52s} {row['triton']:15.1f} {row['torch']:13.1f} "
              f"{row['triton'] / row['torch']:6.2f} {row['error']:11.2e}")
        rows.append(row)
    return rows


def bench_mask(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cuda", timer=_do_bench) -> dict:
    """Time the mask kernel and the torch path on (B, n, C, h, w) inputs; print and return one row."""
    from . import mask_reduction as kernel
    batch, _, _, height, width = shape
    eps_target = torch.randn(shape, device=device, dtype=dtype)
    eps_source = eps_target + 0.5 * torch.randn(shape, device=device, dtype=dtype)
    _, soft, _ = kernel.mask_reduction(eps_target, eps_source)
    _, soft_reference, _ = kernel.mask_reduction_reference(eps_target, eps_source)
    moved = 2 * eps_target.numel() * eps_target.element_size() + batch * height * width * (4 + 4 + 1)
    ms_triton = timer(lambda: kernel.mask_reduction(eps_target, eps_source))
    ms_torch = timer(lambda: kernel.mask_reduction_reference(eps_target, eps_source))
    row = dict(shape=shape, error=(soft - soft_reference).abs().max().item(),
               triton=moved / ms_triton * 1e-6, torch=moved / ms_torch * 1e-6)  # GB/s
    print(f"mask {str(shape):22s} {str(dtype):15s} triton {row['triton']:7.1f} GB/s   torch {row['torch']:7.1f} GB/s"
          f"   ratio {row['triton'] / row['torch']:5.2f}   max |soft diff| {row['error']:.1e}")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 768])
    parser.add_argument("--batch", type=int, default=2, help="batch of the attention and of the mask")
    parser.add_argument("--samples", type=int, default=10, help="noise samples n of the mask reduction")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device found; this benchmark needs an NVIDIA GPU with Triton.")
    capability = torch.cuda.get_device_capability()        # Triton compiles for 7.0 and up, bf16 for 8.0 and up
    too_old = [name for name in args.dtypes if capability < ((8, 0) if name == "bf16" else (7, 0))]
    if too_old and not torch.version.hip:
        raise SystemExit(f"bench_gpu: this GPU (compute capability {capability[0]}.{capability[1]}) is too old for "
                         f"Triton's {', '.join(too_old)} kernels (7.0, 8.0 for bf16); leave them out with --dtypes.")
    try:
        from . import attention
    except ImportError:
        raise SystemExit("bench_gpu: Triton is not installed; pip install 'diffedit-sd[triton]'.") from None
    if attention.INTERPRETED:
        raise SystemExit("bench_gpu: TRITON_INTERPRET=1 is set; unset it to benchmark the compiled kernels.")

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.dtypes:
        for resolution in args.resolutions:
            print(f"\nattention, SD 1.5 at {resolution} px, {name}")
            bench_attention(attention_shapes(resolution, args.batch), DTYPES[name])
    print()
    for name in args.dtypes:
        for resolution in args.resolutions:
            side = resolution // 8
            bench_mask((args.batch, args.samples, 4, side, side), DTYPES[name])


if __name__ == "__main__":
    main(sys.argv[1:])
