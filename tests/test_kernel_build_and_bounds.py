"""The C kernels' build cache (kernels/c_build.py) and the sizes their wrappers let through.

Found by an audit: a legal zero-stride view with 2^32 - 1 keys wrapped to -1 in ctypes' int and
corrupted the heap; a linear layer with no outputs divided by zero in C (SIGFPE); a packed weight
on another device reached C as a null pointer; a hung compiler escaped the fallback to torch; a
source edited during its compile was cached under the old text's key; CC="ccache gcc" was "no
compiler"; a failed compile showed its last stderr line, not its error; an unloadable cached
library was never rebuilt.
"""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffedit.kernels import c_build, cpu_attention, cpu_linear



@functools.cache
def portable(dtype: torch.dtype):
    return cpu_attention.build(("-DPORTABLE_ONLY",), dtype)


PROBE = 'const char *kernel_path(void) { return "%s"; }\nint value(void) { return %d; }\n'


def test_a_linear_layer_without_outputs_gives_an_empty_result():
    x = torch.randn(3, 8)
    panels = cpu_linear.pack(torch.randn(0, 8))
    assert cpu_linear.linear(x, panels).shape == F.linear(x, torch.randn(0, 8)).shape == (3, 0)
    assert cpu_linear.linear(x, panels, torch.zeros(0)).shape == (3, 0)


def test_linear_weights_and_biases_on_another_device_are_refused():
    x, panels = torch.ones(2, 8), cpu_linear.pack(torch.randn(16, 8))
    with pytest.raises(ValueError, match="fp32 CPU tensors, got .* on meta"):
        cpu_linear.linear(x, panels.to("meta"))
    with pytest.raises(ValueError, match="fp32 CPU tensors, got .* on meta"):
        cpu_linear.linear(x, panels, torch.zeros(16, device="meta"))


def test_linear_sizes_beyond_the_kernels_ints_are_refused_before_any_copy():
    x = torch.ones(1, 8).expand(cpu_linear.MAX_SIZE + 1, 8)    # no memory: a stride-0 view
    with pytest.raises(ValueError, match="at most 1,073,741,824 rows"):
        cpu_linear.linear(x, cpu_linear.pack(torch.randn(16, 8)))


@pytest.mark.parametrize("keys", [2 ** 26 + 1, 2 ** 31 + 6, 2 ** 32 - 1])
def test_attention_sizes_beyond_the_kernels_ints_are_refused(keys):
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.ones(1, 1, 8, dtype=dtype).expand(1, keys, 8)     # no memory; it used to corrupt the heap
        small = torch.ones(1, 2, 8, dtype=dtype)
        with pytest.raises(ValueError, match="at most 67,108,864 tokens"):
            cpu_attention.attention(small, big, big, heads=1, built=portable(dtype))
        with pytest.raises(ValueError, match="at most 67,108,864 tokens"):
            cpu_attention.attention(big, small, small, heads=1, built=portable(dtype))


def test_attention_without_channels_is_refused():
    q = torch.ones(1, 4, 0)
    with pytest.raises(ValueError, match="no channels"):
        cpu_attention.attention(q, q, q, heads=1, built=portable(torch.float32))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def test_a_hung_compiler_is_a_build_failure(tmp_path, cache, monkeypatch):
    hung = tmp_path / "hungcc"
    hung.write_text('#!/bin/sh\ncase "$1" in --version) echo hung 1.0;; *) sleep 30;; esac\n')
    hung.chmod(0o755)
    monkeypatch.setenv("CC", str(hung))
    monkeypatch.setattr(c_build, "BUILD_SECONDS", 1)
    source = tmp_path / "probe.c"
    source.write_text(PROBE % ("probe", 1))
    with pytest.raises(RuntimeError, match="took more than 1 s to build the probe"):
        c_build.load(source, "probe")


def test_cc_may_hold_a_command_with_arguments(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("CC", "env cc")                          # as CC="ccache gcc"
    source = tmp_path / "probe.c"
    source.write_text(PROBE % ("probe", 7))
    assert c_build.load(source, "probe").value() == 7


def test_a_failed_compile_shows_its_error_line(tmp_path, cache):
    source = tmp_path / "probe.c"
    source.write_text('#include "no_such_header.h"\n' + PROBE % ("probe", 1))
    with pytest.raises(RuntimeError, match="could not build the probe: .*no_such_header.h"):
        c_build.load(source, "probe")


def test_the_build_compiles_the_text_it_hashed(tmp_path, cache, monkeypatch):
    """An edit that lands while the compiler runs must not be cached under the old text's key."""
    source = tmp_path / "probe.c"
    source.write_text(PROBE % ("original", 1))
    run = subprocess.run

    def edit_then_compile(argv, **kwargs):
        if "--version" not in argv:
            source.write_text(PROBE % ("EDITED", 2))
        return run(argv, **kwargs)
    monkeypatch.setattr(c_build.subprocess, "run", edit_then_compile)
    assert c_build.load(source, "probe").kernel_path() == b"original"


def test_an_unloadable_cached_library_is_built_again(tmp_path, cache):
    source = tmp_path / "probe.c"
    source.write_text(PROBE % ("probe", 3))
    build = "import sys; from pathlib import Path; from diffedit.kernels import c_build; " \
            "sys.exit(c_build.load(Path(sys.argv[1]), 'probe').value())"
    assert subprocess.run([sys.executable, "-c", build, str(source)]).returncode == 3   # built by another process
    (built,) = cache.glob("probe-*.so")
    built.write_bytes(b"not a library")                      # damaged, or another user's unreadable file
    assert c_build.load(source, "probe").value() == 3
    assert built.stat().st_mode & 0o444 == 0o444              # readable by every user of a shared cache


def test_an_unwritable_cache_names_the_variable_to_set(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DIFFEDIT_CACHE", str(blocked))
    source = tmp_path / "probe.c"
    source.write_text(PROBE % ("probe", 1))
    with pytest.raises(RuntimeError, match="cannot build the probe into the cache .*set DIFFEDIT_CACHE"):
        c_build.load(source, "probe")


def test_the_c_entries_refuse_impossible_sizes_themselves():
    """The wrappers refuse these first; the C entries return -2 rather than index memory with them."""
    one = torch.ones(1, 2, 8)
    for dtype in (torch.float32, torch.bfloat16):
        entry = getattr(portable(dtype), cpu_attention.ENTRIES[dtype])
        x = one.to(dtype)
        for B, H, Nq, Nk, D in [(1, 1, 2, 0, 8), (1, 1, 2, -1, 8), (1, 0, 2, 2, 8), (1, 1, 2, 2, 0), (-1, 1, 2, 2, 8)]:
            status = entry(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), *[0] * 8, B, H, Nq, Nk, D, 1.0, 1)
            assert status == -2, (dtype, B, H, Nq, Nk, D)
    library = cpu_linear.build(("-DPORTABLE_ONLY",))
    y = torch.zeros(2, 16)
    panels = cpu_linear.pack(torch.ones(16, 8))
    assert library.linear_fp32(one.data_ptr(), 8, panels.data_ptr(), 0, y.data_ptr(), 16, -1, 8, 16, 1) == -2
    assert library.linear_fp32(one.data_ptr(), 8, panels.data_ptr(), 0, y.data_ptr(), 16, 2, 8, 0, 1) == 0
    assert not y.any()   # nothing written for N = 0
