"""Loading does no work it can skip: the NaN / inf check of every weight is one fp32 sum (the exact
element-wise test only when that sum is not finite), and building the model on the meta device runs
no random init that imports torch._dynamo. Together they took an SD 1.5 load from 12.4 s to
4.7-5.2 s (2-core AVX2 EPYC). Both must keep their meaning: the check still catches every NaN and
inf, and the text encoder trained from scratch still starts from the same random numbers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from diffedit.checkpoints.model_io import all_finite
from diffedit.models.clip import embedding

REPO = Path(__file__).resolve().parents[1]
SPECIAL = (float("nan"), float("inf"), float("-inf"))


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       size=st.integers(0, 300), scale=st.sampled_from([1.0, 1e4, 3e38]),
       specials=st.lists(st.tuples(st.integers(0, 299), st.sampled_from(SPECIAL)), max_size=3),
       seed=st.integers(0, 2**16))
def test_all_finite_agrees_with_the_element_wise_test(dtype, size, scale, specials, seed):
    # scale 3e38: finite fp32 values whose sum overflows (the exact fallback must say finite);
    # in fp16 / bf16 large values saturate to inf on the cast, which the answer must also see
    generator = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(size, generator=generator, dtype=torch.float64) * scale).to(dtype)
    for index, value in specials:
        if index < size:
            tensor[index] = value
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())


def test_all_finite_on_shapes_and_views():
    weight = torch.randn(8, 4, 3, 3)
    assert all_finite(weight) and all_finite(weight[:, :2]) and all_finite(weight.transpose(0, 1))
    weight[7, 3, 2, 2] = float("nan")
    assert not all_finite(weight) and all_finite(weight[:7])
    huge = torch.full((4, 4), 3e38)          # the sum overflows, every value is finite
    assert all_finite(huge)
    huge[1, 1] = float("-inf")
    assert not all_finite(huge)


@pytest.mark.parametrize("count, width", [(1, 1), (77, 32), (1000, 7)])
def test_embedding_starts_from_the_same_random_numbers_as_nn_embedding(count, width):
    torch.manual_seed(1234)
    reference, after_reference = nn.Embedding(count, width), torch.rand(5)
    torch.manual_seed(1234)
    ours, after_ours = embedding(count, width), torch.rand(5)
    assert type(ours) is nn.Embedding and ours.weight.requires_grad
    assert torch.equal(ours.weight, reference.weight)
    assert torch.equal(after_ours, after_reference)          # the generator moved by the same amount
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_embedding_on_the_meta_device_allocates_and_draws_nothing():
    state = torch.random.get_rng_state()
    with torch.device("meta"):
        table = embedding(49408, 768)
    assert table.weight.is_meta and table.weight.shape == (49408, 768)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_loading_a_model_does_not_import_torch_dynamo():
    # in a fresh interpreter: importing torch._dynamo costs 1.3-2 s of every load (the meta-device
    # normal_ of nn.Embedding's own init did it); loading the embedded model must not need it
    code = textwrap.dedent("""
        import sys
        from diffedit.pipeline import DiffEditPipeline
        DiffEditPipeline.from_pretrained(sys.argv[1])
        print("torch._dynamo" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "weights" / "shapes-64")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False"], run.stdout
