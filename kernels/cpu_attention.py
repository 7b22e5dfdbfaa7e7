"""Fused bf16 attention on the CPU: the C kernel of cpu_attention.c, built on first use.

Why and how (algorithm, register tiles, memory traffic): the comment at the top of
cpu_attention.c. In short, softmax(q k^T * scale) v per head, with both products on VDPBF16PS
(AVX512-BF16) and the softmax of an 8-row block held in the core's caches, where torch's CPU
`scaled_dot_product_attention` reaches 14-25 % of a native-bf16 machine's peak at SD's head dims.

Build: the system's C compiler ($CC, else `cc`) with -O3 -march=native -fopenmp (without -fopenmp
if the compiler has no OpenMP: then one thread), once per source, compiler, flags and CPU kind,
into a shared library cached under $DIFFEDIT_CACHE (else $XDG_CACHE_HOME/diffedit, else
~/.cache/diffedit); written to a temporary name and renamed, so concurrent processes never load a
half-written file. Loaded after torch, it shares torch's OpenMP runtime and threads. On a CPU without AVX512-BF16 the same source compiles its portable C
path (`path()` says which), correct but slow: diffedit's "auto" rule uses this kernel only where
the fast path is built (`fast()`), and the tests run whichever path the machine has.

Tensors in, tensors out: this file imports nothing of diffedit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
SERIAL_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")   # where the compiler has no OpenMP: one thread
PROFILER_NAME = "diffedit::cpu_attention"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def _cpu_kind() -> str:
    """Model and flags of the first CPU in /proc/cpuinfo: -march=native code is for this kind only."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return os.uname().machine
    keep = ("vendor_id", "cpu family", "model", "model name", "flags")
    return "\n".join(line for line in lines if line.split(":")[0].strip() in keep)


def cache_dir() -> Path:
    if os.environ.get("DIFFEDIT_CACHE"):
        return Path(os.environ["DIFFEDIT_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffedit" / "kernels"


def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel; `extra_flags` e.g. ("-DPORTABLE_ONLY",)
    builds the portable path on a machine that has the fast one (the tests run both)."""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        raise RuntimeError(f"no C compiler ({compiler!r}) to build the CPU attention kernel") from None
    try:
        return _compiled(compiler, version, FLAGS + tuple(extra_flags))
    except RuntimeError:
        return _compiled(compiler, version, SERIAL_FLAGS + tuple(extra_flags))


def _compiled(compiler: str, version: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, _cpu_kind()]).encode()).hexdigest()
    target = cache_dir() / f"cpu_attention-{key[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"{compiler} could not build the CPU attention kernel: {last}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    library = ctypes.CDLL(str(target))
    library.kernel_path.restype = ctypes.c_char_p
    library.attention_bf16.restype = ctypes.c_int
    library.attention_bf16.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_long] * 8 + [ctypes.c_int] * 5
                                       + [ctypes.c_float, ctypes.c_int])
    return library


def library() -> ctypes.CDLL:
    """The built kernel (built once per process at first use); RuntimeError when it cannot be built."""
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = build()
            except (RuntimeError, OSError) as error:
                _failure = str(error)
        if _library is None:
            raise RuntimeError(_failure)
        return _library


@functools.cache  # asked on every attention call under "auto": once the library is loaded, it is fixed
def path() -> str:
    """"avx512_bf16" (the fast path) or "portable" (plain C), as built for this CPU."""
    return library().kernel_path().decode()


def fast() -> bool:
    """True when the kernel builds here with its AVX512-BF16 path."""
    try:
        return path() == "avx512_bf16"
    except RuntimeError:
        return False


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> None:
    """One-sentence TypeError / ValueError for what the kernel cannot serve (cheap: builds nothing)."""
    if upcast:
        raise ValueError("the CPU attention kernel computes in bf16 with fp32 sums; upcast (fp32) attention "
                         "goes to torch")
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise TypeError("q, k and v must be tensors")
    if any(x.device.type != "cpu" for x in (q, k, v)):
        raise ValueError("the CPU attention kernel takes CPU tensors only")
    if any(x.dtype != torch.bfloat16 for x in (q, k, v)):
        raise ValueError(f"the CPU attention kernel takes bf16 only, got {q.dtype}, {k.dtype}, {v.dtype}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("the CPU attention kernel has no backward pass; it serves inference only")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k and v must be (batch, tokens, heads * head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads < 1 or q.shape[2] % heads:
        raise ValueError(f"{q.shape[2]} channels do not split into {heads} heads")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False,
              built: ctypes.CDLL | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head. q: (B, Nq, heads*d), k and v: (B, Nk, heads*d), bf16 -> bf16.

    `upcast` (SD 2's fp32 attention) is not this kernel's arithmetic: the caller sends it to torch.
    `built`: a library from `build` instead of this process's `library()`."""
    check_inputs(q, k, v, heads, upcast)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, queries, channels = q.shape
    head_dim = channels // heads
    out = torch.empty(batch, queries, channels, dtype=torch.bfloat16)
    with torch.profiler.record_function(PROFILER_NAME):  # so that torch.profiler sees the C call
        status = (built or library()).attention_bf16(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            batch, heads, queries, k.shape[1], head_dim, head_dim ** -0.5, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its buffers")
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same attention in fp32 by torch's matmuls (what the tests compare against)."""
    split = lambda x: x.float().unflatten(2, (heads, -1)).transpose(1, 2)  # (B, heads, N, d)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)  # (B, N, heads * d)
