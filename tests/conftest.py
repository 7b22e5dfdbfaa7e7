"""Suite-wide settings and shared fixtures (plain helpers shared by tests are in reference_models.py;
no test module imports another).

The tiny-config tests run on one thread: torch's thread pool costs more than it gains on models of
a few hundred thousand parameters, and on a busy 2-core machine it made them up to 300x slower
(a 2-run sweep: 26 s -> 0.9 s). Tests marked `slow` (full-size models) keep every thread."""

from pathlib import Path

import pytest
import torch

from reference_models import build_reference


@pytest.fixture(autouse=True)
def _threads_for_model_size(request):
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """The random "tiny" reference model in diffusers layout, built once per test session
    (model_index.json is written last: a folder without it is incomplete and is built again)."""
    folder = tmp_path_factory.getbasetemp() / "tiny-random-model"
    if not (folder / "model_index.json").is_file():
        build_reference("tiny", folder, seed=0)
    return folder


@pytest.fixture
def fresh_image_warnings():
    """The image tests start as a fresh process would: diffedit.io.images' once-per-process
    warnings not yet given."""
    from diffedit.io import images

    images._warned.clear()
    yield
    images._warned.clear()
