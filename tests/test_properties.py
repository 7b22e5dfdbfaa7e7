"""Property-based tests (hypothesis) of the whole edit on the tiny random model: over random image
sizes (1 to 200 px a side), modes (L, RGB, RGBA, P, I;16), file or in-memory inputs, prompts and
parameters, the pipeline either returns outputs of the input's size or raises one of the
project's own errors (DiffEditError) with a one-line message; it never crashes otherwise."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffedit import cli
from diffedit.cli import PANEL_MIN_SIDE
from diffedit.errors import DiffEditError
from diffedit.io.pictures import MAX_ENLARGED_SIDE
from diffedit.pipeline import DiffEditPipeline

MODES = ["L", "RGB", "RGBA", "P", "I;16"]


@pytest.fixture(scope="module")
def pipe(tiny_model_folder):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and robust to a busy machine
    yield DiffEditPipeline.from_pretrained(tiny_model_folder)
    torch.set_num_threads(before)


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return rgba.convert("RGB").quantize(8) if mode == "P" else rgba.convert(mode)


def expect_our_error_or(fn):
    """fn() or the DiffEditError it raised (checked to be one line); anything else propagates."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except DiffEditError as e:
        message = str(e)
        assert message and "\n" not in message and message.endswith("."), message
        return e


PROMPT = st.one_of(st.sampled_from(["a cat", "a dog", "", "  ", "a photo of a red square"]),
                   st.text(max_size=40))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), w=st.integers(1, 200), h=st.integers(1, 200), seed=st.integers(0, 1000),
       as_file=st.booleans(), source=PROMPT, target=PROMPT,
       steps=st.integers(1, 6), strength=st.floats(0.05, 1.0), samples=st.integers(1, 3),
       threshold=st.floats(0.0, 1.0), guidance=st.sampled_from([0.0, 1.0, 3.0, 7.5]))
def test_edit_outputs_have_the_input_size_or_our_error(pipe, mode, w, h, seed, as_file, source, target, steps,
                                                         strength, samples, threshold, guidance):
    image = make_image(mode, w, h, seed)
    with tempfile.TemporaryDirectory() as folder:
        source_image = image
        if as_file:
            source_image = Path(folder) / "in.png"
            image.save(source_image)
        result = expect_our_error_or(lambda: pipe(
            source_image, source_prompt=source, target_prompt=target, num_inference_steps=steps, strength=strength,
            num_mask_samples=samples, mask_threshold=threshold, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed)))
    if isinstance(result, DiffEditError):
        return
    assert result.images[0].size == (w, h) and result.images[0].mode == "RGB"
    assert result.mask.mask_images[0].size == (w, h)
    assert set(np.unique(np.asarray(result.mask.mask_images[0]))) <= {0, 255}
    assert np.isfinite(result.edit.pixels.numpy()).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), w=st.integers(1, 200), h=st.integers(1, 200), seed=st.integers(0, 1000),
       steps=st.integers(1, 5), strength=st.sampled_from(["0.3", "0.8", "1", "0", "1.2", "abc"]),
       samples=st.sampled_from(["1", "2", "0"]))
def test_cli_writes_input_sized_outputs_or_one_line(pipe, mode, w, h, seed, steps, strength, samples):
    """The command line on the same kinds of input: exit 0 and three files of the input's size
    (the panel: three pictures side by side), or exit 2, one stderr line and no file written."""
    import contextlib
    import io
    model = pipe.model.source
    with tempfile.TemporaryDirectory() as folder:
        image_path = Path(folder) / "in.png"
        make_image(mode, w, h, seed).save(image_path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["edit", str(image_path), "--source", "a cat", "--target", "a dog", "--model", model,
                             "--steps", str(steps), "--strength", strength, "--mask-samples", samples,
                             "--seed", str(seed)])
        lines = [line for line in err.getvalue().splitlines() if not line.startswith("diffedit: warning: ")]
        names = sorted(p.name for p in Path(folder).iterdir())
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("diffedit: error: "), lines
            assert names == ["in.png"]
            return
        assert code == 0 and lines == [], lines
        assert names == ["in.edit.png", "in.mask.png", "in.panel.png", "in.png"]
        for name in ("in.edit.png", "in.mask.png"):
            assert Image.open(Path(folder) / name).size == (w, h)
        k = max(1, min(-(-PANEL_MIN_SIDE // min(w, h)), MAX_ENLARGED_SIDE // max(w, h)))  # small inputs enlarged
        assert Image.open(Path(folder) / "in.panel.png").width == 3 * k * w + 16
