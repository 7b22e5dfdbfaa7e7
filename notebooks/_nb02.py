"""The cells of notebook 02, the paper's ablations and trade-offs (built by notebooks/_build.py)."""

from __future__ import annotations

import textwrap

from _cells import MODEL_SETUP, code, md

CELLS = [
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
    ## One call: `shapes.eval.evaluate`

    `evaluate` is a built-in sweep (the engine of the next section): one mask and one inversion (to the
    largest $r$) per image serve every run: the $r$ table, the threshold table and the three ablations.
    Its summary holds the means over the edits.
    """),
    code("""
    from diffedit.shapes.eval import EvalSettings, evaluate

    settings = EvalSettings(count=COUNT, num_inference_steps=STEPS, num_mask_samples=N_MASK, strength=0.8,
                            strengths=(0.2, 0.4, 0.6, 0.8, 1.0), thresholds=(0.3, 0.5, 0.7),
                            seed=0)
    report = evaluate(pipe, settings)
    print(report.table())
    print(f"{report.seconds:.1f} s of compute for {settings.count} edits x {len(report.summary)} runs")
    """),
    code("""
    runs = {s["run"]: s for s in report.summary}
    area = {name: statistics.fmean(r["mask_area"] for r in report.rows if r["run"] == name)
            for name in runs if runs[name]["ablation"] in ("none", "no_encode")}
    masked = [s for s in report.summary if s["ablation"] == "none"]
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
      `sdedit`, at a success at least as high;
    - DDIM encoding keeps the input inside the mask where the query does not ask for a change (the
      object's position, size, the texture under it), where a fresh noisy start (`no_encode`) has to
      redraw them: that difference lies inside the mask, where the background PSNR does not look
      (on `diffedit eval shapes`' 50 edits both keep 30.0-30.1 dB; on 10 edits chance alone can put
      a few dB between them);
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
    from diffedit.research import figures
    from diffedit.research.sweep import run_sweep

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
    `diffedit.research.figures` draws from the sweep folder: the trade-off curves of DiffEdit and SDEdit along $r$,
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
