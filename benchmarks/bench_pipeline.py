"""One DiffEdit edit by diffedit (fp32 and bf16) and by diffusers' StableDiffusionDiffEditPipeline
(fp32, its defaults) on the same random-weight SD 1.5 model: time per phase, UNet samples, peak
memory, and the ratios issue 7 asks for. A benchmark script, not a test.

    python benchmarks/bench_pipeline.py                  # SD 1.5 architecture, 256 px (~10 min on 2 cores)
    python benchmarks/bench_pipeline.py --quick          # the tiny reference model: checks the script
    python benchmarks/bench_pipeline.py --repeats 2 --json out.json
    python benchmarks/bench_pipeline.py --size 512       # SD's own resolution (~4x the time)

Workload: n = 10 mask samples, 20 steps, encoding ratio r = 0.8, guidance 7.5, one 256 x 256
synthetic picture. diffedit runs `generate_mask`, `invert`, `edit` (its defaults: 2n mask samples,
unconditional inversion, one VAE encode); diffusers runs `generate_mask`, `invert`, `__call__`
with its defaults (DDIMScheduler and DDIMInverseScheduler from the folder's scheduler config).

Every run is a separate child process, so its peak resident memory (ru_maxrss, from wait4) is its
own; runs alternate in order across repeats. Inside a child: load (not counted in the edit), the
three phases timed with perf_counter, the UNet's forward wrapped to count samples and sum its time,
the VAE's encode/decode and the text encoder wrapped and timed. After the edit the diffedit
children time the bare UNet (median of 3 calls) at each batch size the edit used (mask and decoding
2, inversion 1) to give the floor: edit time / the same calls made bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from diffedit.devices import cpu_name  # noqa: E402, F401 - the other benchmarks import it from here

SOURCE, TARGET = "a bowl of fruit on a wooden table", "a bowl of pears on a wooden table"
RUNS = ("diffedit-fp32", "diffusers-fp32", "diffedit-bf16", "diffedit-bf16-sdpa")
DEFAULT_RUNS = RUNS[:3]
# runs that differ from another only by an environment variable: bf16 with torch's attention instead
# of the CPU kernel (what the kernel is worth, measured in the same alternation)
RUN_ENVIRONMENT = {"diffedit-bf16-sdpa": {"DIFFEDIT_ATTENTION": "torch"}}


@dataclass
class Workload:
    arch: str = "sd15"
    size: int = 256          # input side in pixels
    mask_samples: int = 10   # n
    steps: int = 20
    strength: float = 0.8    # r
    guidance: float = 7.5
    seed: int = 0


@dataclass
class RunResult:
    """What one child reports (seconds, counts); peak_rss_gb is filled in by the parent."""
    name: str
    load: float = 0.0
    phases: dict = field(default_factory=dict)      # mask, inversion, decode: wall seconds
    cpu_phases: dict = field(default_factory=dict)  # the same phases: CPU seconds of the process (all threads)
    unet_samples: int = 0
    unet_seconds: float = 0.0                       # inside UNet forward, summed
    vae_encodes: int = 0
    vae_decodes: int = 0
    vae_seconds: float = 0.0                        # inside VAE encode + decode, summed
    text_seconds: float = 0.0
    unet_calls: dict = field(default_factory=dict)  # batch size -> UNet calls at that size in the edit
    bare_calls: dict = field(default_factory=dict)  # batch size -> seconds of one bare UNet call (diffedit only)
    peak_rss_gb: float = 0.0
    load_average: float = 0.0                       # 1-minute load average at the end of the run
    linear_backend: str = "torch"                   # what ran the linear layers (diffedit: packed_linear)
    attention_backend: str = "torch"                # what ran the UNet's attention (diffedit: models/attention.py)

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_phases.values())


# ---------------------------------------------------------------------- inputs

def ensure_model(arch: str, folder: Path) -> Path:
    """The random-weight reference model in diffusers layout, built once (in a child process, so
    the parent never holds its weights) and reused from `folder`."""
    if all((folder / c).is_dir() for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        return folder
    print(f"building the random-weight {arch} model in {folder} ...", flush=True)
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from reference_models import build_reference; "
            "build_reference(sys.argv[1], sys.argv[2], seed=0)")
    subprocess.run([sys.executable, "-c", code, arch, str(folder), str(REPO / "tests")], check=True)
    return folder


def model_folder(cache: str | None, quick: bool) -> Path:
    """Where the reference model lives (`--cache`, or a default per model size)."""
    return Path(cache or ("/tmp/tiny-random" if quick else "/tmp/sd15-random"))


def synthetic_picture(size: int, seed: int = 0) -> Image.Image:
    """A fixed picture: wall and table, a bowl, three fruits, mild noise."""
    rng = np.random.default_rng(seed)
    s = size / 256
    img = Image.new("RGB", (size, size), (196, 186, 170))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(150 * s), size, size], fill=(120, 80, 45))
    for (x, y, r, c) in ((100, 128, 24, (200, 40, 30)), (140, 122, 22, (230, 180, 40)), (122, 106, 20, (90, 160, 50))):
        d.ellipse([int((x - r) * s), int((y - r) * s), int((x + r) * s), int((y + r) * s)], fill=c)
    d.chord([int(60 * s), int(100 * s), int(196 * s), int(190 * s)], 0, 180, fill=(70, 90, 150))
    img = img.filter(ImageFilter.GaussianBlur(1.0 * s))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------- instrumentation

class Meter:
    """Wrap obj.method (on the instance): count rows of the first argument and calls per batch size,
    and sum the time."""

    def __init__(self, obj, method: str):
        self.seconds, self.batches = 0.0, {}  # batch size -> calls
        inner = getattr(obj, method)

        def timed(x, *args, **kwargs):
            start = time.perf_counter()
            out = inner(x, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.batches[x.shape[0]] = self.batches.get(x.shape[0], 0) + 1
            return out
        setattr(obj, method, timed)
        self.inner = inner

    @property
    def rows(self) -> int:
        return sum(batch * calls for batch, calls in self.batches.items())


def run_phases(phases: list[tuple[str, callable]]) -> tuple[dict, dict]:
    """Wall and CPU seconds of each phase. CPU time (process_time, all threads) is the figure to
    compare when other jobs share the machine: wall time then depends on their load."""
    wall, cpu = {}, {}
    for name, fn in phases:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
    return wall, cpu


@torch.inference_mode()
def bare_unet_call(unet_forward, latents: torch.Tensor, context: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one UNet forward on these rows (all sharing one x_t, as in every call of an edit)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet_forward(latents, 500, context)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------- the children

def child_diffedit(model: Path, image: Path, dtype: str, w: Workload, out: Path) -> RunResult:
    from diffedit.pipeline import DiffEditPipeline
    result = RunResult(f"diffedit-{dtype}")
    start = time.perf_counter()
    pipe = DiffEditPipeline.from_pretrained(model, dtype=dtype)
    result.load = time.perf_counter() - start
    from diffedit.models.packed_linear import backend_of
    result.linear_backend = backend_of(pipe.unet)
    from diffedit.models.attention import backend_name
    result.attention_backend = backend_name(pipe.dtype)
    unet, enc, dec = Meter(pipe.unet, "forward"), Meter(pipe.vae, "encode"), Meter(pipe.vae, "decode")
    text = Meter(pipe.text_encoder, "forward")
    picture = Image.open(image).convert("RGB")
    generator = torch.Generator().manual_seed(w.seed)
    state = {}
    result.phases, result.cpu_phases = run_phases([
        ("mask", lambda: state.update(mask=pipe.generate_mask(
            picture, SOURCE, TARGET, num_samples=w.mask_samples, num_inference_steps=w.steps,
            generator=generator, resolution=w.size))),
        ("inversion", lambda: state.update(inversion=pipe.invert(
            picture, strength=w.strength, num_inference_steps=w.steps, resolution=w.size))),
        ("decode", lambda: state.update(edit=pipe.edit(
            state["inversion"], state["mask"], TARGET, guidance_scale=w.guidance))),
    ])
    np.save(out.with_suffix(".npy"), state["edit"].pixels.float().numpy())
    np.save(out.with_suffix(".mask.npy"), state["mask"].mask.numpy())
    _fill(result, unet, enc, dec, text)
    result.unet_calls = dict(sorted(unet.batches.items()))
    for batch in result.unet_calls:
        latents = state["inversion"].latents[:, 0].repeat(batch, 1, 1, 1).to(pipe.dtype)
        if pipe.dtype == torch.bfloat16:
            latents = latents.contiguous(memory_format=torch.channels_last)
        context = pipe.encode_prompt(([SOURCE, TARGET] * batch)[:batch])
        result.bare_calls[batch] = bare_unet_call(unet.inner, latents, context)
    return result


def child_diffusers(model: Path, image: Path, w: Workload, out: Path) -> RunResult:
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import \
        StableDiffusionDiffEditPipeline
    from transformers import CLIPTextModel, CLIPTokenizer
    result = RunResult("diffusers-fp32")
    start = time.perf_counter()
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
    pipe = StableDiffusionDiffEditPipeline(
        vae=AutoencoderKL.from_pretrained(model / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer", model_max_length=77),
        unet=UNet2DConditionModel.from_pretrained(model / "unet").eval(),
        scheduler=scheduler, inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    result.load = time.perf_counter() - start
    unet, enc, dec = Meter(pipe.unet, "forward"), Meter(pipe.vae, "encode"), Meter(pipe.vae, "decode")
    text = Meter(pipe.text_encoder, "forward")
    picture = Image.open(image).convert("RGB")
    generator = torch.Generator().manual_seed(w.seed)
    state = {}
    result.phases, result.cpu_phases = run_phases([
        ("mask", lambda: state.update(mask=pipe.generate_mask(
            image=picture, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=w.mask_samples,
            num_inference_steps=w.steps, guidance_scale=w.guidance, generator=generator))),
        ("inversion", lambda: state.update(latents=pipe.invert(
            prompt=SOURCE, image=picture, inpaint_strength=w.strength, num_inference_steps=w.steps,
            guidance_scale=w.guidance, generator=generator).latents)),
        ("decode", lambda: state.update(edit=pipe(
            prompt=TARGET, mask_image=state["mask"], image_latents=state["latents"], inpaint_strength=w.strength,
            num_inference_steps=w.steps, guidance_scale=w.guidance, generator=generator, output_type="np").images)),
    ])
    np.save(out.with_suffix(".npy"), np.asarray(state["edit"], dtype=np.float32))
    _fill(result, unet, enc, dec, text)
    return result


def _fill(result: RunResult, unet: Meter, enc: Meter, dec: Meter, text: Meter) -> None:
    result.unet_samples, result.unet_seconds = unet.rows, unet.seconds
    result.vae_encodes, result.vae_decodes = enc.rows, dec.rows
    result.vae_seconds, result.text_seconds = enc.seconds + dec.seconds, text.seconds


def child_main(args) -> None:
    torch.manual_seed(0)
    w = Workload(**json.loads(args.workload))
    out = Path(args.out)
    if args.child == "diffusers-fp32":
        result = child_diffusers(Path(args.model), Path(args.image), w, out)
    else:
        result = child_diffedit(Path(args.model), Path(args.image), args.child.split("-")[1], w, out)
    result.name = args.child
    result.load_average = os.getloadavg()[0]
    out.write_text(json.dumps(asdict(result)))


# ---------------------------------------------------------------------- the parent

def run_child(name: str, model: Path, image: Path, w: Workload, work: Path, repeat: int) -> RunResult:
    out = work / f"{name}-{repeat}.json"
    cmd = [sys.executable, __file__, "--child", name, "--model", str(model), "--image", str(image),
           "--workload", json.dumps(asdict(w)), "--out", str(out)]
    print(f"running {name} (repeat {repeat + 1}) ...", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, **RUN_ENVIRONMENT.get(name, {})})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} run failed with exit code {proc.returncode}; see its output above.")
    data = json.loads(out.read_text())
    data["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # Linux reports kilobytes
    for key in ("unet_calls", "bare_calls"):  # JSON keys are strings: batch sizes back to ints
        data[key] = {int(batch): value for batch, value in data[key].items()}
    return RunResult(**data)


def median_run(runs: list[RunResult]) -> RunResult:
    """The run of median edit time (one run when there is one repeat)."""
    return sorted(runs, key=lambda r: r.total)[len(runs) // 2]


def pixel_difference(work: Path, a: str, b: str) -> tuple[float, float]:
    """Max and mean |a - b| of two edits, in 8-bit levels (diffedit pixels are in [-1, 1])."""
    x, y = (np.load(work / f"{name}-0.npy") for name in (a, b))
    diff = np.abs(x - y) * 127.5
    return float(diff.max()), float(diff.mean())


def mask_disagreement(work: Path, a: str, b: str) -> float:
    """Fraction of latent cells where two runs' binary masks differ."""
    x, y = (np.load(work / f"{name}-0.mask.npy") for name in (a, b))
    return float((x != y).mean())


def print_report(results: dict[str, RunResult], work: Path, w: Workload) -> dict:
    print(f"\nOne edit, {w.arch} random weights, {w.size} px, n={w.mask_samples}, {w.steps} steps, r={w.strength}, "
          f"guidance {w.guidance}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    from diffedit.devices import cpu_has_fast_bf16
    print(f"CPU: {cpu_name()}; torch capability {torch.backends.cpu.get_cpu_capability()}, native bf16 convolutions: "
          f"{'yes' if cpu_has_fast_bf16() else 'NO (bf16 is emulated and slower than fp32 here)'}")
    print("linear layers: " + ", ".join(f"{r.name} {r.linear_backend}" for r in results.values()) +
          f" (DIFFEDIT_CPU_LINEAR={os.environ.get('DIFFEDIT_CPU_LINEAR', 'auto')})")
    print("attention: " + ", ".join(f"{r.name} {r.attention_backend}" for r in results.values()) +
          f" (DIFFEDIT_ATTENTION={os.environ.get('DIFFEDIT_ATTENTION', 'auto')})")
    print("| run | load s | mask s | inversion s | decode s | edit total s | in UNet s | VAE s | text s | "
          "UNet samples | VAE enc/dec | peak RSS GB | edit CPU s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        p = r.phases
        print(f"| {r.name} | {r.load:.1f} | {p['mask']:.2f} | {p['inversion']:.2f} | {p['decode']:.2f} | "
              f"{r.total:.2f} | {r.unet_seconds:.2f} | {r.vae_seconds:.2f} | {r.text_seconds:.2f} | "
              f"{r.unet_samples} | {r.vae_encodes}/{r.vae_decodes} | {r.peak_rss_gb:.2f} | {r.cpu_total:.1f} | "
              f"{r.load_average:.1f} |")
    theirs, fp32, bf16 = (results.get(name) for name in ("diffusers-fp32", "diffedit-fp32", "diffedit-bf16"))
    summary = {}
    if theirs and fp32:
        summary["speed fp32: diffusers / diffedit fp32 (target >= 2.0)"] = theirs.total / fp32.total
        summary["CPU time fp32: diffusers / diffedit fp32"] = theirs.cpu_total / fp32.cpu_total
        summary["peak RSS: diffedit fp32 / diffusers fp32 (target <= 0.85)"] = fp32.peak_rss_gb / theirs.peak_rss_gb
    if theirs and bf16:
        summary["speed bf16: diffusers fp32 / diffedit bf16 (target >= 4.5)"] = theirs.total / bf16.total
        summary["CPU time bf16: diffusers fp32 / diffedit bf16"] = theirs.cpu_total / bf16.cpu_total
        summary["peak RSS: diffedit bf16 / diffusers fp32 (target <= 0.5)"] = bf16.peak_rss_gb / theirs.peak_rss_gb
    for r in (x for x in (fp32, bf16) if x):
        for batch, seconds in r.bare_calls.items():
            summary[f"{r.name}: bare UNet call s, batch {batch} ({r.unet_calls[batch]} in the edit)"] = seconds
        floor = sum(r.unet_calls[batch] * seconds for batch, seconds in r.bare_calls.items())
        summary[f"{r.name}: edit total / its UNet calls made bare (target <= 1.10)"] = r.total / floor
        # the same question without the bare timing's run-to-run noise: how much is spent outside the UNet
        summary[f"{r.name}: edit total / time inside the UNet"] = r.total / r.unet_seconds
    sdpa = results.get("diffedit-bf16-sdpa")
    if bf16 and sdpa:
        summary["bf16: edit with torch's attention / with diffedit's attention"] = sdpa.total / bf16.total
    if theirs and sdpa:
        summary["speed bf16, torch's attention: diffusers fp32 / diffedit bf16"] = theirs.total / sdpa.total
    if fp32 and bf16:
        summary["bf16 vs fp32 edit: max |diff| (8-bit levels)"], summary["bf16 vs fp32 edit: mean |diff| (8-bit levels)"] = \
            pixel_difference(work, "diffedit-fp32", "diffedit-bf16")
        summary["bf16 vs fp32 mask: fraction of latent cells that differ"] = \
            mask_disagreement(work, "diffedit-fp32", "diffedit-bf16")
    print()
    for name, value in summary.items():
        print(f"{name}: {value:.3f}" if value < 100 else f"{name}: {value:.1f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="model folder, built there if missing "
                        "(default /tmp/sd15-random; --quick: /tmp/tiny-random)")
    parser.add_argument("--quick", action="store_true", help="tiny reference model, 32 px, 2 mask samples, 4 steps")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, alternating order")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--size", type=int, default=None,
                        help="picture side in pixels, a multiple of 64 (default 256; --quick: 32)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(DEFAULT_RUNS),
                        help="which runs (default: the first three; bf16 is slow on a CPU without native bf16; "
                             "diffedit-bf16-sdpa: bf16 with torch's attention)")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    for hidden in ("--model", "--image", "--workload", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.size is not None and (args.size < 64 or args.size % 64):
        parser.error(f"--size must be a positive multiple of 64 (the UNet halves the latents three times), "
                     f"got {args.size}")
    w = Workload(arch="tiny", size=32, mask_samples=2, steps=4) if args.quick else Workload()
    if args.size is not None:
        w = replace(w, size=args.size)
    model = ensure_model(w.arch, model_folder(args.cache, args.quick))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        image = work / "input.png"
        synthetic_picture(w.size, w.seed).save(image)
        order = [name for name in RUNS if name in args.runs]
        runs: dict[str, list[RunResult]] = {name: [] for name in order}
        for repeat in range(args.repeats):
            for name in (order if repeat % 2 == 0 else order[::-1]):
                runs[name].append(run_child(name, model, image, w, work, repeat))
        results = {name: median_run(rs) for name, rs in runs.items()}
        summary = print_report(results, work, w)
    if args.json:
        from diffedit.io.files import atomic_write_text
        every_run = {n: [asdict(r) | {"total": r.total, "cpu_total": r.cpu_total} for r in rs] for n, rs in runs.items()}
        payload = {"workload": asdict(w), "cpu": cpu_name(), "runs": every_run, "summary": summary}
        atomic_write_text(args.json, json.dumps(payload, indent=2), overwrite=True)


if __name__ == "__main__":
    main()
