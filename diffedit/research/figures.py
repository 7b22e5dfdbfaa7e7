"""Figures from a sweep folder (or from a MaskResult): PNG files written atomically.

    image_grid(sweep_dir, column="strength")       rows = items, columns = values of a swept axis
    mask_overlays(sweep_dir)                       input | soft map | mask | ground truth | edit
    difference_maps(mask_result_or_sweep_dir)      each sample's |eps_target - eps_source|, mean, map, mask
    tradeoff_curve(sweep_dir, "success", "bg_psnr_gt")  metric against metric along r, axes from LABELS

Every figure is exactly the pixel size its docstring states. Matplotlib is an optional extra ('diffedit-sd[plots]'),
imported only when a figure is drawn; figures overwrite their file by default (rebuilt from the sweep's table).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffedit.errors import DiffEditError, ParameterError
from diffedit.io.files import user_path
from diffedit.io.files import atomic_write
from diffedit.io.pictures import mask_to_pil, overlay_mask
from diffedit.research.table import CSV_NAME, read_rows, table_path
from diffedit.research.sweep_folder import (
    default_out,
    item_ids,
    load_sweep,
    open_picture,
    saved_mask_maps,
    select,
    sorted_values,
    unique_row,
    varying_axes,
)

DPI = 100
NO_PER_SAMPLE = ("this mask has no per-sample maps (they are kept up to 64 noise samples); compute it with "
                 "generate_mask(..., return_per_sample=True) to draw them.")
HEADER = 20          # pixels above the first row of panels, for the column titles

# A metric column on an axis: (name, unit, direction); LPIPS x100 and CLIPScore 100 x cosine, as the papers.
LABELS = {
    "lpips": ("LPIPS x100", "", "lower = closer to the input"),
    "clip_score": ("CLIPScore", "100 x cosine", "higher = closer to the target text"),
    "fid": ("FID", "Frechet distance with covariance", "lower = closer to real images"),
    "sfid": ("SFID", "FlexIT: squared distance of feature means", "lower = closer to real images"),
    "csfid": ("CSFID", "FlexIT: per-class SFID", "lower = closer to the target class's images"),
    "accuracy": ("DeiT accuracy", "% classified as the target", "higher = more edits reach the target"),
    "l1": ("L1 distance", "x100", "lower = closer to the input"),
    **{k: (name, unit, "higher = closer to the input") for k, name, unit in (
        ("bg_psnr_gt", "background PSNR", "dB"), ("bg_ssim_gt", "background SSIM", "0-1"),
        ("bg_psnr_mask", "PSNR outside DiffEdit's mask", "dB"), ("bg_ssim_mask", "SSIM outside DiffEdit's mask", "0-1"),
        ("bg_psnr_scene", "background PSNR of the scene", "dB"))},
    "mask_iou": ("mask IoU with the ground truth", "0-1", "higher = better mask"),
    "success": ("edit success", "fraction of edits", "higher = more edits reach the target"),
    "others_kept": ("other objects kept", "fraction of edits", "higher = the rest of the scene left alone"),
    "unet_samples": ("UNet samples per edit", "", "lower = cheaper"),
    **{k: (name, "fraction", "") for k, name in (("mask_area", "DiffEdit's mask area"), ("gt_mask_area",
       "ground-truth mask area"), ("colour_ok", "colour right"), ("shape_ok", "shape right"))},
}


def short_label(column: str) -> str:
    """A metric's name and unit, e.g. "background PSNR (dB)" (the column name if it is not known)."""
    name, unit, _ = LABELS.get(column, (column, "", ""))
    return f"{name} ({unit})" if unit else name


def axis_label(column: str) -> str:
    """Name, unit and direction, e.g. "LPIPS x100, lower = closer to the input" (else the column name)."""
    direction = LABELS.get(column, ("", "", ""))[2]
    return f"{short_label(column)}, {direction}" if direction else short_label(column)


class PlotsUnavailableError(DiffEditError, ImportError):
    """matplotlib, needed for figures, is not installed."""


def _figure(width: int, height: int):
    """A matplotlib Figure of exactly width x height pixels, without pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailableError("figures need matplotlib, an optional extra; install it with "
                                    "pip install 'diffedit-sd[plots]' (or pip install matplotlib).") from None
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _save(fig, path: Path, overwrite: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), overwrite=overwrite)


def _panel(fig, col: int, row: int, cell: int, width: int, height: int, header: int = HEADER):
    """Axes filling grid cell (col, row) below the header band, with a 2-pixel margin."""
    left, top = col * cell + 2, header + row * cell + 2
    ax = fig.add_axes([left / width, 1 - (top + cell - 4) / height, (cell - 4) / width, (cell - 4) / height])
    ax.set_axis_off()
    return ax


def _title(fig, text: str, col: int, cell: int, width: int, height: int) -> None:
    fig.text((col + 0.5) * cell / width, 1 - HEADER / 2 / height, text, ha="center", va="center", fontsize=8)


# ---------------------------------------------------------------------- image grid

def image_grid(sweep_dir, column: str = "strength", where: dict | None = None, out=None, cell: int = 128,
               max_items: int | None = 8, annotate: str | None = None, overwrite: bool = True) -> Path:
    """Rows = items (labelled "source -> target"), first column the input, then one column per
    value of `column`. Size:
    ((values + 1) * cell) x (HEADER + items * cell) pixels. `annotate` names a metric printed on
    each edit (e.g. "bg_psnr_gt"). Other axes that vary must be fixed by `where`."""
    folder, rows, items = load_sweep(sweep_dir)
    rows = [r for r in select(rows, where) if r.get("image") and column in r]
    if not rows:
        raise ParameterError(f"no saved edit has a {column!r} setting (after `where`); check the column name "
                             "and that the sweep saved images.")
    values = sorted_values(r[column] for r in rows)
    ids = item_ids(rows, items, max_items)
    info = {it["id"]: it for it in items}
    width, height = (len(values) + 1) * cell, HEADER + len(ids) * cell
    fig = _figure(width, height)
    _title(fig, "input", 0, cell, width, height)
    for c, v in enumerate(values, start=1):
        _title(fig, f"{column} = {v}", c, cell, width, height)
    for i, item in enumerate(ids):
        picture = open_picture(folder, info.get(item, {}).get("input"), f"the input of item {item}")
        ax = _panel(fig, 0, i, cell, width, height)
        if picture is not None:
            ax.imshow(picture)
        label = row_label(info.get(item, {}), width, max(1, (cell // 3 - 6) // 8))   # the top third of a row
        fig.text(2 / width, 1 - (HEADER + i * cell + 3) / height, label,
                 fontsize=6, va="top", color="white", bbox={"facecolor": "black", "pad": 1, "linewidth": 0})
        for c, v in enumerate(values, start=1):
            cell_rows = [r for r in rows if r["item"] == item and r[column] == v]
            ax = _panel(fig, c, i, cell, width, height)
            if not cell_rows:
                continue
            row = unique_row(cell_rows, "image", f"item {item}, {column} = {v}")
            ax.imshow(open_picture(folder, row["image"], f"the edit of item {item}, {column} = {v}"))
            if annotate and row.get(annotate) is not None:
                value = row[annotate]
                text = f"{annotate} {value:.3g}" if isinstance(value, float) else f"{annotate} {value}"
                ax.text(2, 2, text, fontsize=6, va="top", color="white", backgroundcolor="black")
    return _save(fig, Path(out) if out else default_out(folder, f"grid-{column}.png"), overwrite)


def row_label(item: dict, width: int, lines: int = 2) -> str:
    """A grid row's "source -> target" (else the item id) in `lines` lines of `width` px; if longer, what differs."""
    chars = max(8, int(width / 4.6))
    text = f"{item['source']} -> {item['target']}" if "target" in item else str(item.get("id", ""))
    if "target" in item and len(textwrap.wrap(text, chars)) > lines:
        s, t = item["source"].split(), item["target"].split()
        k, e = (len(os.path.commonprefix(pair)) for pair in ([s, t], [s[::-1], t[::-1]]))
        text = " -> ".join(f"…{' '.join(w[max(k - 1, 0):len(w) - e + 1])}…" for w in (s, t))
    return textwrap.fill(textwrap.shorten(text, chars * lines, placeholder="…"), chars)


# ---------------------------------------------------------------------- masks

def mask_overlays(sweep_dir, where: dict | None = None, out=None, cell: int = 128, max_items: int | None = 8,
                  overwrite: bool = True) -> Path:
    """Per item: input | soft map | predicted mask over the input | ground truth over the input |
    edit (of the first run with that mask). Size: (5 * cell) x (HEADER + items * cell) pixels.
    The mask settings (threshold, samples, noise strength, steps, seed) that vary must be fixed
    by `where`."""
    folder, rows, items = load_sweep(sweep_dir)
    rows = [r for r in select(rows, where) if r.get("mask_file")]
    if not rows:
        raise ParameterError(f"no run of {folder} saved a mask (ablations no_mask and sdedit have none); "
                             "sweep with ablation 'none' or 'no_encode' and save_images true.")
    ids = item_ids(rows, items, max_items)
    info = {it["id"]: it for it in items}
    width, height = 5 * cell, HEADER + len(ids) * cell
    fig = _figure(width, height)
    for c, title in enumerate(("input", "soft map", "mask", "ground truth", "edit")):
        _title(fig, title, c, cell, width, height)
    for i, item in enumerate(ids):
        item_rows = [r for r in rows if r["item"] == item]
        mask_row = unique_row([{"m": (r["mask_file"], r["threshold"]), **r} for r in item_rows], "m", f"item {item}")
        picture = open_picture(folder, info.get(item, {}).get("input"), f"the input of item {item}")
        soft = saved_mask_maps(table_path(folder, mask_row["mask_file"], f"the mask file of item {item}"))["soft"]
        size = picture.size if picture is not None else tuple(info.get(item, {}).get("size", soft.shape[::-1]))
        mask = mask_to_pil(soft, size, threshold=mask_row["threshold"])
        panels = [picture, np.asarray(mask_to_pil(soft, size)), None, None, None]
        if picture is not None:
            panels[2] = overlay_mask(picture, mask)
            gt = open_picture(folder, info.get(item, {}).get("gt_mask"), f"the ground-truth mask of item {item}")
            panels[3] = overlay_mask(picture, gt.convert("L"), colour=(0, 200, 0)) if gt is not None else None
        panels[4] = open_picture(folder, mask_row.get("image"), f"the edit of item {item}")
        for c, p in enumerate(panels):
            ax = _panel(fig, c, i, cell, width, height)
            if p is not None:
                ax.imshow(p, cmap="magma" if c == 1 else None, vmin=0, vmax=255)
        label = f"{item}  thr {mask_row['threshold']}  (edit: r {mask_row['strength']}, {mask_row['ablation']})"
        fig.text(2 / width, 1 - (HEADER + i * cell + 10) / height, label,
                 fontsize=6, color="white", backgroundcolor="black")
    return _save(fig, Path(out) if out else default_out(folder, "masks.png"), overwrite)


def difference_maps(source: Any, out=None, item: str | None = None, where: dict | None = None,
                    threshold: float | None = None, image: Image.Image | None = None, index: int = 0,
                    cell: int = 96, overwrite: bool = True) -> Path:
    """The noise-difference map of each of the n mask samples (one colour scale), their mean, the
    normalised map and the mask, from a MaskResult (`index` picks the image), a saved .npz, or a
    sweep folder (with `item`, and `where` when several masks exist). Size:
    ((n + 3 + has_input) * cell) x (HEADER + cell) pixels."""
    per_sample, difference, soft, threshold, image, default = _mask_arrays(source, item, where, threshold, image, index)
    if out is None and default is None:
        raise ParameterError("give `out`, the PNG path of the figure (there is no sweep folder to put it in).")
    n = per_sample.shape[0]
    first = 1 if image is not None else 0
    width, height = (n + 3 + first) * cell, HEADER + cell
    fig = _figure(width, height)
    vmax = float(per_sample.max()) or 1.0
    panels = [(f"sample {k + 1}", per_sample[k], 0.0, vmax) for k in range(n)]
    panels += [("mean |diff|", difference, 0.0, float(difference.max()) or 1.0), ("normalised", soft, 0.0, 1.0),
               (f"mask > {threshold}", (soft > threshold).astype(np.float32), 0.0, 1.0)]
    if image is not None:
        _title(fig, "input", 0, cell, width, height)
        _panel(fig, 0, 0, cell, width, height).imshow(image)
    for c, (title, data, lo, hi) in enumerate(panels, start=first):
        _title(fig, title, c, cell, width, height)
        _panel(fig, c, 0, cell, width, height).imshow(data, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
    return _save(fig, Path(out) if out else default, overwrite)


def _mask_arrays(source, item, where, threshold, image, index):
    """(per_sample (n, h, w), difference, soft, threshold, input image or None, default out path or None)."""
    from diffedit.results import MaskResult
    if isinstance(source, MaskResult):
        inputs = source.encoded.inputs if source.encoded is not None else None
        picture = image if image is not None else (inputs[index] if inputs else None)
        threshold = source.threshold if threshold is None else threshold
        if source.per_sample is None:
            raise ParameterError(NO_PER_SAMPLE)
        return (source.per_sample[index].cpu().numpy(), source.difference[index].cpu().numpy(),
                source.soft[index].cpu().numpy(), threshold, picture, None)
    path = user_path(source, ParameterError)
    default = None
    if path.is_dir():
        folder, rows, items = load_sweep(path)
        rows = [r for r in select(rows, where) if r.get("mask_file") and (item is None or r["item"] == item)]
        if item is None or not rows:
            names = ", ".join(dict.fromkeys(r["item"] for r in read_rows(folder)))
            raise ParameterError(f"name the `item` whose masks to draw (one of {names}); "
                                 "only runs with a mask have difference maps.")
        row = unique_row([{"m": r["mask_file"], **r} for r in rows], "m", f"item {item}")
        threshold = row["threshold"] if threshold is None else threshold
        if image is None:
            entry = next((it for it in items if it["id"] == item), {})
            image = open_picture(folder, entry.get("input"), f"the input of item {item}")
        path = table_path(folder, row["mask_file"], f"the mask file of item {item}")
        default = default_out(folder, f"differences-{item}.png")
    if not path.is_file():
        raise ParameterError(f"{path} is neither a sweep folder nor a saved mask (.npz); check the path.")
    data = saved_mask_maps(path)
    if "per_sample" not in data:
        raise ParameterError(NO_PER_SAMPLE)
    return data["per_sample"], data["difference"], data["soft"], 0.5 if threshold is None else threshold, image, default


# ---------------------------------------------------------------------- trade-off curves

def tradeoff_table(rows: list[dict], x: str, y: str, along: str = "strength", by: str | None = None,
                   where: dict | None = None) -> list[dict]:
    """Means of metrics x and y over the rows of each (by value, along value), over rows where
    both are defined (booleans count as 0/1): [{group, along, x, y, count}], sorted by along."""
    rows = [r for r in select(rows, where) if r.get(x) is not None and r.get(y) is not None and along in r]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r.get(by) if by else None, r[along]), []).append(r)
    table = [{"group": g, "along": a, "x": float(np.mean([float(r[x]) for r in rs])),
              "y": float(np.mean([float(r[y]) for r in rs])), "count": len(rs)} for (g, a), rs in cells.items()]
    return sorted(table, key=lambda t: (str(t["group"]), t["along"]))


def tradeoff_curve(sweep_dir, x: str = "success", y: str = "bg_psnr_gt", along: str = "strength",
                   by: str | None = None, where: dict | None = None, out=None, size: tuple[int, int] = (640, 480),
                   overwrite: bool = True) -> Path:
    """Mean metric y against mean metric x, one point per value of `along` (labelled), one curve per value of
    `by` (e.g. "ablation"). Size: `size` pixels. Other axes that vary: fix them by `where`, or they are averaged."""
    folder, rows, _ = load_sweep(sweep_dir)
    table = tradeoff_table(rows, x, y, along, by, where)
    if not table:
        raise ParameterError(f"no run has both {x!r} and {y!r}; pick metrics that are columns of {folder / CSV_NAME}.")
    table = [{**t, "group": f"{by} = {t['group']}" if by else None} for t in table]
    title = f"{short_label(y)} against {short_label(x)} along {along}"
    return draw_tradeoff(table, x, y, Path(out) if out else default_out(folder, f"tradeoff-{y}-vs-{x}.png"), title,
                         along, size=size, overwrite=overwrite)


def draw_tradeoff(table: list[dict], x: str, y: str, out, title: str, along: str = "strength",
                  anchor: tuple | None = None, size: tuple[int, int] = (640, 480), overwrite: bool = True) -> Path:
    """Metric y against x (axes named by axis_label) from tradeoff_table's rows, one line per group (its
    legend), points labelled r=...; `anchor` = (legend, x, y): a star, the copy baseline. Size: `size` px."""
    fig = _figure(*size)
    ax = fig.add_axes([0.13, 0.12, 0.82, 0.8])
    for group in dict.fromkeys(t["group"] for t in table):
        points = [t for t in table if t["group"] == group]
        ax.plot([t["x"] for t in points], [t["y"] for t in points], marker="o", label=group)
        for t in points:
            ax.annotate(f"{'r' if along == 'strength' else along}={t['along']}", (t["x"], t["y"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    if anchor is not None:
        ax.plot([anchor[1]], [anchor[2]], marker="*", markersize=12, color="black", linestyle="none", label=anchor[0])
    ax.set_xlabel(axis_label(x), fontsize=8)
    ax.set_ylabel(axis_label(y), fontsize=8)
    ax.grid(alpha=0.3)
    if any(t["group"] is not None for t in table) or anchor is not None:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(out), overwrite)


# ---------------------------------------------------------------------- defaults for the CLI

GRID_PREFERENCE = ("strength", "threshold", "guidance_scale", "mask_samples", "ablation", "blend",
                   "mask_noise_strength", "num_inference_steps", "seed")


def sweep_figures(sweep_dir) -> list[Path]:
    """The figures `diffedit sweep --figures` draws: an image grid along the first swept axis (in
    GRID_PREFERENCE order), the other axes at their first value; the masks; and, when r is swept,
    the trade-off of background PSNR against success (or mask IoU)."""
    folder, rows, _ = load_sweep(sweep_dir)
    varying = varying_axes(rows)
    paths = []
    column = next((a for a in GRID_PREFERENCE if a in varying), "strength")
    if any(r.get("image") for r in rows):
        paths.append(image_grid(folder, column, where={a: v[0] for a, v in varying.items() if a != column}))
        if any(r.get("mask_file") for r in rows):
            fixed = {a: v[0] for a, v in varying.items() if a in ("threshold", "mask_samples", "mask_noise_strength",
                                                                 "num_inference_steps", "seed")}
            paths.append(mask_overlays(folder, where=fixed))
    if "strength" in varying:
        columns = set().union(*rows)
        y = "bg_psnr_gt" if "bg_psnr_gt" in columns else "bg_psnr_mask"
        x = "success" if "success" in columns else "mask_iou"
        by = "ablation" if "ablation" in varying else None
        where = {a: v[0] for a, v in varying.items() if a not in ("strength", by)}
        if {x, y} <= columns:
            paths.append(tradeoff_curve(folder, x, y, "strength", by, where))
    return paths
