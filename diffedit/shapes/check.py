"""Did an edit happen? A deterministic checker of edited shapes-world images.

For the edited object of an `Edit` (its centre and size are the same in source and target):

 1. window: the object's box grown by WINDOW_PAD pixels, clipped to the image. The other
    objects' pixels, grown by EXCLUDE_PAD, take no part in anything below.
 2. local background: per-channel median of the window pixels outside the object's box grown
    by RING_GAP (the ring around the object).
 3. foreground: the pixels whose RGB distance to the local background exceeds
    FOREGROUND_DISTANCE; keep the largest 4-connected component and take the per-channel median
    of its interior (the component eroded by one pixel, unless that leaves too few).
 4. half-contrast segmentation: alpha = projection of (pixel - background) on (median -
    background), normalised to 1 at the median; keep the largest 4-connected component of
    alpha > 0.5, so a blurred edge is cut where it was drawn whatever the contrast; take the
    median of its interior again.
 5. colour: the palette colour (OBJECT_RGB) nearest to that median.
 6. shape: the circle / square / triangle template with the highest IoU against the component,
    searched over sizes s +- SIZE_SEARCH and centre offsets +- OFFSET_SEARCH around the
    object's own; None when even the best IoU is below MIN_SHAPE_IOU.

The edit succeeds when the measured colour and shape are those of the target object: for a
colour edit the new colour and the unchanged shape, for a shape edit the new shape and the
unchanged colour. Calibration (tests/test_shapes_world.py): 100 % success on exact target
renders, 100 % failure on the unedited sources, also under noise, blur, a 1-px shift and JPEG.

The other objects of the scene are measured the same way (`check_others`), each against its
own unchanged colour and shape, with the edited object's old and new pixels left out:
`others_kept` is True when all of them are kept. Like the edited object, each is looked for at
its own place and size, so an edit that recolours, reshapes, moves or much enlarges another
object (beyond the template search's +- 2 px) does not keep it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffedit.errors import ImageInputError
from diffedit.shapes.world import (
    IMAGE_SIZE,
    OBJECT_RGB,
    SHAPES,
    Edit,
    SceneObject,
    object_mask,
    shape_mask,
)

WINDOW_PAD = 6            # pixels around the object's box
RING_GAP = 2              # the background ring starts this far outside the box
EXCLUDE_PAD = 2           # other objects' pixels, grown by this, are ignored
FOREGROUND_DISTANCE = 48  # RGB distance to the local background that counts as "object"
MIN_COMPONENT = 12        # fewer foreground pixels than this: no object found
MIN_INTERIOR = 9          # fewer interior pixels than this: take the colour over the whole component
SIZE_SEARCH = 2           # template search: sizes s + [-SIZE_SEARCH, SIZE_SEARCH]
OFFSET_SEARCH = 2         # template search: centre offsets in [-OFFSET_SEARCH, OFFSET_SEARCH]
MIN_SHAPE_IOU = 0.5       # best template IoU below this: no recognisable shape

_PALETTE_NAMES = tuple(OBJECT_RGB)
_PALETTE = np.array([OBJECT_RGB[name] for name in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class EditCheck:
    colour_ok: bool             # measured colour == target object's colour
    shape_ok: bool              # measured shape == target object's shape
    success: bool               # both
    colour: str | None          # measured colour name (None: no object found)
    shape: str | None           # measured shape name (None: no object found or no shape fits)
    details: dict = field(default_factory=dict)   # background, median colour, IoUs, component size


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilation by a (2 pixels + 1) square."""
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1)
        out = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
               | padded[:-2, :-2] | padded[:-2, 2:] | padded[2:, :-2] | padded[2:, 2:])
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in the mask."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D bool mask (label propagation; ties: first in raster order)."""
    height, width = mask.shape
    empty = height * width
    padded = np.full((height + 2, width + 2), empty, dtype=np.int32)
    labels = padded[1:-1, 1:-1]  # a view: updating it updates the padded array
    labels[mask] = np.flatnonzero(mask)
    while True:
        smallest = np.minimum(np.minimum(padded[:-2, 1:-1], padded[2:, 1:-1]), np.minimum(padded[1:-1, :-2], padded[1:-1, 2:]))
        smallest = np.where(mask, np.minimum(smallest, labels), empty)
        if np.array_equal(smallest, labels):
            break
        labels[...] = smallest
    if not mask.any():
        return mask.copy()
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _interior_median(window: np.ndarray, component: np.ndarray) -> np.ndarray:
    """Per-channel median colour of the component eroded by one pixel (of all of it if too thin)."""
    interior = _erode(component)
    return np.median(window[interior] if interior.sum() >= MIN_INTERIOR else window[component], axis=0)


def nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest to an RGB triple, and its distance."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float64), axis=1)
    best = int(np.argmin(distances))
    return _PALETTE_NAMES[best], float(distances[best])


def best_templates(component: np.ndarray, x0: int, y0: int, cx: int, cy: int, size: int) -> dict[str, tuple[float, tuple[int, int, int]]]:
    """Per shape: the best IoU of its templates against `component` (a window whose top-left pixel is
    (x0, y0)) and the (cx, cy, size) reaching it, over the search grid around (cx, cy, size)."""
    area = component.sum()
    reach = size + SIZE_SEARCH + OFFSET_SEARCH  # no template reaches further from (cx, cy)
    left, top = max(cx - reach - x0, 0), max(cy - reach - y0, 0)
    crop = component[top:cy + reach - y0 + 1, left:cx + reach - x0 + 1]
    ys, xs = np.mgrid[y0 + top:y0 + top + crop.shape[0], x0 + left:x0 + left + crop.shape[1]].astype(np.int16)
    size_steps = np.arange(-SIZE_SEARCH, SIZE_SEARCH + 1, dtype=np.int16)
    offsets = np.arange(-OFFSET_SEARCH, OFFSET_SEARCH + 1, dtype=np.int16)
    dsize, dy, dx = (a.reshape(-1, 1, 1) for a in np.meshgrid(size_steps, offsets, offsets, indexing="ij"))
    sizes = np.maximum(size + dsize, 1)
    out = {}
    for shape in SHAPES:
        templates = shape_mask(shape, cx + dx, cy + dy, sizes, xs, ys)  # (K, h, w)
        inter = np.count_nonzero(templates & crop, axis=(1, 2))
        union = np.count_nonzero(templates, axis=(1, 2)) + area - inter
        iou = inter / np.maximum(union, 1)
        k = int(np.argmax(iou))
        out[shape] = (float(iou[k]), (int(cx + dx.flat[k]), int(cy + dy.flat[k]), int(sizes.flat[k])))
    return out


def segment_object(window: np.ndarray, usable: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Steps 3-4: the object's pixels in a (h, w, 3) float window and their interior median colour
    (None when fewer than MIN_COMPONENT pixels stand out from the background)."""
    foreground = usable & (np.linalg.norm(window - background, axis=-1) > FOREGROUND_DISTANCE)
    component = largest_component(foreground)
    if component.sum() < MIN_COMPONENT:
        return component, None
    median = _interior_median(window, component)
    direction = median - background
    alpha = (window - background) @ direction / max(float(direction @ direction), 1e-6)
    half = largest_component(usable & (alpha > 0.5))
    if half.sum() < MIN_COMPONENT:
        return component, median
    return half, _interior_median(window, half)


def _as_image(edited_image) -> np.ndarray:
    if isinstance(edited_image, Image.Image):
        edited_image = np.asarray(edited_image.convert("RGB"))
    if not isinstance(edited_image, np.ndarray) or edited_image.dtype != np.uint8 \
            or edited_image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        got = getattr(edited_image, "shape", type(edited_image).__name__)
        raise ImageInputError(f"the edited image must be a uint8 array of shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) "
                              f"or a PIL image, got {got}; convert tensors with diffedit.shapes.world.to_image.")
    return edited_image


def check_edit(edited_image, edit: Edit) -> EditCheck:
    """Measure the edited object's colour and shape in `edited_image` and compare with the target."""
    image = _as_image(edited_image).astype(np.float64)
    return measure_object(image, edit.target.objects[edit.object_index], _other_objects(edit, edit.object_index))


def check_others(edited_image, edit: Edit) -> list[EditCheck]:
    """`check_edit` for each object the edit leaves alone, against its source colour and shape
    (in scene order, the edited object left out; empty for a one-object scene)."""
    image = _as_image(edited_image).astype(np.float64)
    return [measure_object(image, obj, _other_objects(edit, j))
            for j, obj in enumerate(edit.source.objects) if j != edit.object_index]


def others_kept(edited_image, edit: Edit) -> bool:
    """True when every object but the edited one keeps its colour and shape (True without others)."""
    return all(check.success for check in check_others(edited_image, edit))


def _other_objects(edit: Edit, index: int) -> np.ndarray:
    """The pixels of every object but object `index`, in the source and in the target."""
    others = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for j, (before, after) in enumerate(zip(edit.source.objects, edit.target.objects)):
        if j != index:
            others |= object_mask(before) | object_mask(after)
    return others


def measure_object(image: np.ndarray, obj: SceneObject, others: np.ndarray) -> EditCheck:
    """Steps 1-6 for `obj` in a float (H, W, 3) image, the `others` pixels left out; compared
    with `obj`'s colour and shape."""
    (cx, cy), size = obj.centre, obj.size
    x0, y0 = max(cx - size - WINDOW_PAD, 0), max(cy - size - WINDOW_PAD, 0)
    x1, y1 = min(cx + size + WINDOW_PAD + 1, IMAGE_SIZE), min(cy + size + WINDOW_PAD + 1, IMAGE_SIZE)
    window = image[y0:y1, x0:x1]

    usable = ~_grow(others, EXCLUDE_PAD)[y0:y1, x0:x1]
    ys, xs = np.mgrid[y0:y1, x0:x1]
    near_box = (np.abs(xs - cx) <= size + RING_GAP) & (np.abs(ys - cy) <= size + RING_GAP)
    ring = usable & ~near_box
    background = np.median(window[ring], axis=0) if ring.any() else np.median(window[usable], axis=0)

    component, median = segment_object(window, usable, background)
    details = {"background_rgb": background.tolist(), "component_pixels": int(component.sum())}
    if median is None:
        return EditCheck(False, False, False, None, None, details)
    colour, colour_distance = nearest_colour(median)

    templates = best_templates(component, x0, y0, cx, cy, size)
    best_shape = max(SHAPES, key=lambda s: templates[s][0])
    shape = best_shape if templates[best_shape][0] >= MIN_SHAPE_IOU else None
    details.update(median_rgb=median.tolist(), colour_distance=colour_distance,
                   iou={s: iou for s, (iou, _) in templates.items()},
                   best_template=templates[best_shape][1])

    colour_ok, shape_ok = colour == obj.colour, shape == obj.shape
    return EditCheck(colour_ok, shape_ok, colour_ok and shape_ok, colour, shape, details)


def check_edits(edited_images, edits: list[Edit]) -> list[EditCheck]:
    """`check_edit` over a batch: edited_images (N, H, W, 3) uint8 or a list of images."""
    if len(edited_images) != len(edits):
        raise ImageInputError(f"got {len(edited_images)} images for {len(edits)} edits; pass one image per edit.")
    return [check_edit(image, edit) for image, edit in zip(edited_images, edits)]


def success_rates(checks: list[EditCheck]) -> dict[str, float]:
    """Fractions of success, colour_ok and shape_ok over a list of checks."""
    n = max(len(checks), 1)
    return {"success": sum(c.success for c in checks) / n,
            "colour_ok": sum(c.colour_ok for c in checks) / n,
            "shape_ok": sum(c.shape_ok for c in checks) / n}
