"""Triton kernels of diffedit, imported as `diffedit.kernels` (Triton is an optional dependency).

- `attention`       fused attention forward (flash-attention style) for every attention of the UNet
- `mask_reduction`  DiffEdit's mask: noise predictions -> difference map -> soft map -> mask
- `bench_gpu`       benchmark against the torch paths (`python -m diffedit.kernels.bench_gpu`, CUDA only)

This file imports nothing: the submodules import Triton, and callers import them lazily
(`diffedit.attention`, `diffedit.mask_maps`) so that `import diffedit` works without Triton.
"""
