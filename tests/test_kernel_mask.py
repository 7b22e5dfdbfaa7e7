"""The mask-reduction kernel (kernels/mask_reduction.py) on the CPU, under Triton's interpreter,
against the torch path of DiffEdit's mask.

Run by `test_kernels_under_the_interpreter` (test_kernels.py, which explains why these tests are
named `interpreted_test_*` and run in a child process), or directly:

    TRITON_INTERPRET=1 pytest tests/test_kernel_mask.py -o python_functions=interpreted_test_
"""

from __future__ import annotations

import pytest
import torch

from diffedit.errors import ParameterError
from diffedit.mask_maps import MaskMaps, mask_maps_torch
from reference_models import interpreted_kernel

kernel_mask = interpreted_kernel("mask_reduction")  # None outside the interpreter's process


def eps_pair(shape, dtype, seed=0):
    """Noise predictions that differ strongly in one corner region, as an edit would."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    source = target + 0.3 * torch.randn(shape, generator=g)
    source[..., : shape[-2] // 3, : shape[-1] // 2] += 1.5
    return target.to(dtype), source.to(dtype)


def assert_maps_agree(ours: MaskMaps, ref: MaskMaps, threshold: float):
    """Float tolerance: sums in another order. The masks agree wherever the torch soft value is
    not within 1e-5 of the threshold."""
    assert ours.difference.dtype == ours.soft.dtype == torch.float32 and ours.mask.dtype == torch.bool
    torch.testing.assert_close(ours.difference, ref.difference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.soft, ref.soft, rtol=1e-5, atol=1e-6)
    decided = (ref.soft - threshold).abs() > 1e-5
    assert torch.equal(ours.mask[decided], ref.mask[decided])
    assert 0 < ref.mask.sum() < ref.mask.numel()  # a mask that is neither empty nor full


def _kernel_maps(*args, **kwargs) -> MaskMaps:
    """The kernel's (difference, soft, mask) tuple as diffedit's MaskMaps."""
    difference, soft, mask = kernel_mask.mask_reduction(*args, **kwargs)
    return MaskMaps(difference=difference, soft=soft, mask=mask)


MASK_CASES = [
    # shape (B, n, C, h, w), dtype, block_pixels
    ((1, 1, 4, 8, 8), torch.float32, 1024),
    ((2, 3, 4, 13, 17), torch.float16, 64),
    ((3, 2, 4, 9, 30), torch.bfloat16, 32),
    ((1, 10, 4, 64, 64), torch.float16, 1024),
]


@pytest.mark.parametrize("normalization,threshold", [("paper", 0.5), ("mean_ratio", 0.4)])
@pytest.mark.parametrize("shape,dtype,block", MASK_CASES)
def interpreted_test_mask_kernel_matches_torch_path(shape, dtype, block, normalization, threshold):
    target, source = eps_pair(shape, dtype)
    ours = _kernel_maps(target, source, normalization, threshold, block_pixels=block)
    assert_maps_agree(ours, mask_maps_torch(target, source, normalization, threshold), threshold)


@pytest.mark.parametrize("normalization,threshold", [("paper", 0.5), ("mean_ratio", 0.4)])
@pytest.mark.parametrize("shape,dtype,block", MASK_CASES)
def interpreted_test_mask_kernel_reference_is_the_torch_path(shape, dtype, block, normalization, threshold):
    """The kernel file's own torch reference (the benchmark's baseline) is diffedit's torch path, bit for bit."""
    target, source = eps_pair(shape, dtype)
    ours = MaskMaps(*kernel_mask.mask_reduction_reference(target, source, normalization, threshold))
    ref = mask_maps_torch(target, source, normalization, threshold)
    for name in ("difference", "soft", "mask"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("normalization", ["paper", "mean_ratio"])
def interpreted_test_mask_kernel_is_bitwise_equal_when_sums_are_exact(normalization):
    """Dyadic inputs (multiples of 1/4, n * C a power of two) make every sum exact in any order:
    then the kernel and the torch path must agree bit for bit, outlier clamp included."""
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 12, 20)
    target = torch.randint(-8, 8, shape, generator=g) / 4
    source = torch.randint(-8, 8, shape, generator=g) / 4
    source[:, :, :, 3, 5] += 64.0  # an outlier per image, above mean + 3 std
    ref = mask_maps_torch(target, source, normalization)
    d = ref.difference.flatten(1)
    assert (d.amax(1) > d.mean(1) + 3 * d.std(1, unbiased=False)).all()  # the paper clamp is active
    ours = _kernel_maps(target, source, normalization, block_pixels=64)
    assert torch.equal(ours.difference, ref.difference)
    assert torch.equal(ours.soft, ref.soft)
    assert torch.equal(ours.mask, ref.mask)
    attained = ref.soft[1, 4, 7].item()  # a threshold some pixels sit exactly on: soft > threshold, not >=
    assert torch.equal(_kernel_maps(target, source, normalization, attained).mask,
                       mask_maps_torch(target, source, normalization, attained).mask)


@pytest.mark.parametrize("normalization", ["paper", "mean_ratio"])
def interpreted_test_mask_kernel_zero_map(normalization):
    target, _ = eps_pair((2, 2, 4, 10, 6), torch.float16)
    ours = _kernel_maps(target, target.clone(), normalization)
    assert not ours.difference.any() and not ours.soft.any() and not ours.mask.any()


def interpreted_test_mask_kernel_strided_inputs():
    """Views with free batch/sample/channel strides are read in place; (h, w) not contiguous is copied."""
    target, source = eps_pair((2, 4, 4, 11, 7), torch.float32)
    sliced_t, sliced_s = target[:, ::2], source[:, 1::2]  # every other sample
    ours = _kernel_maps(sliced_t, sliced_s, block_pixels=16)
    assert_maps_agree(ours, mask_maps_torch(sliced_t, sliced_s), 0.5)
    flipped_t, flipped_s = target.transpose(-1, -2), source.transpose(-1, -2)
    ours = _kernel_maps(flipped_t, flipped_s)
    assert_maps_agree(ours, mask_maps_torch(flipped_t, flipped_s), 0.5)


def interpreted_test_mask_kernel_refuses_bad_input():
    """Plain TypeError / ValueError from the kernel file, not diffedit's errors."""
    target, source = eps_pair((1, 1, 4, 8, 8), torch.float32)
    assert kernel_mask.available()
    kernel_mask.check_inputs(target, source)
    with pytest.raises(TypeError):
        kernel_mask.check_inputs(target.double(), source.double())
    for error, args, kwargs in [(ValueError, (target, source[..., :7]), {}), (ValueError, (target[0], source[0]), {}),
                                (ValueError, (target, source, "median"), {}),
                                (TypeError, (target.double(), source.double()), {}),
                                (ValueError, (target, source), {"block_pixels": 48})]:
        with pytest.raises(error) as refusal:
            kernel_mask.mask_reduction(*args, **kwargs)
        assert not isinstance(refusal.value, ParameterError)
    with pytest.raises(ValueError):
        kernel_mask.mask_reduction_reference(target, source, "median")
