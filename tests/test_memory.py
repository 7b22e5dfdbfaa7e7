"""Issue 18, class 3: the mask's memory does not depend on n. Each measurement runs in a child
process (peak RSS is per process): the embedded model, one `generate_mask` with n noise samples,
and the process's peak resident memory (ru_maxrss) printed. n = 2 and n = 2,000 must peak within
10 % of each other: the 2n UNet rows, their text states, noisy latents and noise are streamed
chunk by chunk (method.mask_difference, method.NoiseStream), and the per-sample maps are kept
only up to n = 64 unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from diffedit.pipeline import DiffEditPipeline
n = int(sys.argv[1])
pipe = DiffEditPipeline.from_pretrained()
start = time.time()
mask = pipe.generate_mask("weights/examples/red-circle.png", "a red circle", "a red triangle", num_samples=n,
                          generator=torch.Generator().manual_seed(0))
print(json.dumps({"n": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.time() - start, "unet_samples": pipe.counters.unet_samples,
                  "per_sample": mask.per_sample is not None, "area": float(mask.area[0])}))
"""


def peak(n: int) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(n)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_mask_peak_memory_does_not_depend_on_n():
    t = time.time()
    small, large = peak(2), peak(2000)
    print(f"\npeak RSS: n=2 {small['peak_mb']:.1f} MB, n=2000 {large['peak_mb']:.1f} MB "
          f"({large['seconds']:.1f} s for {large['unet_samples']} UNet samples; {time.time() - t:.0f} s in all)")
    assert large["unet_samples"] == 4000 and small["unet_samples"] == 4
    assert small["per_sample"] and not large["per_sample"]  # kept only up to n = 64 by default
    assert abs(large["peak_mb"] - small["peak_mb"]) <= 0.10 * small["peak_mb"], (small, large)


@pytest.mark.parametrize("n", [10 ** 9, 100_001])
def test_absurd_n_is_refused_up_front(n):
    from diffedit.errors import ParameterError
    from diffedit.pipeline import DiffEditPipeline
    pipe = DiffEditPipeline.__new__(DiffEditPipeline)  # the door refuses before anything is used
    with pytest.raises(ParameterError, match="num_samples must be an integer in \\[1, 100000\\]"):
        pipe.generate_mask("x.png", "a", "b", num_samples=n)
