"""GPU paths checked on a machine without a GPU: the device a user names, the GPUs Triton can compile
for, the gradients the Triton kernels cannot give, and the device a Triton kernel is launched on.

CUDA tensors are imitated by `cuda_like` (a tensor subclass that says it lives on a CUDA device; its
data stays on the CPU and no kernel is launched on it), and torch.cuda's queries are monkeypatched.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffedit import devices
from diffedit.devices import choose_kernel, parse_device
from diffedit.errors import ParameterError


class CudaLike(torch.Tensor):
    """A CPU tensor that says it is on cuda:1, for the checks that only read where a tensor is."""
    is_cuda = property(lambda self: True)
    device = property(lambda self: torch.device("cuda:1"))


def cuda_like(*shape: int, dtype: torch.dtype = torch.float16, requires_grad: bool = False) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype).as_subclass(CudaLike).requires_grad_(requires_grad)


@pytest.fixture
def gpu(monkeypatch):
    """A machine with two CUDA GPUs of compute capability `gpu.capability` (8.0 unless set)."""
    machine = SimpleNamespace(capability=(8, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: machine.capability)
    monkeypatch.setattr(torch.version, "hip", None)
    for variable in ("DIFFEDIT_ATTENTION", "DIFFEDIT_MASK_KERNEL"):
        monkeypatch.delenv(variable, raising=False)
    return machine


# --- devices a user names --------------------------------------------------------------------------

def test_a_cuda_device_the_machine_lacks_is_refused_in_one_sentence(gpu, monkeypatch):
    """cuda:N past the machine's GPUs (a typo, or torchrun's LOCAL_RANK under a CUDA_VISIBLE_DEVICES of one
    GPU per rank) passed, and the first tensor moved there died in CUDA's 'invalid device ordinal'."""
    assert parse_device("cuda:1") == torch.device("cuda:1") and parse_device("cuda") == torch.device("cuda")
    with pytest.raises(ParameterError, match=r"cuda:2 was asked for .* CUDA devices are cuda:0 to cuda:1;"):
        parse_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParameterError, match=r"CUDA devices are cuda:0;"):
        parse_device(torch.device("cuda", 1))


# --- GPUs Triton compiles for ----------------------------------------------------------------------

@pytest.mark.parametrize("capability, dtype, served", [
    ((6, 1), torch.float16, False), ((6, 1), torch.float32, False), ((7, 0), torch.float16, True),
    ((7, 5), torch.float32, True), ((7, 5), torch.bfloat16, False), ((8, 0), torch.bfloat16, True),
    ((9, 0), torch.bfloat16, True)])
def test_check_triton_gpu_follows_the_compute_capability(gpu, capability, dtype, served):
    gpu.capability = capability
    if served:
        devices.check_triton_gpu(torch.device("cuda:1"), {dtype})
    else:
        with pytest.raises(ValueError, match=rf"cuda:1 has compute capability {capability[0]}\.{capability[1]} and"):
            devices.check_triton_gpu(torch.device("cuda:1"), {dtype})


def test_check_triton_gpu_passes_the_cpu_and_rocm(gpu, monkeypatch):
    gpu.capability = (1, 0)
    devices.check_triton_gpu(torch.device("cpu"), {torch.bfloat16})
    monkeypatch.setattr(torch.version, "hip", "6.2")
    devices.check_triton_gpu(torch.device("cuda:0"), {torch.bfloat16})


def test_auto_leaves_a_gpu_too_old_for_triton_to_torch(gpu):
    pytest.importorskip("triton")
    q = cuda_like(1, 4, 16, dtype=torch.bfloat16)
    eps = cuda_like(1, 2, 4, 8, 8, dtype=torch.bfloat16)
    gpu.capability = (7, 5)  # a T4: fp16 yes, bf16 no
    assert choose_kernel("attention", (q, q, q, 2, False), "auto") is None
    assert choose_kernel("mask", (eps, eps), "auto") is None
    half = cuda_like(1, 4, 16)
    assert choose_kernel("attention", (half, half, half, 2, False), "auto") is not None
    with pytest.raises(ParameterError, match=r"Triton attention kernel cannot serve .* compute capability 7\.5"):
        choose_kernel("attention", (q, q, q, 2, False), "triton")
    gpu.capability = (6, 0)  # a P100: nothing
    assert choose_kernel("attention", (half, half, half, 2, False), "auto") is None


# --- gradients -------------------------------------------------------------------------------------

def test_auto_leaves_attention_that_needs_gradients_to_torch(gpu):
    """The kernel has no backward: its output carried no grad_fn, so gradients through attention were
    silently dropped (the residual paths still carried some: no error, wrong gradients)."""
    pytest.importorskip("triton")
    q, k, v = cuda_like(1, 4, 16, requires_grad=True), cuda_like(1, 4, 16), cuda_like(1, 4, 16)
    assert choose_kernel("attention", (q, k, v, 2, False), "auto") is None
    with pytest.raises(ParameterError, match="no backward pass"):
        choose_kernel("attention", (q, k, v, 2, False), "triton")
    with torch.no_grad():
        assert choose_kernel("attention", (q, k, v, 2, False), "auto") is not None
    eps = cuda_like(1, 2, 4, 8, 8, requires_grad=True)
    assert choose_kernel("mask", (eps, eps.detach()), "auto") is None
    with torch.inference_mode():
        assert choose_kernel("mask", (cuda_like(1, 2, 4, 8, 8), cuda_like(1, 2, 4, 8, 8)), "auto") is not None


# --- the device of a launch ------------------------------------------------------------------------

class Launches:
    """Stands for a jitted kernel: `kernel[grid](...)` records the device current at the launch."""

    def __init__(self, state: dict):
        self.state = state

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.state["launched_on"].append(self.state["current"])


@pytest.mark.parametrize("name", ["attention", "mask_reduction"])
def test_every_triton_launch_is_on_the_tensors_device(monkeypatch, name):
    """Triton launches on the current CUDA device (and its stream), not on the tensors' device: the
    wrappers launched cuda:1 tensors on cuda:0 (torchrun ranks other than 0 run on cuda:LOCAL_RANK
    without making it current). Kernels, torch.cuda.device and CUDA allocation are imitated here."""
    pytest.importorskip("triton")
    import importlib

    module = importlib.import_module(f"diffedit.kernels.{name}")
    state = {"current": 0, "launched_on": []}

    class Device:  # torch.cuda.device: makes its device current inside `with`
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, state["current"] = state["current"], self.index

        def __exit__(self, *exc):
            state["current"] = self.previous

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch, "empty", lambda *shape, device=None, **kwargs: empty(*shape, **kwargs))
    monkeypatch.setattr(module, "INTERPRETED", True)  # the wrappers' checks take the imitation's CPU data
    if name == "attention":
        monkeypatch.setattr(module, "_attention_forward", Launches(state))
        module.attention(*(cuda_like(1, 4, 16) for _ in range(3)), heads=2)
    else:
        for kernel in ("_difference_kernel", "_normalize_kernel"):
            monkeypatch.setattr(module, kernel, Launches(state))
        module.mask_reduction(cuda_like(1, 2, 4, 8, 8), cuda_like(1, 2, 4, 8, 8))
    assert state["launched_on"] and all(device == 1 for device in state["launched_on"]), state
    assert state["current"] == 0


@pytest.mark.parametrize("capability, warned", [((7, 5), True), ((7, 0), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_without_native_bf16_warns(gpu, capability, warned):
    """A T4 or V100 (7.x) runs bf16 emulated, slowly: said once, as on a CPU without native bf16."""
    import warnings
    gpu.capability = capability
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.parse_dtype("bf16", torch.device("cuda:0")) == torch.bfloat16
        assert devices.parse_dtype("fp16", torch.device("cuda:0")) == torch.float16
    said = [str(w.message) for w in caught if issubclass(w.category, devices.PrecisionWarning)]
    assert len(said) == warned and all("cuda:0 has no native bf16 (compute capability below 8.0)" in s for s in said)
