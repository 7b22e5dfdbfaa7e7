"""Random-weight Stable Diffusion models built with the REFERENCE libraries (diffusers,
transformers), saved in diffusers layout: the oracles of the parity tests, with the helpers the
tests share (`compare`, the bar of every parity test; `TINY`, the cheapest settings that still run
every step of the pipeline). A helper module, not a test module; never imported by the library.
Shared pytest fixtures are in conftest.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffedit.models.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
CLIP_BPE = REPO / "weights" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

# SD's noise schedule, from the preset, with the PNDM keys that SD's own scheduler_config.json carries.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **asdict(PRESETS["sd1"].scheduler)}

REL_TOL = 1e-4  # the parity bar: max|ours - ref| / max|ref|
TINY = {"num_inference_steps": 4, "mask_samples": 2, "guidance_scale": 2.0}  # sweep settings for the tiny model

# name -> (unet kwargs, vae kwargs, CLIPTextConfig kwargs, pad token, prediction type)
ARCHITECTURES = {
    "sd15": (
        dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             hidden_act="quick_gelu", projection_dim=768),
        "<|endoftext|>", "epsilon"),
    "sd21": (
        dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
             upcast_attention=True, block_out_channels=(320, 640, 1280, 1280)),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
             hidden_act="gelu", projection_dim=512),
        "!", "v_prediction"),
    "tiny": (
        dict(sample_size=8, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(32, 64),
             layers_per_block=1, norm_num_groups=8,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             hidden_act="quick_gelu", projection_dim=32),
        "<|endoftext|>", "epsilon"),
    "tiny-v": (
        dict(sample_size=8, cross_attention_dim=32, attention_head_dim=(2, 4), block_out_channels=(32, 64),
             layers_per_block=1, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             hidden_act="gelu", projection_dim=32),
        "!", "v_prediction"),
}


def clip_vocab_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of OpenAI's CLIP BPE, built from the merges list shipped in weights/."""
    lines = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")[1:48894 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = _bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable characters (the order of
    the first 256 vocabulary entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random structure, so that no layer (zero-initialised biases, unit
    norms, zero out-projections) is trivially neutral."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.detach().float().std().item() if p.numel() > 1 else 0.0
            scale = scale if scale > 1e-6 else 0.05
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3 * scale)


def build_reference(arch: str, folder: Path, seed: int = 0, with_models: bool = False):
    """Build `arch` with diffusers/transformers, random weights, save it in diffusers layout.
    Returns (folder, (unet, vae, text_encoder) if with_models else None)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_kw, vae_kw, clip_kw, pad, prediction = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    folder = Path(folder)
    vocab, merges = clip_vocab_files(folder / "_vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token=pad)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=1 if pad == "<|endoftext|>" else 0, **clip_kw)
    text_encoder = CLIPTextModel(text_config).eval()
    perturb_(text_encoder, seed + 1)
    text_encoder.save_pretrained(folder / "text_encoder")
    vae = AutoencoderKL(**vae_kw).eval()
    perturb_(vae, seed + 2)
    vae.save_pretrained(folder / "vae")
    unet = UNet2DConditionModel(**unet_kw).eval()
    perturb_(unet, seed + 3)
    unet.save_pretrained(folder / "unet")
    scheduler = DDIMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction})
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if not with_models:
        del unet, vae, text_encoder
        return folder, None
    return folder, (unet, vae, text_encoder)


@dataclass(frozen=True)
class Diff:
    """How far our output is from the reference: max|a - b| and max|a - b| / max|b|."""
    name: str
    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> Diff:
    """Assert same shape and max|ours - ref| / max|ref| < tol; print and return the figures."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    ours, ref = ours.detach().double(), ref.detach().double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: the reference output is all zeros, nothing is compared"
    max_abs = (ours - ref).abs().max().item()
    diff = Diff(name, max_abs, max_abs / scale)
    print(f"[parity] {diff}")
    assert diff.max_rel < tol, f"{diff} (bar {tol:g})"
    return diff


# ---------------------------------------------------------------------- command-line test helpers
# Shared by test_cli.py and test_misuse.py (the tiny model they run on is conftest.py's
# `tiny_model_folder` fixture).

def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A w x h RGB picture of uniform noise, the same for the same seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under folder, to prove what did or did not change: a file as (size, mtime_ns,
    sha256), a symbolic link as ("link", target), anything else (a folder, a fifo) as ("other", mode)."""
    state: dict[str, tuple] = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_symlink():
            state[name] = ("link", os.readlink(p))
        elif p.is_file():
            state[name] = (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            state[name] = ("other", p.stat().st_mode)
    return state


def run_cli(argv: list, capsys) -> tuple[int, str, list[str]]:
    """diffedit's main() in this process: (exit status, stdout, stderr lines)."""
    # imported when a test runs it, not when conftest.py imports this module
    from diffedit import cli

    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # only --help exits
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def assert_png(path: Path, size: tuple[int, int] | None = None, mode: str | None = None) -> Image.Image:
    """A complete, valid PNG of this size (verify() checks every chunk's CRC, load() every pixel)."""
    with Image.open(path) as probe:
        assert probe.format == "PNG"
        probe.verify()
    image = Image.open(path)
    image.load()
    if size is not None:
        assert image.size == size
    if mode is not None:
        assert image.mode == mode
    return image


def fake_hub_cache(hf_home: Path, repo_id: str, model: Path) -> Path:
    """The layout huggingface_hub writes: hub/models--org--name/{blobs/<sha256>, refs/main,
    snapshots/<commit>/<path> -> ../../blobs/<sha256>}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(model.rglob("*")):
        relative = file.relative_to(model)
        if file.is_dir() or relative.parts[0] == "_vocab":
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def assert_same_table(rows: list[dict], reference: list[dict], tolerance: float = 1e-6) -> None:
    """Two results tables (sweep or bench rows) are the same: the same keys in the same order, each
    once, the same columns, float values equal to `tolerance` (relative and absolute; one thread
    per process may reorder sums). Columns that depend on run order (time_, cache_) are ignored."""
    from diffedit.research.plan import comparable
    assert [r["key"] for r in rows] == [r["key"] for r in reference]
    assert len({r["key"] for r in rows}) == len(rows)
    for row, ref in zip(rows, reference):
        row, ref = comparable(row), comparable(ref)
        assert row.keys() == ref.keys()
        for name, value in ref.items():
            if isinstance(value, float):
                assert math.isclose(row[name], value, rel_tol=tolerance, abs_tol=tolerance), name
            else:
                assert row[name] == value, name


# ---------------------------------------------------------------------- image-file test helpers
# Shared by test_image_input.py and test_image_refusals.py: files made byte by byte.

def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """The bytes of image saved in format fmt."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write(tmp: Path, name: str, data: bytes) -> Path:
    """data as the file tmp/name (its path)."""
    p = tmp / name
    p.write_bytes(data)
    return p


def interpreted_kernel(name: str):
    """diffedit.kernels.<name> built for Triton's interpreter, in a process started with
    TRITON_INTERPRET=1 (test_kernels.py says why); None in any other process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import importlib
    kernel = importlib.import_module(f"diffedit.kernels.{name}")
    assert kernel.INTERPRETED, f"diffedit.kernels.{name} was built before TRITON_INTERPRET=1 was set"
    return kernel
