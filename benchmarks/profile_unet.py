"""Where the time of one UNet call and one VAE decode goes on this CPU, and how close each kind of
operation runs to the machine's own matrix-multiply speed: the profile behind bench_pipeline's
floor figure. A profiling script, not a test.

    python benchmarks/profile_unet.py                  # SD 1.5 architecture, batch 2, 256 px (32x32 latents)
    python benchmarks/profile_unet.py --size 512       # 64x64 latents
    python benchmarks/profile_unet.py --linear torch   # linear layers on torch's default backend (DIFFEDIT_CPU_LINEAR)
    python benchmarks/profile_unet.py --quick          # the tiny reference model: checks the script

It first measures the machine's peak: the best of the candidate GEMMs (torch's matmul, i.e. its
BLAS, oneDNN's linear with a prepacked weight and, where "auto" takes it, diffedit's fp32 linear
kernel) on a 2048^3 problem in the profiled dtype, and, where /proc/cpuinfo tells the clock and
the vector width, the theoretical FMA peak (threads x clock x 2 FMA units x lanes x 2; a core
running above the reported clock beats it). It then loads the model as the pipeline does (3x3
convolutions packed on the CPU, linear layers on the chosen backend), warms the UNet up, and
profiles `--calls` calls with torch.profiler; each op's self time goes to a kind (3x3
convolution, 1x1 convolution, linear, attention, normalisation, element-wise, rest), and the
table names the backend of the ops that ran each kind. FLOPs come from forward hooks: 2 x
multiply-adds of every convolution and linear layer, and 4 x B x Lq x Lk x width for each
attention (QK^T and the weighted sum of V). Kinds without FLOPs are memory-bound.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pipeline import cpu_name, ensure_model, model_folder  # noqa: E402

from diffedit.models.packed_conv import PackedConv2d  # noqa: E402
from diffedit.models.attention import backend_name  # noqa: E402
from diffedit.kernels import cpu_linear  # noqa: E402
from diffedit.models.packed_linear import (BACKENDS as BACKENDS_OF_LINEAR, PackedLinear, PointwiseConv2d,  # noqa: E402
                                           backend_of)
from diffedit.pipeline import DiffEditPipeline  # noqa: E402
from diffedit.models.unet import Attention  # noqa: E402
from diffedit.models.vae import SelfAttention  # noqa: E402

KINDS = {  # profiler op name -> kind (anything else: "rest"); convolution ops are split by their weights' shapes
    "mkldnn::_convolution_pointwise": "conv 3x3", "aten::mkldnn_convolution": "conv 1x1",
    "aten::addmm": "linear", "aten::mm": "linear", "mkldnn::_linear_pointwise": "linear", "aten::bmm": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "diffedit::cpu_attention": "attention",
    "diffedit::cpu_linear": "linear", "diffedit::cpu_conv1x1": "conv 1x1", "diffedit::cpu_geglu": "element-wise",
    "aten::native_group_norm": "norm", "aten::native_layer_norm": "norm",
    "aten::silu": "element-wise", "aten::gelu": "element-wise", "aten::add": "element-wise",
    "aten::mul": "element-wise", "aten::copy_": "element-wise", "aten::cat": "element-wise",
    "aten::upsample_nearest2d": "element-wise",
}
BACKENDS = {  # profiler op name -> the library that ran it
    "mkldnn::_convolution_pointwise": "oneDNN, prepacked", "aten::mkldnn_convolution": "oneDNN via torch",
    "aten::addmm": "torch matmul", "aten::mm": "torch matmul", "aten::bmm": "torch matmul",
    "mkldnn::_linear_pointwise": "oneDNN, prepacked",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "torch SDPA (flash, CPU)",
    "diffedit::cpu_attention": "diffedit's fused C kernel", "diffedit::cpu_linear": "diffedit's C kernel",
    "diffedit::cpu_conv1x1": "diffedit's linear kernel, channels-last",
    "diffedit::cpu_geglu": "GEGLU: diffedit's C kernel",
}


def matmul_peaks(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul in `dtype` by each candidate GEMM, best of `repeats` each, in
    alternating order."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    candidates = {"torch matmul": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        try:  # oneDNN refuses bf16 weights on CPUs without AVX-512 (or AVX-NE-CONVERT): no candidate then
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
            candidates["oneDNN linear"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        except RuntimeError:
            pass
    if dtype == torch.float32 and cpu_linear.chosen():
        panels = cpu_linear.pack(b.t().contiguous())
        candidates["diffedit linear"] = lambda: cpu_linear.linear(a, panels)
    times: dict[str, list] = defaultdict(list)
    with torch.inference_mode():
        for fn in candidates.values():
            fn()  # warm-up
        for r in range(repeats):
            for name in (list(candidates) if r % 2 == 0 else list(candidates)[::-1]):
                times[name].append(_timed(candidates[name]))
    return {name: 2 * n**3 / min(t) / 1e9 for name, t in times.items()}


def theoretical_peak(dtype: torch.dtype) -> tuple[float, str] | None:
    """(GFLOP/s, how) from /proc/cpuinfo: threads x clock x 2 FMA units x lanes x 2 FLOP, or None
    where the clock or the vector width cannot be read (bf16 dot products count as fp32 FMAs x 2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    clock, flags = re.search(r"cpu MHz\s*:\s*([\d.]+)", info), re.search(r"flags\s*:(.*)", info)
    if platform.machine() != "x86_64" or not clock or not flags:
        return None
    flags = set(flags[1].split())
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    if dtype == torch.bfloat16:
        lanes *= 2 if ("avx512_bf16" in flags and lanes == 16) else 1
    threads, ghz = torch.get_num_threads(), float(clock[1]) / 1e3
    peak = threads * ghz * 2 * lanes * 2
    return peak, f"{threads} threads x {ghz:.2f} GHz (reported clock) x 2 FMA units x {lanes} lanes x 2"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_flops(model: nn.Module) -> tuple[dict, list]:
    """Forward hooks adding each layer's FLOPs to a per-kind total; returns (totals, handles)."""
    flops: dict[str, float] = defaultdict(float)

    def conv(m, inputs, out):
        kh, kw = m.kernel_size
        kind = "conv 1x1" if (kh, kw) == (1, 1) else "conv 3x3"
        flops[kind] += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m, inputs, out):
        flops["linear"] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        keys = x.shape[1] if context is None else context.shape[1]
        flops["attention"] += 4 * x.shape[0] * x.shape[1] * keys * m.to_q.out_features

    def image_attention(m, inputs, out):  # the VAE's: one head over the h*w positions
        b, c, h, w = inputs[0].shape
        flops["attention"] += 4 * b * (h * w) ** 2 * c

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, PackedConv2d, PointwiseConv2d)):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, (nn.Linear, PackedLinear)):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention, with_kwargs=True))
        elif isinstance(m, SelfAttention):
            handles.append(m.register_forward_hook(image_attention))
    return flops, handles


def profile_calls(fn, calls: int) -> tuple[dict[str, float], dict[str, set]]:
    """Self CPU seconds per call by kind, and the backends of the ops of each kind."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    seconds: dict[str, float] = defaultdict(float)
    backends: dict[str, set] = defaultdict(set)
    one_by_one = one_by_one_shares(fn)
    for event in prof.key_averages():
        one = one_by_one.get(event.key)
        shares = {KINDS.get(event.key, "rest"): 1.0} if one is None else {"conv 1x1": one, "conv 3x3": 1 - one}
        for kind, share in shares.items():
            if share == 0:  # no row for a kernel size the model does not run
                continue
            seconds[kind] += share * event.self_cpu_time_total / 1e6 / calls
            if event.key in BACKENDS and event.self_cpu_time_total > 0:
                backends[kind].add(BACKENDS[event.key])
    return seconds, backends


def one_by_one_shares(fn) -> dict[str, float]:
    """Per convolution op, the share of its time that went to 1x1 weights (one op serves every kernel
    size: packed 3x3 and 1x1 are both mkldnn::_convolution_pointwise), from one more call profiled
    with input shapes (recorded apart: recording them slowed the VAE's other ops by a quarter)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # op -> [1x1, all]
    for event in prof.key_averages(group_by_input_shape=True):
        weight = event.input_shapes[1] if len(event.input_shapes) > 1 else []
        if KINDS.get(event.key, "").startswith("conv") and len(weight) == 4:
            seconds[event.key][0] += event.self_cpu_time_total if weight[2:] == [1, 1] else 0.0
            seconds[event.key][1] += event.self_cpu_time_total
    return {op: one / total for op, (one, total) in seconds.items() if total > 0}


def report(title: str, wall: float, seconds: dict, flops: dict, peak: float, backends: dict) -> None:
    threads = torch.get_num_threads()
    total_self = sum(seconds.values())
    print(f"\n{title}: {wall:.3f} s per call (wall, median of the timed calls); profiler self time "
          f"{total_self:.3f} s, shared out in proportion to wall time below")
    print(f"{'kind':14s} {'s/call':>8s} {'share':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for kind in sorted(seconds, key=seconds.get, reverse=True):
        s = seconds[kind] / total_self * wall
        gflop = flops.get(kind, 0.0) / 1e9
        rate = f"{gflop / s:8.1f} {gflop / s / peak:8.0%}" if gflop else f"{'-':>8s} {'-':>8s}"
        ran = f"  ({', '.join(sorted(backends[kind]))})" if backends.get(kind) else ""
        print(f"{kind:14s} {s:8.3f} {s / wall:7.1%} {gflop:8.1f} {rate}{ran}")
    all_flops = sum(flops.values()) / 1e9
    print(f"{'all':14s} {wall:8.3f} {1:7.0%} {all_flops:8.1f} {all_flops / wall:8.1f} "
          f"{all_flops / wall / peak:8.0%}   ({threads} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: guidance or a mask chunk)")
    parser.add_argument("--calls", type=int, default=3, help="timed and profiled calls (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny reference model, 32 px")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's dtype")
    parser.add_argument("--linear", choices=BACKENDS_OF_LINEAR, default=None,
                        help="backend of the linear layers (default: DIFFEDIT_CPU_LINEAR, else auto)")
    parser.add_argument("--cache", default=None, help="model folder, built there if missing "
                        "(default /tmp/sd15-random; --quick: /tmp/tiny-random)")
    args = parser.parse_args()
    for name in ("size", "batch", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    arch, size = ("tiny", 32) if args.quick else ("sd15", args.size)
    model = ensure_model(arch, model_folder(args.cache, args.quick))

    pipe = DiffEditPipeline.from_pretrained(model, dtype=args.dtype, linear_backend=args.linear)
    if size % pipe.config.vae.downsample_factor:
        parser.error(f"--size must be a multiple of {pipe.config.vae.downsample_factor} (the VAE's downsampling), "
                     f"got {size}")
    side = size // pipe.config.vae.downsample_factor
    peaks = matmul_peaks(pipe.dtype, 256 if args.quick else 2048)
    peak = max(peaks.values())
    print(f"{args.dtype} matmul peak of this machine: {peak:.1f} GFLOP/s, the best of "
          + ", ".join(f"{name} {rate:.1f}" for name, rate in peaks.items()) + f" ({torch.get_num_threads()} threads)")
    theory = theoretical_peak(pipe.dtype)
    print(f"theoretical FMA peak: {theory[0]:.1f} GFLOP/s ({theory[1]})" if theory else
          "theoretical FMA peak: unknown (no clock or vector width in /proc/cpuinfo)")
    print(f"CPU: {cpu_name()}, torch capability {torch.backends.cpu.get_cpu_capability()}; "
          f"linear layers: {backend_of(pipe.unet)}; attention: {backend_name(pipe.dtype)}; torch matmul = "
          + ("its BLAS (MKL on x86)" if pipe.dtype == torch.float32 else "oneDNN, reordering the weight per call"))
    # one x_t for every row, as in each UNet call of an edit (guidance, the mask's source/target pairs):
    # the UNet runs what comes before the first cross-attention once (models/unet.py, one_x_t)
    latents = torch.randn(1, pipe.config.unet.in_channels, side, side).repeat(args.batch, 1, 1, 1).to(pipe.dtype)
    if pipe.dtype == torch.bfloat16:
        latents = latents.contiguous(memory_format=torch.channels_last)
    context = pipe.encode_prompt(["a bowl of fruit"] * args.batch)
    timesteps = torch.full((args.batch,), 500)

    with torch.no_grad():
        for title, module, call in [
                (f"UNet, batch {args.batch}, {side}x{side} latents", pipe.unet,
                 lambda: pipe.unet(latents, timesteps, context)),
                (f"VAE decode, batch 1, {size} px", pipe.vae, lambda: pipe.vae.decode(latents[:1]))]:
            flops, handles = count_flops(module)
            call()  # warm-up (packs the convolutions for this shape), counting the FLOPs on the way
            for h in handles:
                h.remove()
            wall = statistics.median(_timed(call) for _ in range(args.calls))
            seconds, backends = profile_calls(call, args.calls)
            report(title, wall, seconds, flops, peak, backends)


if __name__ == "__main__":
    main()
