"""The cells of notebook 01, how DiffEdit works (built by notebooks/_build.py)."""

from __future__ import annotations

import textwrap

from _cells import MODEL_SETUP, code, md

CELLS = [
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
    (`diffedit/shapes/world.py`), with the small SD-architecture model embedded in the repository
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
    from diffedit.shapes import world as world
    from diffedit.io.pictures import overlay_mask
    from diffedit.research.metrics import psnr

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
                ax.imshow(a, interpolation="nearest")   # the world's pixels as they are (and small PNGs)
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
    from diffedit.io.pictures import mask_to_pil
    from diffedit.mask_maps import normalize_difference
    from diffedit.research.metrics import mask_iou

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
    from diffedit.shapes.check import check_edit

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
