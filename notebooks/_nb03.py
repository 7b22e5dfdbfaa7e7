"""The cells of notebook 03, real Stable Diffusion weights (built by notebooks/_build.py)."""

from __future__ import annotations

from _cells import code, md

CELLS = [
    md("""
    # DiffEdit with real Stable Diffusion weights

    The pipeline loads Stable Diffusion 1.x and 2.x checkpoints with its own code (no diffusers needed):
    a hub id, a diffusers-layout folder, or a single original-layout file. This notebook explains how to
    get the weights, then edits a photo if it finds them, and otherwise stops here after printing how.

    **Getting the weights.** Hub ids are resolved with `huggingface_hub`, which keeps files in its cache
    (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`; `HF_HUB_CACHE` moves it). The pipeline looks
    in the cache first and downloads only the files it needs otherwise. To fetch them ahead of time
    (about 4 GB for SD 1.5 in fp32), on a machine with network and the same `HF_HOME`:

    ```
    hf download stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --include "model_index.json" --include "scheduler/*" --include "tokenizer/*" --include "*/config.json" \\
        --include "unet/diffusion_pytorch_model.safetensors" --include "vae/diffusion_pytorch_model.safetensors" \\
        --include "text_encoder/model.safetensors"
    ```

    then `DiffEditPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")` works offline.

    **A single file.** An original checkpoint (`.safetensors`, or `.ckpt` read with `weights_only=True`) loads
    from its path; `preset` says what it is when its weights cannot (SD 2 epsilon vs v-prediction):

    ```
    hf download stable-diffusion-v1-5/stable-diffusion-v1-5 v1-5-pruned-emaonly.safetensors --local-dir ~/models
    ```
    ```python
    pipe = DiffEditPipeline.from_pretrained("~/models/v1-5-pruned-emaonly.safetensors", preset="sd1")
    ```

    (`sd1`, `sd2-base`, `sd2-v`; on the command line: `diffedit edit photo.png --model FILE --preset sd1 ...`.)

    **This notebook** uses `DIFFEDIT_SD_WEIGHTS` (a folder, a file or a hub id; `DIFFEDIT_SD_PRESET` for a
    single file) when set, else the first known checkpoint already in the cache. It never downloads unless
    `DIFFEDIT_SD_WEIGHTS` names a hub id that is not cached.
    """),
    code("""
    import json
    import os
    import time
    from pathlib import Path

    import torch
    from IPython.display import display

    import diffedit

    started = time.perf_counter()
    KNOWN = Path(diffedit.__file__).resolve().parents[1] / "weights" / "known_checkpoints.json"
    known = [c for c in json.loads(KNOWN.read_text())["checkpoints"] if c.get("supported")]
    print(f"{'hub id':<48} {'preset':<9} {'px':>4}  prediction")
    for c in known:
        print(f"{c['id']:<48} {c['preset']:<9} {c['resolution']:>4}  {c['prediction_type']}")
    """),
    code("""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    from diffedit.checkpoints.loading import hub_patterns


    def cached_snapshot(repo_id: str) -> Path | None:
        \"\"\"The local snapshot of a hub model if the Hugging Face cache holds its weights (never downloads).\"\"\"
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=hub_patterns(None, ".safetensors"),
                                            local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            return None
        weights = [any((folder / part).glob("*.safetensors")) or any((folder / part).glob("*.bin"))
                   for part in ("unet", "vae", "text_encoder")]
        return folder if all(weights) else None


    WEIGHTS = os.environ.get("DIFFEDIT_SD_WEIGHTS") or None
    PRESET = os.environ.get("DIFFEDIT_SD_PRESET") or None
    if WEIGHTS is None:
        WEIGHTS = next((str(folder) for c in known if (folder := cached_snapshot(c["id"])) is not None), None)
    if WEIGHTS is None:
        print("No Stable Diffusion weights found: DIFFEDIT_SD_WEIGHTS is not set and no known checkpoint is in\\n"
              f"the Hugging Face cache ({HF_HUB_CACHE}).\\n"
              "To run this notebook, either\\n"
              "  hf download stable-diffusion-v1-5/stable-diffusion-v1-5   (the introduction above lists the files needed)\\n"
              "or set DIFFEDIT_SD_WEIGHTS=/path/to/folder-or-file (and DIFFEDIT_SD_PRESET=sd1 for a single file).\\n"
              "The remaining cells are skipped.")
    else:
        print(f"weights: {WEIGHTS}" + (f" (preset {PRESET})" if PRESET else ""))
    """),
    md("""
    ## Loading

    On a GPU the model runs in fp16; on a CPU in fp32 (or bf16, faster on CPUs with AMX/AVX-512 BF16).
    A 512 x 512 edit with 25 steps takes minutes on a laptop CPU, seconds on a GPU.
    """),
    code("""
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    DTYPE = os.environ.get("DIFFEDIT_SD_DTYPE") or ("fp16" if DEVICE == "cuda" else "fp32")
    STEPS, N_MASK, R = 25, 5, 0.7
    pipe = None
    if WEIGHTS is None:
        print("skipped: no weights")
    else:
        from diffedit import DiffEditPipeline
        pipe = DiffEditPipeline.from_pretrained(WEIGHTS, device=DEVICE, dtype=DTYPE, preset=PRESET)
        print(f"loaded {pipe.model.source} on {DEVICE} in {DTYPE}: {pipe.config.resolution} px, "
              f"{pipe.prediction_type} prediction")
    """),
    md("""
    ## The photo

    `DIFFEDIT_SD_IMAGE` names the photo to edit. Without one, the model draws one itself: plain DDIM
    sampling from noise is the `sdedit` ablation at strength 1 (no mask, no encoding, started from a
    gray image noised to the last timestep, where almost nothing of it is left).
    """),
    code("""
    SOURCE, TARGET = "a bowl of fruits on a wooden table", "a bowl of pears on a wooden table"
    photo = None
    if pipe is None:
        print("skipped: no weights")
    elif os.environ.get("DIFFEDIT_SD_IMAGE"):
        from diffedit.io.images import load_image
        photo = load_image(os.environ["DIFFEDIT_SD_IMAGE"])
        SOURCE, TARGET = os.environ.get("DIFFEDIT_SD_SOURCE", ""), os.environ.get("DIFFEDIT_SD_TARGET", TARGET)
    else:
        from PIL import Image
        gray = Image.new("RGB", (pipe.config.resolution,) * 2, (128, 128, 128))
        drawn = pipe(gray, "", SOURCE, strength=1.0, num_inference_steps=STEPS, guidance_scale=7.5,
                     encode=False, use_mask=False, generator=torch.Generator().manual_seed(0))
        photo = drawn.images[0]
    if photo is not None:
        print(f"source: {SOURCE!r}\\nquery:  {TARGET!r}")
        display(photo)
    """),
    md("""
    ## The edit

    The one-shot call runs the three steps of notebook 01 on one VAE encoding: the mask from `N_MASK`
    noise samples, the DDIM encoding to `R`, the masked decoding under the query.
    """),
    code("""
    if pipe is None:
        print("skipped: no weights")
    else:
        from diffedit.io.pictures import overlay_mask, side_by_side
        t0 = time.perf_counter()
        result = pipe(photo, SOURCE, TARGET, strength=R, num_inference_steps=STEPS, num_mask_samples=N_MASK,
                      guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
        print(f"edited in {time.perf_counter() - t0:.1f} s; mask area {float(result.mask.area[0]):.2f}; "
              f"work: {result.counters}")
        display(side_by_side([photo, overlay_mask(photo, result.mask.mask_images[0]), result.images[0]],
                             ["input", "mask", "edit"]))
    """),
    code("""
    if pipe is None:
        print("skipped: no weights")
    else:
        import tempfile
        from IPython.display import Image as PNG
        from diffedit.research.figures import difference_maps
        out = Path(tempfile.mkdtemp(prefix="diffedit-notebook-03-")) / "differences.png"
        display(PNG(filename=str(difference_maps(result.mask, out=out))))
    print(f"notebook run time: {time.perf_counter() - started:.1f} s")
    """),
]
