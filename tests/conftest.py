"""Suite-wide settings. The tiny-config tests run on one thread: torch's thread pool costs more
than it gains on models of a few hundred thousand parameters, and on a busy 2-core machine it made
them up to 300x slower. Tests marked `slow` (full-size models) keep every thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads_for_model_size(request):
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
