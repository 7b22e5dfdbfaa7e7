"""The linear layers of SD 1.5 on the CPU: which backend multiplies fastest? The measurement behind
the rule of diffedit/models/packed_linear.py (a study, not a test).

    python benchmarks/bench_linear_cpu.py                     # fp32 and bf16, every shape
    python benchmarks/bench_linear_cpu.py --dtypes fp32 --repeats 9
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_linear_cpu.py   # oneDNN as on an AVX2-only CPU

Candidates, each computing x W^T + b for x (M, K), W (N, K):

- torch          F.linear, what nn.Linear runs (fp32: torch's BLAS, MKL on x86; bf16: oneDNN,
                 reordering the plain weight on every call)
- onednn-plain   oneDNN's inner product on the plain weight (reordered on every call)
- onednn-packed  oneDNN's inner product on a weight prepacked once (what PackedLinear runs)
- mkl-packed     MKL's packed GEMM (fp32 only; what torch's compiler uses for fp32 linears)
- kernel         diffedit's fp32 kernel on a weight packed once into panels (kernels/cpu_linear.py;
                 where its AVX2 path builds)

Shapes are (M, K, N) of a 256-px edit's UNet at batch 2 (and 1: the inversion): the transformers'
projections at the three levels (tokens x width), the GEGLU feed-forward, the text projections
(K = 768) and the timestep embedding (M = 2). Each candidate is warmed up, then timed `repeats`
times in rotating order; the table gives GFLOP/s of the best time (the least disturbed by other
load) and the largest error relative to the fp32 result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_pipeline import cpu_name  # noqa: E402

from diffedit.kernels import cpu_linear  # noqa: E402
from diffedit.models.packed_linear import linear_backend  # noqa: E402

SHAPES = [  # (M, K, N)
    (2048, 320, 320), (2048, 320, 2560), (2048, 1280, 320),
    (512, 640, 640), (512, 640, 5120), (512, 2560, 640),
    (128, 1280, 1280), (128, 1280, 10240), (128, 5120, 1280),
    (1024, 320, 320), (64, 1280, 1280),
    (154, 768, 320), (154, 768, 1280), (2, 1280, 1280),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def candidates(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    linear = torch.ops.mkldnn._linear_pointwise
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    out = {"torch": lambda: F.linear(x, w, b),
           "onednn-plain": lambda: linear(x, w, b, "none", [], ""),
           "onednn-packed": lambda: linear(x, packed, b, "none", [], "")}
    if x.dtype == torch.float32:
        mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        out["mkl-packed"] = lambda: torch.ops.mkl._mkl_linear(x, mkl, w, b, x.shape[0])
    if x.dtype == torch.float32 and cpu_linear.fast() and w.shape[0] % cpu_linear.PANEL == 0:
        panels = cpu_linear.pack(w)
        out["kernel"] = lambda: cpu_linear.linear(x, panels, b)
    return out



@torch.inference_mode()
def bench(shape: tuple, dtype: torch.dtype, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (GFLOP/s of the best time, max error relative to the fp32 result)."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5, torch.randn(n, generator=g)
    reference = F.linear(x, w, b)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    fns = candidates(x, w, b)
    errors = {name: ((fn().float() - reference).abs().max() / reference.abs().max()).item() for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (2 * m * k * n / best[name] / 1e9, errors[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}, "
          f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        print(f"\n{dtype_name}: GFLOP/s (max relative error); the rule picks "
              f"{linear_backend(torch.device('cpu'), dtype, 'auto')} here")
        rows = [(shape, bench(shape, dtype, args.repeats)) for shape in SHAPES]
        names = list(rows[0][1])
        print("| M x K x N | " + " | ".join(names) + " | best / torch |")
        print("|---" * (len(names) + 2) + "|")
        for (m, k, n), result in rows:
            cells = " | ".join(f"{rate:.0f} ({err:.0e})" for rate, err in result.values())
            best = max(result, key=lambda name: result[name][0])
            print(f"| {m}x{k}x{n} | {cells} | {best} {result[best][0] / result['torch'][0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
