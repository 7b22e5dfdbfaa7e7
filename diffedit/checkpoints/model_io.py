"""Reading checkpoints safely and leanly, renaming their keys, and loading them strictly.

- Files: `.safetensors` first; `.bin` / `.ckpt` only through `torch.load(weights_only=True)`, so
  a pickle that asks to run code is refused (UnsafeCheckpointError) before anything runs.
- Lean: modules are built on the meta device (no memory), and each checkpoint tensor is moved
  into place (`load_state_dict(assign=True)`) one by one, cast to the requested dtype on the way:
  the weights are never held twice.
- Strict: every checkpoint tensor consumed, every parameter filled, every shape right, or one
  error that lists what is missing, unexpected or of the wrong shape.
- Renames are small pure functions of one key (diffusers/transformers layout -> ours); the
  UNet's names are diffusers' own and need none.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
import torch.nn as nn

from diffedit.errors import ModelLoadError, UnsafeCheckpointError
from diffedit.io.files import resolves_inside

StateDict = dict  # key -> torch.Tensor, or LazyTensor (safetensors, read on load)


# ---------------------------------------------------------------- key renames (pure functions)

def rename_text_encoder_key(key: str) -> str | None:
    """transformers' CLIPTextModel -> ours: drop the `text_model.` and `encoder.` levels; the
    `position_ids` buffer some checkpoints carry is not a weight (None = drop)."""
    if key.endswith("position_ids"):
        return None
    return re.sub(r"^(text_model\.)?(encoder\.)?", "", key)


def text_encoder_key_to_transformers(key: str) -> str:
    """Ours -> transformers' CLIPTextModel (the inverse of `rename_text_encoder_key`), the names of
    a diffusers folder's text encoder and of an SD 1.x single file's (under its prefix)."""
    return "text_model." + re.sub(r"^layers\.", "encoder.layers.", key)


_VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_vae_key(key: str) -> str:
    """Old diffusers VAE attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m[1]}{_VAE_LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key


def rename_state_dict(state_dict: StateDict, rename: Callable[[str], str | None]) -> StateDict:
    renamed = {}
    for key, tensor in state_dict.items():
        new = rename(key)
        if new is not None:
            renamed[new] = tensor
    return renamed


# ---------------------------------------------------------------- reading files

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class LazyTensor:
    """One tensor of a safetensors file, read only when `load()` is called: a checkpoint can be
    checked key by key and shape by shape before any weight is read."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, torch.Size(shape)

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read straight into a fresh tensor (no mmap, no intermediate copy), then cast."""
        tensor = torch.empty(self.shape, dtype=self.dtype)
        if tensor.numel():
            buffer = tensor.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                if f.readinto(buffer) != len(buffer):
                    raise ModelLoadError(f"{self.path} is truncated (it got shorter after it was opened); "
                                         "download it again.")
        return tensor if dtype is None or dtype == self.dtype else tensor.to(dtype)


def read_safetensors(path: Path) -> dict[str, LazyTensor]:
    """The index of a safetensors file (format: u64 header length, JSON header, raw data),
    validated against the file size so a truncated or corrupt download is caught up front."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= header_len <= min(size - 8, 100_000_000):
                raise ModelLoadError(f"{bad} (bad header length: corrupt or truncated); download it again.")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{bad} (unreadable header: corrupt or truncated); download it again.") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{bad} (its header is a JSON {type(header).__name__}, not an object); download it again.")
    start, tensors, spans = 8 + header_len, {}, []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), meta["data_offsets"]
            if not all(_is_count(v) for v in (*shape, begin, end)):
                raise TypeError(key)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{bad} (entry {key!r} is malformed); download it again.") from None
        if math.prod(max(n, 1) for n in shape) * dtype.itemsize >= 2 ** 62:  # beyond what torch can index
            raise ModelLoadError(f"{bad} (entry {key!r} has the impossible shape {list(shape)}); download it again.")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ModelLoadError(f"{bad} (entry {key!r} has inconsistent offsets); download it again.")
        spans.append((begin, end, key))
        tensors[key] = LazyTensor(path, start + begin, dtype, shape)
    _check_tiling(path, spans, start, size)
    return tensors


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], start: int, size: int) -> None:
    """The tensors' (begin, end, key) byte ranges must tile the data section (from `start` to the
    file's `size`) exactly, as the safetensors library requires: no overlap (two weights read from
    the same bytes), no gap, no byte missing or left over."""
    bad = f"{path} is not a valid safetensors file"
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ModelLoadError(f"{bad} (entry {key!r} {'overlaps another' if begin < position else 'leaves a gap'} "
                                 "in the data); download it again.")
        position = end
    if start + position > size:
        raise ModelLoadError(f"{path} is truncated ({size:,} bytes, its header needs {start + position:,}); "
                             "download it again.")
    if start + position < size:
        raise ModelLoadError(f"{bad} ({size - start - position:,} bytes follow its last tensor); download it again.")


def _is_count(value) -> bool:
    """A non-negative int (not a bool, not a string): what shapes and offsets must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_state_dict(path: str | Path, lazy: bool = False) -> StateDict:
    """All tensors of one checkpoint file (.safetensors, .bin, .ckpt, .pt, .pth), on the CPU.
    With lazy=True a safetensors file gives LazyTensors, read when loaded into a module."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        index = read_safetensors(path)
        return index if lazy else {k: t.load() for k, t in index.items()}
    return _torch_load(path)


def _torch_load(path: Path) -> StateDict:
    try:
        try:  # mmap keeps the file out of RAM until used; old (non-zip) pickles cannot be mapped
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # torch's loaders raise EOFError, KeyError, RuntimeError, BadZipFile... on damaged data
        if isinstance(e, pickle.UnpicklingError) and _asks_for_objects(path):
            raise UnsafeCheckpointError(
                f"{path} is a pickle that asks to run code or build objects other than tensors; it was refused and "
                "nothing was executed: use a .safetensors file, or convert this one only if you trust its source."
            ) from None
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated, or another kind "
                             "of file); download it again or pass a .safetensors file.") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]  # Lightning-style wrapper of the original SD checkpoints
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a dictionary of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


_SAFE_MODULES = ("torch", "collections", "_codecs", "builtins", "numpy")  # what torch's weights_only may rebuild
_OBJECT_OPS = {"GLOBAL", "STACK_GLOBAL", "INST"}


def _asks_for_objects(path: Path, limit: int = 64 << 20) -> bool:
    """True if the file holds well-formed pickles naming a callable outside torch's tensor world
    (a pickle that asks to run code); False for bytes that are no pickle at all (damaged file,
    random data, a text file, an empty zip). Read with pickletools: nothing is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
        else:
            with open(path, "rb") as f:
                streams = [f.read(limit)]  # legacy format: the pickles come first, then raw storages
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return False
    for data in streams:
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            strings, names = [], []
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(strings[-2])
                    elif op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).split(" ")[0])
            except Exception:  # not (or no longer) a pickle: stop reading this stream
                break
            if any(not name.split(".")[0] in _SAFE_MODULES for name in names):
                return True
    return False


def _first_line(e: BaseException, default: str = "") -> str:
    """The first sentence of an exception's message (torch's can run on for several)."""
    text = str(e).strip().splitlines()
    first = re.split(r"(?<=[.!?])\s", text[0])[0].rstrip(".")[:160] if text else ""
    return first or default or type(e).__name__


WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def model_root(folder: Path) -> Path:
    """The real folder every file of the model at `folder` must lie in: the folder itself or, for
    a Hugging Face cache snapshot (models--org--name/snapshots/REVISION, whose files are links to
    ../../blobs/SHA), the repository's cache folder models--org--name."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def inside(path: Path, root: Path) -> Path:
    """`path`, refused unless it resolves (through any symbolic link) inside `root`, a `model_root`."""
    if not resolves_inside(path, root):
        raise ModelLoadError(f"{path} leads through a symbolic link to {os.path.realpath(path)}, outside the model "
                             f"folder {root}; the model folder is damaged or malicious: copy the file into it or "
                             "download the model again.")
    return path


def find_weights(folder: Path, root: Path, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one diffusers/transformers component folder of the model in `root`,
    safetensors first; sharded checkpoints (`*.index.json`) give all their shards (plain file names
    of the same folder: a shard named by a path, e.g. `../../etc/passwd`, is refused), and no
    file may be a link out of `root`."""
    infix = f".{variant}" if variant else ""
    for suffix in (".safetensors", ".bin"):
        for name in WEIGHT_NAMES:
            single = folder / f"{name}{infix}{suffix}"
            if single.is_file():
                return [inside(single, root)]
            index = folder / f"{name}{infix}{suffix}.index.json"
            if index.is_file():
                return [inside(folder / shard, root) for shard in shard_names(inside(index, root))]
    if variant:
        hint = f" (no '{variant}' variant: try without variant)" if find_weights(folder, root) else ""
    else:
        hint = ""
    raise ModelLoadError(f"no weights in {folder}{hint}; expected diffusion_pytorch_model.safetensors, "
                         "model.safetensors or a .bin of the same name.")


def shard_names(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index lists in its weight_map, each checked to
    be a plain file name inside the index's own folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map (tensor name -> shard file); restore the file or "
                             "download the model again.")
    for shard in weight_map.values():
        if not is_plain_name(shard):
            raise ModelLoadError(f"{index} names the shard {shard!r}, which is not a file name inside {index.parent}; "
                                 "the index is damaged or malicious: restore it or download the model again.")
    return list(dict.fromkeys(weight_map.values()))


def is_plain_name(name) -> bool:
    """A file name with no folder part: what a path built from a file's data may be."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\\" not in name and "\0" not in name
            and PurePosixPath(name).name == name)


def read_component(folder: Path, root: Path, variant: str | None = None) -> StateDict:
    """The (lazy, for safetensors) state dict of one component folder of the model in `root`."""
    state_dict: StateDict = {}
    for file in find_weights(folder, root, variant):
        state_dict.update(read_state_dict(file, lazy=True))
    return state_dict


def read_json(path: Path) -> dict:
    """A JSON object (a config, an index) or ModelLoadError naming the file."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; a diffusers-layout model folder needs it.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({_first_line(e)}); restore the file.") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path} ({e.strerror or type(e).__name__}); check its permissions.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; restore the file.")
    return data


# ---------------------------------------------------------------- strict, lean loading

def check_state_dict(module: nn.Module, state_dict: StateDict, name: str) -> None:
    """Raise one error listing missing keys, unexpected keys, shape mismatches and integer or bool
    tensors where the module has floating-point weights."""
    reference = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
                   for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    kind = sorted(f"{k} ({str(state_dict[k].dtype).removeprefix('torch.')})" for k in set(expected) & set(state_dict)
                  if reference[k].is_floating_point() and not state_dict[k].dtype.is_floating_point)
    if missing or unexpected or wrong or kind:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                             ("not floating point", kind)):
            if items:
                shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
                parts.append(f"{label}: {shown}")
        raise ModelLoadError(f"the {name} weights do not fit its config ({'; '.join(parts)}); "
                             "the checkpoint is of another architecture or the config is wrong (or the file is damaged).")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. A NaN or an inf makes the sum NaN or inf, so a finite fp32 sum
    proves it in one read, 10-20x faster than `isfinite(t).all()` (5 s of an SD load); only a sum
    that overflows (or a real NaN) pays for the exact element-wise test."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def build_module(factory: Callable[[], nn.Module], state_dict: StateDict, name: str,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Build a module without allocating memory, check the state dict strictly, then move the
    tensors into place, cast to `dtype` one by one while `state_dict` empties: the weights are
    never held twice (a tensor already of the right dtype and device is used as it is)."""
    with torch.device("meta"):
        module = factory()
    check_state_dict(module, state_dict, name)
    cast = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        target = dtype if tensor.dtype.is_floating_point else tensor.dtype
        tensor = tensor.load(target) if isinstance(tensor, LazyTensor) else tensor
        cast[key] = tensor.to(device=device, dtype=target)
        if target.is_floating_point and not all_finite(cast[key]):
            raise ModelLoadError(f"the {name} weight {key} holds NaN or inf values, so every result would be NaN; "
                                 "the checkpoint is damaged: download it again.")
    module.load_state_dict(cast, strict=True, assign=True)
    return module.eval().requires_grad_(False)
