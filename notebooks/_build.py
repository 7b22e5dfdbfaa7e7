"""The single source of the three notebooks: `python notebooks/_build.py` writes them (without
outputs), `python notebooks/_build.py --check` says whether the committed .ipynb files match.
Edit the cells here, never the .ipynb files (tests/test_notebooks.py checks they agree).

Environment variables the notebooks read (all optional):
    DIFFEDIT_NOTEBOOK_MODEL   a model folder / hub id instead of the embedded weights/shapes-64
    DIFFEDIT_NOTEBOOK_OUT     where notebook 02 writes its sweep (default: a fresh temp folder)
    DIFFEDIT_SD_WEIGHTS       notebook 03: a diffusers folder, a single checkpoint file or a hub id
    DIFFEDIT_SD_PRESET        notebook 03: what a single file is (sd1, sd2-base, sd2-v)
    DIFFEDIT_SD_DTYPE         notebook 03: fp32, bf16 or fp16 (default: fp16 on CUDA, fp32 on the CPU)
    DIFFEDIT_SD_IMAGE         notebook 03: the photo to edit (default: one generated from text), with
    DIFFEDIT_SD_SOURCE/_TARGET  its caption (default "") and the query
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


MODEL_SETUP = """
    MODEL = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL") or None   # None: the embedded model weights/shapes-64
    pipe = DiffEditPipeline.from_pretrained(MODEL)
    params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    print(f"{pipe.model.source}: {params / 1e6:.1f} M parameters, {pipe.config.resolution} px images, "
          f"latents {pipe.config.vae.latent_channels} x {pipe.config.resolution // pipe.config.vae.downsample_factor}"
          f" x {pipe.config.resolution // pipe.config.vae.downsample_factor}")
"""

# --------------------------------------------------------------------------------------------
# 01: how DiffEdit works

NB01 = [
    md("""
    # How DiffEdit works, step by step

    DiffEdit (Couairon, Verbeek, Schwenk, Cord: *DiffEdit: Diffusion-based semantic image editing with
    mask guidance*, ICLR 2023) edits an image $x$ from a text query $Q$ (what the image should show)
    and a reference text $R$ (what it shows now, or the empty text) in three steps:

    1. **mask**: where do the noise predictions under $Q$ and $R$ disagree?
    2. **encode**: run deterministic DDIM backwards from the image latent $x_0$ to $x_r$, at the
       encoding ratio $r$;
    3. **decode**: run DDIM forwards from $x_r$ under $Q$, and after every step put the encoded
       latents back outside the mask.

    This notebook opens each step on one image of the synthetic *shapes world*
    (`diffedit/shapes_world.py`), with the small SD-architecture model embedded in the repository
    (`weights/shapes-64`: 64 x 64 images, 4 x 16 x 16 latents). Every pixel of that world is known,
    so the mask and the edit can be compared with the truth. It runs in about a minute on a CPU.
    """),
    code(f"""
    import os
    import time

    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from PIL import Image

    from diffedit import DiffEditPipeline
    from diffedit import shapes_world as world
    from diffedit.image_io import overlay_mask
    from diffedit.metrics import psnr

    STEPS = 25      # the DDIM grid (the paper uses 50; 25 keeps this notebook at CPU-seconds)
    SEED = 0
    started = time.perf_counter()
    {textwrap.indent(textwrap.dedent(MODEL_SETUP).strip(), "    ").strip()}


    def show(panels, titles, cmap="magma", vmax=None, size=1.9):
        \"\"\"One row of pictures: PIL images and (H, W, 3) arrays as they are, 2-D maps with `cmap`.\"\"\"
        fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size + 0.4), squeeze=False)
        for ax, panel, title in zip(axes[0], panels, titles):
            a = np.asarray(panel.detach().float().cpu() if torch.is_tensor(panel) else panel)
            if a.ndim == 2:
                a = a.astype(np.float32)
                ax.imshow(a, cmap=cmap, vmin=0, vmax=vmax or max(float(a.max()), 1e-12), interpolation="nearest")
            else:
                ax.imshow(a)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        plt.show()
    """),
    md("""
    ## The synthetic world

    A scene is drawn from a seed: one to three flat-coloured circles, squares and triangles on a plain
    or textured background, rendered without anti-aliasing, so each object's mask is exactly the set of
    pixels painted in its colour. Its caption follows a fixed grammar.
    """),
    code("""
    scene = world.sample_scene(world.HELDOUT_SEEDS[0])      # a held-out seed: never seen in training
    image, object_masks = world.render(scene)
    print(world.caption(scene))
    show([image, *object_masks], ["scene", *[f"{o.colour} {o.shape}" for o in scene.objects]], cmap="gray")
    """),
    md("""
    An *edit* changes the colour or the shape of one object. `heldout_edits(k)` gives the benchmark's
    first k edits (colour and shape alternating), each with the ideal result and the true edit region
    (old and new object pixels). DiffEdit gets only the input image and the two captions.
    """),
    code("""
    EDIT_INDEX = 5      # a shape edit: one circle becomes a square
    edit = world.heldout_edits(EDIT_INDEX + 1)[EDIT_INDEX]
    SOURCE, TARGET = edit.source_caption, edit.target_caption
    source_image = Image.fromarray(edit.source_image)
    print("R (source):", SOURCE)
    print("Q (query): ", TARGET)
    show([edit.source_image, edit.target_image, edit.edit_mask], ["input x", "ideal edit", "true edit region"],
         cmap="gray")
    """),
    md(r"""
    ## Step 1: the mask

    The image latent $x_0$ (the VAE encoding, times its scaling factor) is noised $n$ times to the
    timestep $t$ of noise strength 0.5, with independent noises $\varepsilon^{(k)}$ (DDPM eq. 4):

    $$x_t^{(k)} = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1-\bar\alpha_t}\, \varepsilon^{(k)}, \qquad k = 1 \dots n .$$

    The UNet predicts the noise of each $x_t^{(k)}$ twice, once conditioned on $Q$ and once on $R$. Where
    the two texts describe the same thing (background, the other objects) the predictions agree; where
    they differ, the denoiser is pulled towards different images. The per-sample difference map
    averages the absolute difference over the $C$ latent channels,

    $$D^{(k)} = \frac{1}{C} \sum_{c} \left| \varepsilon_\theta(x_t^{(k)}, t, Q) - \varepsilon_\theta(x_t^{(k)}, t, R) \right|_c ,
    \qquad D = \frac{1}{n} \sum_k D^{(k)} ,$$

    then the paper removes extreme values and rescales to $[0, 1]$ (here: clamp at mean + 3 std), and
    thresholds at 0.5:

    $$\tilde D = \operatorname{rescale}_{[0,1]}\big(\min(D, \mu_D + 3\sigma_D)\big), \qquad M = \mathbb{1}[\tilde D > 0.5] .$$

    `generate_mask` returns all of these: `per_sample` ($D^{(k)}$), `difference` ($D$), `soft`
    ($\tilde D$) and `mask` ($M$), at latent resolution.
    """),
    code("""
    N = 8
    mask = pipe.generate_mask(source_image, SOURCE, TARGET, num_samples=N, noise_strength=0.5,
                              num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED))
    per_sample = mask.per_sample[0]
    print(f"noised to t = {mask.timestep}; per_sample {tuple(mask.per_sample.shape)}, mask {tuple(mask.mask.shape)}")
    show(list(per_sample), [f"D^({k + 1})" for k in range(N)], vmax=float(per_sample.max()))
    show([mask.difference[0], mask.soft[0], mask.mask[0], overlay_mask(source_image, mask.mask_images[0]),
          edit.edit_mask], ["D (mean)", "normalised", "M = soft > 0.5", "M on the input", "true region"])
    """),
    md("""
    Each single-sample map is noisy; their mean is not. The two cells below re-derive `difference` and
    `soft` from `per_sample` with the equations above, and measure the mask's IoU with the true edit
    region when only the first 1, 2, 4 or all samples are averaged (the mask is brought to pixel resolution as the
    pipeline does it: bilinear upsampling of the soft map, then the threshold).
    """),
    code("""
    D = per_sample.mean(dim=0)
    torch.testing.assert_close(D, mask.difference[0])
    clamped = torch.minimum(D, D.mean() + 3 * D.std(unbiased=False))
    soft = (clamped - clamped.min()) / (clamped.max() - clamped.min())
    torch.testing.assert_close(soft, mask.soft[0])
    print("difference = mean of per_sample, soft = clamp + rescale: both re-derived exactly")
    """),
    code("""
    from diffedit.image_io import mask_to_pil
    from diffedit.mask_maps import normalize_difference
    from diffedit.metrics import mask_iou

    geometry = mask.encoded.geometry[0]
    for k in (1, 2, 4, N):
        soft_k = normalize_difference(per_sample[:k].mean(dim=0, keepdim=True))[0]
        pixels = np.asarray(mask_to_pil(soft_k, geometry, threshold=0.5)) > 0
        print(f"n = {k}: mask IoU with the true edit region {mask_iou(pixels, edit.edit_mask):.3f}, "
              f"area {pixels.mean():.3f}")
    """),
    md(r"""
    ## Step 2: DDIM encoding

    DDIM with $\eta = 0$ is a deterministic map between $x_0$ and $x_T$, so it can be run backwards.
    With $\hat x_0(x_t) = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ (DDIM eq. 12),
    one encoding step from grid timestep $t_i$ to the next one $t_{i+1}$ is

    $$x_{t_{i+1}} = \sqrt{\bar\alpha_{t_{i+1}}}\, \hat x_0(x_{t_i}) + \sqrt{1-\bar\alpha_{t_{i+1}}}\, \varepsilon_\theta(x_{t_i}, t_{i+1}, \varnothing) ,$$

    unconditional (empty text, no guidance) as in the paper, for $k = \lfloor r \cdot \text{steps} \rfloor$
    steps. `invert` keeps every intermediate latent: decoding needs $x_t$ at each timestep, and one
    inversion to $r$ serves every smaller $r$. Decoded through the VAE, the encoded latents turn into
    noise while keeping the image's layout:
    """),
    code("""
    R = 0.8
    inversion = pipe.invert(mask.encoded, strength=R, num_inference_steps=STEPS)
    print(f"{len(inversion.timesteps)} encoding steps, t = {inversion.timesteps[0]} ... {inversion.timesteps[-1]}")
    picks = np.linspace(0, len(inversion.timesteps), 6).round().astype(int)
    decoded = pipe.decode_latents(inversion.latents[0, picks])
    show([world.to_image(d) for d in decoded],
         ["x_0" if i == 0 else f"x_t, t = {inversion.timesteps[i - 1]}" for i in picks])
    """),
    md("""
    The encoding is (nearly) invertible: decoding $x_r$ back with the same empty text and no guidance
    returns the input. "DiffEdit without encoding" (an ablation in notebook 02) starts instead from a
    fresh noisy sample $q(x_r \\mid x_0)$, which has lost that information.
    """),
    code("""
    reconstruction = pipe.edit(inversion, None, "", use_mask=False, guidance_scale=1.0)
    t_r = inversion.timesteps[-1]
    noised = pipe.scheduler.add_noise(inversion.latents[:, 0], torch.randn(1, *inversion.latents.shape[2:],
                                      generator=torch.Generator().manual_seed(SEED)), t_r)
    vae_only = world.to_image(pipe.decode_latents(inversion.latents[:, 0])[0])
    print(f"decode(encode(x)) from x_r: PSNR {psnr(reconstruction.images[0], source_image):.2f} dB against the input "
          f"(the VAE alone, decoding x_0: {psnr(vae_only, source_image):.2f} dB)")
    show([source_image, reconstruction.images[0], world.to_image(pipe.decode_latents(inversion.latents[:, -1])[0]),
          world.to_image(pipe.decode_latents(noised)[0])],
         ["input", "decode(encode(x))", f"encoded x_t (t={t_r})", f"noised x_t (t={t_r})"])
    """),
    md(r"""
    ## Step 3: decoding with mask guidance

    From $y_r = x_r$, each DDIM step uses the classifier-free guided noise under the query,

    $$\tilde\varepsilon = \varepsilon_\theta(y_t, t, \varnothing) + s\,\big(\varepsilon_\theta(y_t, t, Q) - \varepsilon_\theta(y_t, t, \varnothing)\big),
    \qquad y_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0(y_t) + \sqrt{1-\bar\alpha_{t'}}\, \tilde\varepsilon ,$$

    and then pastes the encoded latent of the same timestep outside the mask (paper sec. 3.2):

    $$y_{t'} \leftarrow M \odot y_{t'} + (1 - M) \odot x_{t'} ,$$

    the last step pasting $x_0$ itself. Without the mask (`use_mask=False`) it is plain
    encode-decode: the whole image follows the query.
    """),
    code("""
    from diffedit.shapes_check import check_edit

    traces = []
    edited = pipe.edit(inversion, mask, TARGET, guidance_scale=7.5, callback=traces.append)
    unmasked = pipe.edit(inversion, mask, TARGET, guidance_scale=7.5, use_mask=False)
    objects = ~edit.background_mask            # background PSNR: over the pixels outside every object
    for name, out in (("with the mask", edited), ("without the mask", unmasked)):
        check = check_edit(out.images[0], edit)
        print(f"{name:17s} background PSNR {psnr(out.images[0], edit.source_image, objects):6.2f} dB, "
              f"edit {'succeeded' if check.success else 'failed'} (found: {check.colour} {check.shape})")
    show([source_image, overlay_mask(source_image, mask.mask_images[0]), edited.images[0], unmasked.images[0],
          edit.target_image], ["input", "mask", "DiffEdit", "without mask", "ideal"])
    """),
    md("""
    Outside the mask the final latent *is* $x_0$, exactly. The pixels there are close to the input but
    not identical: the VAE decoder sees the whole latent, so the edited region leaks a little into its
    neighbourhood, and the VAE does not reconstruct perfectly.
    """),
    code("""
    keep = 1 - edited.mask                          # (1, 1, h, w): 1 outside the mask
    assert torch.equal(keep * edited.latents, keep * inversion.latents[:, 0])
    print(f"outside the mask ({int(keep.sum())} of {keep.numel()} latent cells) y_0 == x_0 exactly")
    """),
    md(r"""
    ## Inside the decoding loop

    `edit(..., callback=f)` calls `f` after every step with a `method.StepTrace`: the step's timestep
    `t`; `pred_x0`, the model's estimate of the clean latent at that step,
    $\hat x_0 = (y_t - \sqrt{1-\bar\alpha_t}\,\tilde\varepsilon)/\sqrt{\bar\alpha_t}$; and, after the step
    (at the next timestep $t'$), the blended latent `y_t` and the encoded latent `x_t` pasted outside
    the mask (at the last step: $x_0$).
    Decoded, `pred_x0` shows the edit appear: the new colour or shape is decided in the first, noisiest
    steps, and the later steps refine details.
    """),
    code("""
    rows = np.linspace(0, len(traces) - 1, 6).round().astype(int)
    for field in ("pred_x0", "y_t", "x_t"):
        pixels = pipe.decode_latents(torch.cat([getattr(traces[i], field) for i in rows]))
        show([world.to_image(p) for p in pixels], [f"{field}, step t={traces[i].t}" for i in rows])
    for trace in traces:                          # every step: outside the mask, y_t is the encoded x_t
        assert torch.equal(keep * trace.y_t, keep * trace.x_t)
    """),
    code("""
    final = edited.latents
    inside = edited.mask.bool().expand_as(final)
    distance = [float((trace.pred_x0 - final).abs()[inside].mean()) for trace in traces]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.plot([trace.t for trace in traces], distance, marker="o")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t of the step")
    ax.set_ylabel("mean |pred_x0 - y_0| in the mask")
    ax.grid(alpha=0.3)
    plt.show()
    """),
    md("""
    ## What it cost

    The pipeline counts UNet samples (rows of every UNet batch), VAE passes and text encodings: the
    mask takes 2n samples, the encoding k, each guided decode 2k.
    """),
    code("""
    print(pipe.counters.as_dict())
    print(f"notebook run time: {time.perf_counter() - started:.1f} s")
    """),
]

# --------------------------------------------------------------------------------------------
# 02: ablations and trade-offs

NB02 = [
    md("""
    # The paper's ablations and trade-off curves, on the synthetic benchmark

    The paper measures an edit by how well it follows the query and how much of the input it keeps, and
    shows that the encoding ratio $r$ trades one for the other (its Fig. 4 and 5: LPIPS against
    CLIPScore along $r$). Its ablations remove one ingredient at a time:

    | run | encoding (step 2) | mask (step 3) |
    |---|---|---|
    | DiffEdit | DDIM-encoded $x_r$ | yes |
    | `no_mask` (encode-decode) | DDIM-encoded $x_r$ | no |
    | `no_encode` (DiffEdit w/o encoding) | a fresh noisy $q(x_r \\mid x_0)$ | yes |
    | `sdedit` | a fresh noisy $q(x_r \\mid x_0)$ | no |

    On the shapes world both sides of the trade-off have ground truth and need no downloaded network:
    **success** (a checker measures the edited object's colour and shape in the output) and
    **background PSNR** (against the input, outside the objects), plus the mask's IoU with the true edit
    region. Kept small here (10 edits, 25 steps): a few CPU minutes. `diffedit eval shapes` and
    `diffedit sweep` run the same at full size.
    """),
    code(f"""
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    import matplotlib.pyplot as plt
    from IPython.display import Image as PNG, display

    from diffedit import DiffEditPipeline

    COUNT = 10         # held-out edits (the benchmark default is 50)
    STEPS = 25         # DDIM grid (default 50)
    N_MASK = 5         # mask noise samples (default 10)
    started = time.perf_counter()
    {textwrap.indent(textwrap.dedent(MODEL_SETUP).strip(), "    ").strip()}
    """),
    md("""
    ## One call: `shapes_eval.evaluate`

    `evaluate` computes one mask and one inversion (to the largest $r$) per image and re-uses them for
    every run: the $r$ table, the threshold table and the three ablations. Its summary holds the means
    over the edits.
    """),
    code("""
    from diffedit.shapes_eval import EvalSettings, evaluate

    settings = EvalSettings(count=COUNT, num_inference_steps=STEPS, num_mask_samples=N_MASK, strength=0.8,
                            strengths=(0.2, 0.4, 0.6, 0.8, 1.0), thresholds=(0.3, 0.5, 0.7),
                            batch_size=COUNT, seed=0)
    report = evaluate(pipe, settings)
    print(report.table())
    print(f"{report.seconds:.1f} s for {len(report.rows)} edits")
    """),
    code("""
    runs = {s["run"]: s for s in report.summary}
    area = {name: statistics.fmean(r["mask_area"] for r in report.rows if r["run"] == name) for name in runs}
    masked = [s for s in report.summary if s["use_mask"] and s["encode"]]
    by_r = sorted((s for s in masked if s["threshold"] == settings.threshold), key=lambda s: s["strength"])
    by_threshold = sorted((s for s in masked if s["strength"] == settings.strength), key=lambda s: s["threshold"])

    print(f"{'r':>5} {'success':>8} {'bg PSNR':>8}      (threshold {settings.threshold})")
    for s in by_r:
        print(f"{s['strength']:>5.1f} {s['success']:>8.2f} {s['bg_psnr']:>8.2f}")
    print(f"\\n{'thr':>5} {'success':>8} {'bg PSNR':>8} {'mask IoU':>9} {'area':>6}      (r {settings.strength})")
    for s in by_threshold:
        print(f"{s['threshold']:>5.2f} {s['success']:>8.2f} {s['bg_psnr']:>8.2f} {s['mask_iou']:>9.3f} "
              f"{area[s['run']]:>6.3f}")
    """),
    code("""
    ablations = ["diffedit", "no_mask", "no_encode", "sdedit"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([s["success"] for s in by_r], [s["bg_psnr"] for s in by_r], marker="o", label="DiffEdit along r")
    for s in by_r:
        ax.annotate(f"r={s['strength']:g}", (s["success"], s["bg_psnr"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for name in ablations[1:]:
        ax.scatter(runs[name]["success"], runs[name]["bg_psnr"], marker="x", label=f"{name} (r={settings.strength:g})")
    ax.set_xlabel("success (edit follows the query)")
    ax.set_ylabel("background PSNR (dB)")
    ax.legend(fontsize=7)
    ax.set_title("trade-off along r", fontsize=9)
    ax = axes[1]
    thresholds = [s["threshold"] for s in by_threshold]
    ax.plot(thresholds, [s["mask_iou"] for s in by_threshold], marker="o", label="mask IoU")
    ax.plot(thresholds, [area[s["run"]] for s in by_threshold], marker="s", label="mask area")
    ax.plot(thresholds, [s["success"] for s in by_threshold], marker="^", label="success")
    ax.set_xlabel("mask threshold")
    ax.legend(fontsize=7)
    ax.set_title("the threshold", fontsize=9)
    ax = axes[2]
    bars = ax.bar(ablations, [runs[a]["bg_psnr"] for a in ablations], color="tab:gray")
    for bar, a in zip(bars, ablations):
        ax.annotate(f"success {runs[a]['success']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_ylabel("background PSNR (dB)")
    ax.set_ylim(0, 1.15 * max(runs[a]["bg_psnr"] for a in ablations))
    ax.set_title(f"ablations at r = {settings.strength:g}", fontsize=9)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    plt.show()
    """),
    md("""
    What the paper reports, to compare with the numbers above (this model, 10 edits only: one edit is
    0.1 of success, so differences of that size are noise; `diffedit eval shapes` runs 50):

    - along $r$, a larger encoding ratio gives the query more freedom (success rises) at the cost of
      the input (background PSNR falls): the trade-off curve of the paper's Fig. 4;
    - the mask holds the background: DiffEdit keeps a much higher background PSNR than `no_mask` and
      `sdedit`, at a similar success;
    - DDIM encoding keeps the input inside the mask where the query does not ask for a change (the
      object's position, size, the texture under it), where a fresh noisy start (`no_encode`) has to
      redraw them: the difference shows inside the mask, not in the background PSNR;
    - the threshold sets the mask's size: low, the mask spreads over the background (lower background
      PSNR); high, it stops covering the whole object (lower IoU, and eventually failed edits).
    """),
    code("""
    gap = runs["diffedit"]["bg_psnr"] - runs["sdedit"]["bg_psnr"]
    print(f"at r = {settings.strength:g}, DiffEdit's background PSNR is {gap:.1f} dB above SDEdit's "
          f"(success {runs['diffedit']['success']:.2f} vs {runs['sdedit']['success']:.2f}).")
    """),
    md("""
    ## Any grid: `sweep.run_sweep`

    A sweep runs DiffEdit over a grid of any settings (encoding ratio, threshold, mask samples and noise
    strength, guidance, steps, blend operator, ablation) on a set of items, and writes one row per run
    to `results.jsonl` / `results.csv` with the settings, seeds, timings and metrics. It re-uses what an
    axis does not change: one inversion per item serves the whole $r$ axis, one mask every $r$ and
    threshold. The same as a command: `diffedit sweep CONFIG.json --out DIR --figures`.
    """),
    code("""
    from diffedit import figures
    from diffedit.sweep import run_sweep

    OUT = Path(os.environ.get("DIFFEDIT_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="diffedit-notebook-02-"))
    SWEEP = OUT / "sweep"
    config = {"model": MODEL, "items": {"benchmark": "shapes", "count": 4},
              "grid": {"num_inference_steps": STEPS, "mask_samples": N_MASK,
                       "strength": [0.2, 0.4, 0.6, 0.8, 1.0], "ablation": ["none", "sdedit"]}}
    result = run_sweep(config, SWEEP, pipe=pipe, bar=False)
    print(f"{len(result.rows)} rows in {SWEEP / 'results.csv'} ({result.ran} run now, {result.skipped} found done)")
    print(f"{'item':<11}{'r':>5} {'ablation':<10}{'bg PSNR':>8}{'success':>8}  inversion cached")
    for row in result.rows[:6]:
        print(f"{row['item']:<11}{row['strength']:>5.1f} {row['ablation']:<10}{row['bg_psnr_gt']:>8.2f}"
              f"{row['success']!s:>8}  {row['cache_inversion']}")
    """),
    md("""
    The $r$ axis cost one inversion per item: of each item's encoded runs, only the first computed it.
    Running the same sweep again finds every row done and runs nothing: an interrupted sweep resumes
    where it stopped.
    """),
    code("""
    fresh = [row for row in result.rows if row["cache_inversion"] is False]
    assert sorted(row["item"] for row in fresh) == sorted({row["item"] for row in result.rows})
    print(f"{len(fresh)} inversions for {sum(row['cache_inversion'] is not None for row in result.rows)} encoded runs")
    again = run_sweep(config, SWEEP, pipe=pipe, bar=False)
    assert again.ran == 0 and again.skipped == len(result.rows)
    print(f"second call: {again.ran} run, {again.skipped} skipped")
    """),
    md("""
    `diffedit.figures` draws from the sweep folder: the trade-off curves of DiffEdit and SDEdit along $r$,
    an image grid (rows = items, columns = a swept value), the masks against the ground truth, and the
    noise-difference map of each mask sample.
    """),
    code("""
    display(PNG(filename=str(figures.tradeoff_curve(SWEEP, x="success", y="bg_psnr_gt", along="strength",
                                                    by="ablation"))))
    display(PNG(filename=str(figures.image_grid(SWEEP, column="strength", where={"ablation": "none"}, cell=96))))
    display(PNG(filename=str(figures.mask_overlays(SWEEP, where={"ablation": "none"}, cell=96))))
    display(PNG(filename=str(figures.difference_maps(SWEEP, item=result.rows[0]["item"], where={"ablation": "none"}))))
    """),
    code("""
    print(f"figures in {SWEEP / 'figures'}")
    print(f"notebook run time: {time.perf_counter() - started:.1f} s")
    """),
]

# --------------------------------------------------------------------------------------------
# 03: real Stable Diffusion weights

NB03 = [
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

    from diffedit.loading import hub_patterns


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
        from diffedit.image_io import load_image
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
        from diffedit.image_io import overlay_mask, side_by_side
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
        from diffedit.figures import difference_maps
        out = Path(tempfile.mkdtemp(prefix="diffedit-notebook-03-")) / "differences.png"
        display(PNG(filename=str(difference_maps(result.mask, out=out))))
    print(f"notebook run time: {time.perf_counter() - started:.1f} s")
    """),
]

NOTEBOOKS = {
    "01_how_diffedit_works.ipynb": NB01,
    "02_ablations_and_tradeoffs.ipynb": NB02,
    "03_real_sd_weights.ipynb": NB03,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, without outputs, with stable cell ids (so rebuilding changes nothing)."""
    nb = new_notebook(cells=[])
    for i, cell in enumerate(NOTEBOOKS[name]):
        cell = nbformat.from_dict(dict(cell))
        cell["id"] = f"{name[:2]}-{i:02d}"
        nb.cells.append(cell)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nbformat.validate(nb)
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> int:
    from diffedit.files import atomic_write_text

    stale = [name for name in NOTEBOOKS
             if not (HERE / name).is_file() or (HERE / name).read_text(encoding="utf-8") != text(name)]
    if "--check" in argv:
        for name in stale:
            print(f"{name} differs from notebooks/_build.py; run python notebooks/_build.py")
        return 1 if stale else 0
    for name in stale:
        atomic_write_text(HERE / name, text(name), overwrite=True)
        print(f"wrote notebooks/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
