"""Packed linear layers (diffedit/models/packed_linear.py), on oneDNN and on diffedit's fp32 kernel:
the same map as F.linear up to rounding on odd shapes, batch and dtype changes; plain weights in
state_dict and back through unpack; autograd and a dtype mismatch fall back to F.linear; the
backend rule and DIFFEDIT_CPU_LINEAR; the pipeline packs every linear layer of its three models
on the chosen backend."""

import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffedit import devices
from diffedit.kernels import cpu_linear
from diffedit.models import host_memory
from diffedit.errors import ParameterError
from diffedit.models import packed_linear
from diffedit.models.packed_conv import replace_children
from diffedit.models.packed_linear import (PackedLinear, PointwiseConv2d, backend_of, fits_kernel, linear_backend,
                                           pack_linears, unpack_linears)
from diffedit.pipeline import DiffEditPipeline

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(packed_linear.onednn_problem(CPU, torch.float32) is not None,
                                reason="torch built without oneDNN")

REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # fp32: another summation order (measured <= 2e-6)
# bf16: both sides round their output to bf16 (8 bits), from differently ordered fp32 sums


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def cases() -> list:  # (backend, dtype): the kernel serves fp32 only
    return ([("onednn", torch.float32), ("kernel", torch.float32)] +
            ([("onednn", torch.bfloat16)] if devices.cpu_has_fast_bf16() else []))


ODD = {"onednn": [((13, 7), True), ((1, 33), False), ((40, 1), True), ((77, 129), True)],
       "kernel": [((13, 16), True), ((1, 48), False), ((40, 32), True), ((77, 144), True)]}  # widths of 16 panels


@pytest.mark.parametrize("backend,dtype", cases(), ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("case", range(4))
def test_same_map_as_f_linear_on_odd_shapes_and_batches(case, backend, dtype):
    features, bias = ODD[backend][case]
    torch.manual_seed(0)
    linear = nn.Linear(*features, bias=bias).to(dtype)
    packed = PackedLinear(linear, backend)
    with torch.inference_mode():
        for shape in [(1, features[0]), (5, features[0]), (2, 3, features[0]), (2, 1, 4, features[0]),
                      (1, features[0])]:  # batch and rank change, and back
            x = torch.randn(shape).to(dtype)
            expected, got = F.linear(x, linear.weight, linear.bias), packed(x)
            assert got.shape == expected.shape and got.dtype == dtype
            assert rel_err(got, expected) < REL[dtype]
        wide = torch.randn(6, 2 * features[0]).to(dtype)[:, ::2]  # a strided input
        assert rel_err(packed(wide), F.linear(wide, linear.weight, linear.bias)) < REL[dtype]
        assert packed(torch.zeros(0, features[0], dtype=dtype)).shape == (0, features[1])


@pytest.mark.parametrize("backend", ["onednn", "kernel"])
def test_plain_weights_in_state_dict_parameter_count_and_repr(backend):
    torch.manual_seed(1)
    linear = nn.Linear(12, 16 if backend == "kernel" else 8)
    packed = PackedLinear(linear, backend)
    assert packed.weight.layout == (torch._mkldnn if backend == "onednn" else torch.strided)
    state = packed.state_dict()
    assert list(state) == ["weight", "bias"]
    assert torch.equal(state["weight"], linear.weight) and torch.equal(state["bias"], linear.bias)
    assert torch.equal(packed.state_dict(keep_vars=True)["weight"], linear.weight)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in linear.parameters())
    assert f"in_features=12, out_features={linear.out_features}, bias=True, {backend}" in repr(packed)


@pytest.mark.parametrize("backend", ["onednn", "kernel"])
def test_autograd_and_a_dtype_mismatch_take_the_plain_path(backend):
    torch.manual_seed(2)
    linear = nn.Linear(6, 16 if backend == "kernel" else 5)
    packed = PackedLinear(linear, backend)
    x = torch.randn(3, 6, requires_grad=True)
    packed(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    linear(x2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < REL[torch.float32]
    with pytest.raises(RuntimeError):  # torch's own dtype error, as nn.Linear gives
        packed(torch.randn(3, 6, dtype=torch.float64))


def test_a_kernel_layer_converted_to_another_dtype_runs_f_linear():
    torch.manual_seed(4)
    linear = nn.Linear(24, 32)
    packed = PackedLinear(linear, "kernel").to(torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.inference_mode():
        assert rel_err(packed(x), linear.double()(x)) < 1e-12
        packed.float()
        assert rel_err(packed(x.float()), linear.float()(x.float())) < REL[torch.float32]


def test_pack_and_unpack_restore_plain_linears():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 9), nn.SiLU(), nn.Sequential(nn.Linear(9, 3, bias=False)))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 4)
    with torch.inference_mode():
        expected = model(x)
        assert backend_of(model) == "torch" and pack_linears(model) == 2 and backend_of(model) == "onednn"
        assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
        assert rel_err(model(x), expected) < REL[torch.float32]
        assert model.state_dict().keys() == reference.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
        assert unpack_linears(model) == 2 and backend_of(model) == "torch"
        assert type(model[0]) is nn.Linear and torch.equal(model(x), expected)
        model.append(nn.Linear(3, 32))  # with "kernel", widths of 16-column panels go to the kernel
        expected = model(x)
        assert pack_linears(model, "kernel") == 3 and backend_of(model) == "kernel"
        assert [m.backend for m in model.modules() if isinstance(m, PackedLinear)] == ["onednn", "onednn", "kernel"]
        assert rel_err(model(x), expected) < REL[torch.float32]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
        assert unpack_linears(model) == 3 and backend_of(model) == "torch"


def test_packing_frees_each_replaced_layer_before_the_next():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    alive = [weakref.ref(m) for m in model]
    counts = []

    def replace(child):
        if type(child) is nn.Linear:
            counts.append(sum(ref() is not None for ref in alive))
            return PackedLinear(child)
    assert replace_children(model, replace) == 4
    assert counts == [4, 3, 2, 1] and all(ref() is None for ref in alive)


def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


@pytest.mark.skipif(host_memory._LIBC is None, reason="the C library is not glibc")
def test_blocks_freed_inside_big_blocks_mapped_go_back_to_the_system():
    host_memory.release_free_heap()  # free heap pages left resident by earlier tests would serve the blocks unseen
    before = rss_bytes()
    with host_memory.big_blocks_mapped():
        blocks = [torch.ones(2**19) for _ in range(64)]  # 64 blocks of 2 MiB, under glibc's own threshold
        grown = rss_bytes()
        del blocks
    host_memory.release_free_heap()
    assert grown - before > 100 * 2**20 and rss_bytes() - before < 32 * 2**20


def test_backend_rule_and_the_environment_variable(monkeypatch):
    monkeypatch.delenv(packed_linear.VARIABLE, raising=False)
    monkeypatch.setattr(packed_linear.platform, "machine", lambda: "x86_64")
    kernel_here = cpu_linear.chosen()
    assert linear_backend(CPU, torch.float32) == ("kernel" if kernel_here else "onednn")
    with monkeypatch.context() as m:  # asking for torch or oneDNN never builds the kernel
        m.setattr(packed_linear, "kernel_problem", lambda *_: pytest.fail("the kernel was built"))
        assert linear_backend(CPU, torch.float32, "torch") == "torch"
        assert linear_backend(CPU, torch.float32, "onednn") == "onednn"
    monkeypatch.setattr(cpu_linear, "chosen", lambda: True)  # an AVX2 CPU: the kernel in fp32 only
    assert linear_backend(CPU, torch.float32) == "kernel"
    if devices.cpu_has_fast_bf16():
        assert linear_backend(CPU, torch.bfloat16) == "onednn"
    monkeypatch.setattr(cpu_linear, "chosen", lambda: False)  # an AVX-512 CPU: oneDNN
    assert linear_backend(CPU, torch.float32) == "onednn"
    assert linear_backend(CPU, torch.float32, "torch") == "torch"
    assert linear_backend(torch.device("cuda"), torch.float32) == "torch"
    for name in ("torch", "onednn", "auto", " OneDNN ", "kernel"):
        monkeypatch.setenv(packed_linear.VARIABLE, name)
        assert linear_backend(CPU, torch.float32) == {"torch": "torch", "kernel": "kernel"}.get(name, "onednn")
    with pytest.raises(ParameterError, match="DIFFEDIT_CPU_LINEAR='kernel' cannot be served: the linear kernel "
                                             "serves fp32, not torch.float64"):
        linear_backend(CPU, torch.float64)
    with pytest.raises(ParameterError, match="linear_backend='kernel' cannot be served: the linear kernel serves "
                                             "the CPU only"):
        linear_backend(torch.device("cuda"), torch.float32, "kernel")
    monkeypatch.setenv(packed_linear.VARIABLE, "mkl")
    with pytest.raises(ParameterError, match="DIFFEDIT_CPU_LINEAR='mkl' is not a backend"):
        linear_backend(CPU, torch.float32)
    monkeypatch.setenv(packed_linear.VARIABLE, "onednn")
    with pytest.raises(ParameterError, match="serves the CPU only"):
        linear_backend(torch.device("cuda"), torch.float32)
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)  # emulated bf16: torch, or refused
    with pytest.raises(ParameterError, match="no native bf16"):
        linear_backend(CPU, torch.bfloat16)
    assert linear_backend(CPU, torch.bfloat16, "auto") == "torch"
    monkeypatch.setattr(packed_linear.platform, "machine", lambda: "aarch64")  # unmeasured: torch's default
    assert linear_backend(CPU, torch.float32, "auto") == "torch"


@pytest.mark.parametrize("backend", ["onednn", "kernel"])
def test_pipeline_packs_by_the_backend_and_keeps_its_outputs(tmp_path, monkeypatch, backend):
    from reference_models import build_reference
    folder = build_reference("tiny", tmp_path / "tiny", seed=0)[0]
    monkeypatch.setenv(packed_linear.VARIABLE, backend)
    packed = DiffEditPipeline.from_pretrained(folder)
    plain = DiffEditPipeline.from_pretrained(folder, linear_backend="torch")
    for name in ("unet", "vae", "text_encoder"):
        assert backend_of(getattr(packed, name)) == backend and backend_of(getattr(plain, name)) == "torch"
        assert not any(type(m) is nn.Linear for m in getattr(packed, name).modules())
        assert not any(fits_kernel(m) for m in getattr(packed, name).modules()) or backend != "kernel"
    if backend == "kernel":  # the 1x1 convolutions the kernel serves run on it (test_pointwise_conv.py)
        assert any(isinstance(m, PointwiseConv2d) for m in packed.unet.modules())
    with pytest.raises(ParameterError, match="linear_backend='fast' is not a backend"):
        DiffEditPipeline.from_pretrained(folder, linear_backend="fast")
    context = packed.encode_prompt(["a red circle", ""])
    assert rel_err(context, plain.encode_prompt(["a red circle", ""])) < REL[torch.float32]
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.inference_mode():
        assert rel_err(packed.unet(latents, t, context), plain.unet(latents, t, context)) < REL[torch.float32]
        assert rel_err(packed.vae.decode(latents[:1]), plain.vae.decode(latents[:1])) < REL[torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(packed.unet.state_dict().values(), plain.unet.state_dict().values()))
