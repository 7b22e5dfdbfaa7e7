"""Triton kernels of diffedit (imported as diffedit.kernels)."""
