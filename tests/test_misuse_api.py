"""Issue 8, the Python API side of the misuse table (test_misuse.py): the same family of exceptions
with the same sentence as the command line, parameters refused before any UNet sample is spent,
and the device, dtype, mask and chunk checks of the pipeline."""

from __future__ import annotations

import pytest
import torch

from diffedit import errors
from diffedit.pipeline import DiffEditPipeline
from reference_models import run_cli, snapshot
from test_misuse import CASES, Case, materialise, rgb


@pytest.fixture(scope="module")
def pipe(tiny_model_folder):
    return DiffEditPipeline.from_pretrained(tiny_model_folder)


API_CASES = ["image-missing", "image-is-folder", "image-empty-file", "image-not-an-image", "image-truncated-png",
             "image-truncated-jpeg", "image-tiny", "image-huge", "prompt-target-empty", "prompt-target-whitespace",
             "prompt-source-equals-target", "prompt-equal-up-to-spaces"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in API_CASES], ids=API_CASES)
def test_api_raises_the_same_sentence(case: Case, tmp_path, tiny_model_folder, pipe, capsys):
    argv = materialise(case.make(tmp_path, tiny_model_folder), tmp_path)
    image, source, target = argv[0], argv[2], argv[4]
    code, _, err = run_cli(["edit", *argv], capsys)
    before = snapshot(tmp_path)
    with pytest.raises(getattr(errors, case.refused)) as info:
        pipe(image, source_prompt=source, target_prompt=target, num_inference_steps=4, num_mask_samples=2)
    assert err == [f"diffedit: error: {info.value}"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kwargs, error, phrase", [
    (dict(strength=1.5), errors.ParameterError, "strength must be a number in (0, 1]"),
    (dict(strength=0.0), errors.ParameterError, "strength must be a number in (0, 1]"),
    (dict(num_inference_steps=0), errors.ParameterError, "num_inference_steps must be an integer >= 1"),
    (dict(num_inference_steps=2000), errors.ParameterError, "between 1 and 1000"),
    (dict(num_mask_samples=0), errors.ParameterError, "num_mask_samples must be an integer in [1, 100000]"),
    (dict(mask_threshold=1.5), errors.ParameterError, "mask_threshold must be a number in [0, 1]"),
    (dict(guidance_scale=-1.0), errors.ParameterError, "guidance_scale must be a number >= 0"),
])
def test_api_parameter_errors_come_before_any_unet_call(pipe, kwargs, error, phrase):
    """A bad parameter is refused before the mask is computed: no UNet sample is spent."""
    before = pipe.counters.unet_samples
    args = dict(num_inference_steps=4, num_mask_samples=2) | kwargs
    with pytest.raises(error) as info:
        pipe(rgb(), source_prompt="a cat", target_prompt="a dog", **args)
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert pipe.counters.unet_samples == before


def test_api_mask_out_of_range(pipe):
    with pytest.raises(errors.ParameterError, match=r"mask values must lie in \[0, 1\]"):
        pipe(rgb(), source_prompt="a cat", target_prompt="a dog", mask=torch.full((37, 53), 2.0),
             num_inference_steps=4)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(dtype="fp16"), "fp16 is not supported on the CPU"),
    (dict(device="cuda"), "no CUDA device"),
    (dict(device="gpu0"), "unknown device 'gpu0'"),
])
def test_api_device_and_dtype(tiny_model_folder, kwargs, phrase):
    with pytest.raises(errors.ParameterError, match=phrase.replace("(", r"\(")):
        DiffEditPipeline.from_pretrained(tiny_model_folder, **kwargs)


def test_api_nan_in_the_mask_is_reported_not_an_empty_mask(pipe, monkeypatch):
    real = DiffEditPipeline.predict_noise
    monkeypatch.setattr(DiffEditPipeline, "predict_noise",
                        lambda self, x, t, c, *a, **k: real(self, x, t, c, *a, **k) * float("nan"))
    with pytest.raises(errors.NumericalError, match="NaN or inf appeared in the mask"):
        pipe.generate_mask(rgb(), "a cat", "a dog", num_samples=2, num_inference_steps=4)


@pytest.mark.parametrize("chunk_size, phrase", [(0, "chunk_size"), (2.5, "chunk_size must be an integer")])
def test_api_bad_mask_chunk_size(pipe, chunk_size, phrase):
    with pytest.raises(errors.ParameterError, match=phrase):
        pipe.generate_mask(rgb(), "a cat", "a dog", num_samples=2, num_inference_steps=4, chunk_size=chunk_size)
