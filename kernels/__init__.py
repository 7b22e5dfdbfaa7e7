"""The kernels of diffedit, imported as `diffedit.kernels`: Triton for CUDA (Triton is an optional
dependency) and C kernels for the CPU (built on first use with the system's C compiler).

- `attention`       fused attention forward (flash-attention style) for every attention of the UNet
- `mask_reduction`  DiffEdit's mask: noise predictions -> difference map -> soft map -> mask
- `bench_gpu`       benchmark against the torch paths (`python -m diffedit.kernels.bench_gpu`, CUDA only)
- `cpu_attention`   fused attention in bf16 for CPUs with AVX512-BF16 (`cpu_attention.c`) and in fp32
                    for AVX2-only CPUs (`cpu_attention_fp32.c`, `cpu_exp_avx2.h`)
- `cpu_linear`      fp32 linear layers (and 1x1 convolutions) for AVX2-only CPUs (`cpu_linear_fp32.c`)
- `cpu_geglu`       the feed-forward's gating, hidden * gelu(gate), in one pass: fp32 (AVX2) and bf16
                    (AVX512-BF16) (`cpu_geglu.c`)
- `c_build`         builds, caches (by source, compiler, flags and CPU kind) and loads the C kernels

Each kernel file holds the algorithm and its memory traffic (docstring), the jitted kernel, a
wrapper that checks its inputs (plain TypeError / ValueError) and launches it, and a torch
reference. Tensors in, tensors out: no file here imports the rest of diffedit.

This file imports nothing: the Triton submodules import Triton, and diffedit imports every kernel
lazily, in its one chooser `diffedit.devices.choose_kernel`, so that `import diffedit` works without
Triton and builds nothing.
"""
