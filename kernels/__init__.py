"""Triton kernels of diffedit, imported as `diffedit.kernels` (Triton is an optional dependency).

- `attention`       fused attention forward (flash-attention style) for every attention of the UNet
- `mask_reduction`  DiffEdit's mask: noise predictions -> difference map -> soft map -> mask
- `bench_gpu`       benchmark against the torch paths (`python -m diffedit.kernels.bench_gpu`, CUDA only)

Each kernel file holds the algorithm and its memory traffic (docstring), the jitted kernel, a
wrapper that checks its inputs (plain TypeError / ValueError) and launches it, and a torch
reference. Tensors in, tensors out: no file here imports the rest of diffedit.

This file imports nothing: the submodules import Triton, and diffedit imports them lazily, in its
one chooser `diffedit.devices.choose_kernel`, so that `import diffedit` works without Triton.
"""
