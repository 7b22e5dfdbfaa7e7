"""diffedit's UNet against diffusers' UNet2DConditionModel: forward time on the same random
SD 1.5 weights (a benchmark script, not a test).

    python benchmarks/bench_unet.py                 # batch 2, latents 32x32 and 64x64, fp32, fp32 packed, bf16
    python benchmarks/bench_unet.py --repeats 5 --sizes 64 --dtypes bf16 fp32-packed

Both models share one set of weights (diffusers' random init, perturbed so that no layer is
trivially zero). fp32 runs in the default memory format; bf16 runs with bf16 weights and
channels_last for both models. Each configuration is warmed up once, then the two models are
timed in alternating order (ours first on even repeats, theirs first on odd ones) so that a
background load hits both alike; the table gives medians and the ratio diffedit / diffusers
(< 1: diffedit is faster), plus the relative difference of the two outputs as a sanity check.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from diffusers import UNet2DConditionModel  # noqa: E402  (oracle only: benchmarks/ is not the library)

from diffedit.models.config import UNetConfig  # noqa: E402
from diffedit.checkpoints.model_io import build_module  # noqa: E402
from diffedit.models.packed_conv import pack_convolutions  # noqa: E402
from diffedit.models.unet import UNet  # noqa: E402
from reference_models import ARCHITECTURES, perturb_  # noqa: E402

DTYPES = {"fp32": (torch.float32, torch.contiguous_format),
          # fp32 with diffedit's 3x3 convolutions packed for oneDNN (diffedit/packed_conv.py), as the
          # pipeline runs them on the CPU; diffusers' model is the same plain fp32 one
          "fp32-packed": (torch.float32, torch.contiguous_format),
          "bf16": (torch.bfloat16, torch.channels_last)}


@dataclass
class Row:
    size: int
    dtype: str
    memory_format: str
    ours: float    # median seconds per forward, diffedit
    theirs: float  # median seconds per forward, diffusers
    rel_diff: float

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs


def reference_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**ARCHITECTURES["sd15"][0]).eval().requires_grad_(False)
    perturb_(unet, seed)
    return unet


def our_unet(theirs: UNet2DConditionModel) -> UNet:
    """Our UNet on the very same tensors as `theirs` (no copy: build_module assigns them)."""
    config = UNetConfig.from_dict(dict(theirs.config))
    dtype = next(theirs.parameters()).dtype
    return build_module(lambda: UNet(config), dict(theirs.state_dict()), "UNet", dtype)


@torch.no_grad()
def seconds(forward) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = forward()
    return time.perf_counter() - start, out


@torch.no_grad()
def bench(ours: UNet, theirs: UNet2DConditionModel, size: int, dtype_name: str, batch: int, repeats: int) -> Row:
    dtype, memory_format = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(size)
    latents = torch.randn(batch, 4, size, size, generator=g).to(dtype).contiguous(memory_format=memory_format)
    context = torch.randn(batch, 77, 768, generator=g).to(dtype)
    t = torch.tensor(500)
    run = {"ours": lambda: ours(latents, t, context),
           "theirs": lambda: theirs(latents, t, encoder_hidden_states=context).sample}
    _, a = seconds(run["ours"])  # warm-up
    _, b = seconds(run["theirs"])
    rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    times = {"ours": [], "theirs": []}
    for r in range(repeats):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            times[name].append(seconds(run[name])[0])
    fmt = "channels_last" if memory_format == torch.channels_last else "contiguous"
    return Row(size, dtype_name, fmt, statistics.median(times["ours"]), statistics.median(times["theirs"]), rel)


def print_table(rows: list[Row], batch: int, repeats: int) -> None:
    print(f"\nUNet forward, SD 1.5 architecture, batch {batch}, median of {repeats}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| latents | dtype | memory format | diffedit (s) | diffusers (s) | diffedit / diffusers | output rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.size}x{r.size} | {r.dtype} | {r.memory_format} | {r.ours:.2f} | {r.theirs:.2f} | "
              f"{r.ratio:.2f} | {r.rel_diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (image size / 8)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    theirs = reference_unet(args.seed)
    rows = []
    for dtype_name in args.dtypes:
        dtype, memory_format = DTYPES[dtype_name]
        theirs = theirs.to(dtype=dtype, memory_format=memory_format)
        ours = our_unet(theirs).to(memory_format=memory_format)
        if dtype_name.endswith("-packed"):
            pack_convolutions(ours)  # packs lazily, per input shape: the warm-up call packs
        for size in args.sizes:
            rows.append(bench(ours, theirs, size, dtype_name, args.batch, args.repeats))
            r = rows[-1]
            print(f"{size}x{size} {dtype_name}: diffedit {r.ours:.2f} s, diffusers {r.theirs:.2f} s", flush=True)
        del ours
        gc.collect()
    print_table(rows, args.batch, args.repeats)


if __name__ == "__main__":
    main()
