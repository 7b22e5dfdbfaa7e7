"""A deterministic synthetic world for training and evaluating the tiny SD-architecture model.

Scenes are 64 x 64 RGB images of one to three flat-coloured shapes on a plain or textured
background (their model, geometry, drawing and captions: scene.py, whose names this module
re-exports). Every pixel is known, so DiffEdit's masks and background preservation can be scored
against ground truth: an `Edit` changes one attribute (colour or shape) of one object and carries
the true edit mask (old | new object pixels) and the background mask (outside every object).

Placement: every object fills a (2s + 1) x (2s + 1) box, s in [MIN_SIZE, MAX_SIZE]. Boxes are
placed at least OBJECT_GAP pixels apart and BORDER pixels from the image edge, so objects never
overlap, not even after a shape edit.

Seeds: `sample_scene(seed)` draws everything from Generator(PCG64(seed)). Training uses seeds
TRAINING_SEEDS = [0, 10**6), held-out evaluation uses HELDOUT_SEEDS = [10**9, 10**9 + 10**6):
disjoint ranges, so no evaluation scene is a training scene. `make_edit(scene, seed)` draws from
Generator(PCG64([seed, 1])), a stream independent of the scene's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from diffedit.errors import ParameterError
from diffedit.shapes.scene import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BACKGROUND_RGB,
    CHECK_AMPLITUDE,
    CHECK_CELL,
    COLOURS,
    GRADIENT_AMPLITUDE,
    IMAGE_SIZE,
    MAX_CAPTION_WORDS,
    OBJECT_RGB,
    SHAPES,
    STRIPE_AMPLITUDE,
    STRIPE_WIDTH,
    TEXTURE_AXES,
    Background,
    CaptionParts,
    Scene,
    SceneObject,
    caption,
    object_mask,
    object_masks,
    parse_caption,
    render,
    render_background,
    render_batch,
    shape_mask,
    to_image,
    to_tensor,
    vocabulary,
)

__all__ = [  # this module's names and, re-exported, those of scene.py
    "BACKGROUND_COLOURS", "BACKGROUND_KINDS", "BACKGROUND_KIND_PROBABILITIES", "BACKGROUND_RGB", "BORDER",
    "CHECK_AMPLITUDE", "CHECK_CELL", "COLOURS", "EDIT_KINDS", "EDIT_STREAM", "GRADIENT_AMPLITUDE", "HELDOUT_SEEDS",
    "IMAGE_SIZE", "MAX_CAPTION_WORDS", "MAX_SIZE", "MIN_SIZE", "OBJECT_COUNT_PROBABILITIES", "OBJECT_GAP",
    "OBJECT_RGB", "SHAPES", "STRIPE_AMPLITUDE", "STRIPE_WIDTH", "TEXTURE_AXES", "TRAINING_SEEDS", "Background",
    "CaptionParts", "Edit", "Scene", "SceneObject", "caption", "edit_scene", "heldout_edits", "heldout_scenes",
    "make_edit", "object_mask", "object_masks", "parse_caption", "render", "render_background", "render_batch",
    "sample_scene", "shape_mask", "to_image", "to_tensor", "training_scenes", "validate_scene", "vocabulary",
]

MIN_SIZE, MAX_SIZE = 8, 15          # half-extent s of an object, pixels
OBJECT_GAP = 3                      # empty pixels at least between two objects' boxes
BORDER = 2                          # empty pixels at least between a box and the image edge

OBJECT_COUNT_PROBABILITIES = {1: 0.3, 2: 0.4, 3: 0.3}
BACKGROUND_KIND_PROBABILITIES = {"plain": 0.4, "shaded": 0.2, "striped": 0.2, "checkered": 0.2}

TRAINING_SEEDS = range(0, 10**6)
HELDOUT_SEEDS = range(10**9, 10**9 + 10**6)
EDIT_STREAM = 1
EDIT_KINDS = ("colour", "shape")


# ---------------------------------------------------------------------------------------------
# Sampling


def _box(cx: int, cy: int, size: int) -> tuple[int, int, int, int]:
    return cx - size, cy - size, cx + size, cy + size


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """At least OBJECT_GAP empty columns or rows between boxes (x0, y0, x1, y1), inclusive ends."""
    return (b[0] - a[2] > OBJECT_GAP or a[0] - b[2] > OBJECT_GAP
            or b[1] - a[3] > OBJECT_GAP or a[1] - b[3] > OBJECT_GAP)


def _place(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """Rejection sampling of `count` (cx, cy, size) with boxes inside the image and apart."""
    for _ in range(1000):
        sizes = rng.integers(MIN_SIZE, MAX_SIZE + 1, size=count)
        placed: list[tuple[int, int, int]] = []
        for size in sizes:
            low, high = BORDER + size, IMAGE_SIZE - BORDER - size  # cx in [low, high)
            for _ in range(100):
                cx, cy = (int(v) for v in rng.integers(low, high, size=2))
                if all(_apart(_box(cx, cy, size), _box(*other)) for other in placed):
                    placed.append((cx, cy, int(size)))
                    break
            else:
                break
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} objects after 1000 attempts")  # never reached for count <= 3


def sample_scene(seed: int) -> Scene:
    """The scene of one seed: everything drawn from Generator(PCG64(seed))."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}.")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    counts = list(OBJECT_COUNT_PROBABILITIES)
    count = counts[rng.choice(len(counts), p=list(OBJECT_COUNT_PROBABILITIES.values()))]
    kind = BACKGROUND_KINDS[rng.choice(len(BACKGROUND_KINDS), p=list(BACKGROUND_KIND_PROBABILITIES.values()))]
    colour = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
    axis = TEXTURE_AXES[rng.integers(len(TEXTURE_AXES))]
    background = Background(kind, colour, axis if kind in ("shaded", "striped") else None)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=count, replace=False)  # distinct (shape, colour)
    objects = [SceneObject(SHAPES[k // len(COLOURS)], COLOURS[k % len(COLOURS)], (cx, cy), size)
               for k, (cx, cy, size) in zip(kinds, _place(rng, count))]
    objects.sort(key=lambda obj: (obj.centre[0], obj.centre[1]))
    return Scene(tuple(objects), background, int(seed))


def _seed_range_scenes(seeds: range, start: int, count: int, name: str) -> list[Scene]:
    if count < 0 or start < 0 or start + count > len(seeds):
        raise ParameterError(f"{name} scenes [{start}, {start + count}) fall outside [0, {len(seeds)}); "
                             f"ask for fewer or start earlier.")
    return [sample_scene(seeds[start + i]) for i in range(count)]


def training_scenes(start: int, count: int) -> list[Scene]:
    """Scenes of the training seeds start, start + 1, ... (TRAINING_SEEDS = [0, 10**6))."""
    return _seed_range_scenes(TRAINING_SEEDS, start, count, "training")


def heldout_scenes(count: int, start: int = 0) -> list[Scene]:
    """Held-out evaluation scenes, seeds 10**9 + start, 10**9 + start + 1, ..."""
    return _seed_range_scenes(HELDOUT_SEEDS, start, count, "held-out")


def validate_scene(scene: Scene) -> None:
    """Raise ParameterError unless the scene is one this world can produce (up to seed)."""
    bg = scene.background
    if bg.kind not in BACKGROUND_KINDS or bg.colour not in BACKGROUND_COLOURS:
        raise ParameterError(f"background {bg} is not in this world; use kinds {BACKGROUND_KINDS} and colours {BACKGROUND_COLOURS}.")
    if not 1 <= len(scene.objects) <= 3:
        raise ParameterError(f"a scene has one to three objects, this one has {len(scene.objects)}.")
    boxes = []
    for obj in scene.objects:
        if obj.shape not in SHAPES or obj.colour not in COLOURS or not MIN_SIZE <= obj.size <= MAX_SIZE:
            raise ParameterError(f"object {obj} is not in this world; use shapes {SHAPES}, colours {COLOURS}, "
                                 f"sizes {MIN_SIZE}..{MAX_SIZE}.")
        box = _box(obj.centre[0], obj.centre[1], obj.size)
        if min(box) < BORDER or max(box) > IMAGE_SIZE - 1 - BORDER:
            raise ParameterError(f"object {obj} is closer than {BORDER} px to the image edge; move it inwards.")
        if not all(_apart(box, other) for other in boxes):
            raise ParameterError(f"object {obj} is closer than {OBJECT_GAP} px to another object; move it apart.")
        boxes.append(box)
    pairs = [(obj.shape, obj.colour) for obj in scene.objects]
    if len(set(pairs)) != len(pairs):
        raise ParameterError("two objects share shape and colour; make every (shape, colour) pair distinct.")
    order = [(obj.centre[0], obj.centre[1]) for obj in scene.objects]
    if order != sorted(order):
        raise ParameterError("objects must be listed left to right (by centre x, then y); sort them.")


# ---------------------------------------------------------------------------------------------
# Edits


@dataclass(frozen=True, eq=False)
class Edit:
    source: Scene
    target: Scene                  # the source with one attribute of one object changed
    object_index: int              # index into source.objects (= position in the caption)
    kind: str                      # "colour" or "shape"
    source_value: str              # the word replaced, e.g. "red"
    target_value: str              # the word put instead, e.g. "blue"
    source_caption: str
    target_caption: str            # the source caption with exactly one word changed
    source_image: np.ndarray       # (H, W, 3) uint8
    target_image: np.ndarray       # (H, W, 3) uint8, the ideal edit
    edit_mask: np.ndarray          # (H, W) bool: old | new pixels of the edited object
    background_mask: np.ndarray    # (H, W) bool: outside every object of source and target
    seed: int | None = None


def _edit_choices(scene: Scene, kind: str) -> list[tuple[int, list[str]]]:
    """(object index, new values) for every object with at least one value that keeps pairs distinct."""
    choices = []
    for index, obj in enumerate(scene.objects):
        taken = {(o.shape, o.colour) for j, o in enumerate(scene.objects) if j != index}
        if kind == "colour":
            values = [c for c in COLOURS if c != obj.colour and (obj.shape, c) not in taken]
        else:
            values = [s for s in SHAPES if s != obj.shape and (s, obj.colour) not in taken]
        if values:
            choices.append((index, values))
    return choices


def edit_scene(scene: Scene, object_index: int, kind: str, value: str, seed: int | None = None) -> Edit:
    """The edit that sets the colour or shape of one object to `value`, with its masks."""
    if kind not in EDIT_KINDS:
        raise ParameterError(f"edit kind {kind!r} is unknown; use 'colour' or 'shape'.")
    if not 0 <= object_index < len(scene.objects):
        raise ParameterError(f"object index {object_index} is out of range for a scene of {len(scene.objects)} objects.")
    obj = scene.objects[object_index]
    if kind == "colour":
        new, old_value = replace(obj, colour=value), obj.colour
    else:
        new, old_value = replace(obj, shape=value), obj.shape
    if value == old_value:
        raise ParameterError(f"the edit sets {kind} {value!r}, which the object already has; choose another value.")
    objects = list(scene.objects)
    objects[object_index] = new
    target = replace(scene, objects=tuple(objects))
    validate_scene(target)
    source_image, source_masks = render(scene)
    target_image, target_masks = render(target)
    return Edit(
        source=scene, target=target, object_index=object_index, kind=kind,
        source_value=old_value, target_value=value,
        source_caption=caption(scene), target_caption=caption(target),
        source_image=source_image, target_image=target_image,
        edit_mask=source_masks[object_index] | target_masks[object_index],
        background_mask=~(source_masks.any(axis=0) | target_masks.any(axis=0)),
        seed=seed,
    )


def make_edit(scene: Scene, seed: int, kind: str | None = None) -> Edit:
    """A random edit of one object (kind drawn too unless given), from Generator(PCG64([seed, 1]))."""
    rng = np.random.Generator(np.random.PCG64([int(seed), EDIT_STREAM]))
    drawn_kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]  # drawn even when `kind` is given: same stream either way
    kind = drawn_kind if kind is None else kind
    if kind not in EDIT_KINDS:
        raise ParameterError(f"edit kind {kind!r} is unknown; use 'colour' or 'shape'.")
    choices = _edit_choices(scene, kind)
    if not choices:
        raise ParameterError(f"no {kind} edit of this scene keeps its (shape, colour) pairs distinct; edit the other attribute.")
    index, values = choices[rng.integers(len(choices))]
    return edit_scene(scene, index, kind, values[rng.integers(len(values))], seed=int(seed))


def heldout_edits(count: int) -> list[Edit]:
    """`count` edits of held-out scenes 0, 1, 2, ..., alternating colour and shape edits.

    Edit i is of kind EDIT_KINDS[i % 2]; a scene that admits no edit of that kind is skipped."""
    if not 0 <= count <= len(HELDOUT_SEEDS):
        raise ParameterError(f"count must be in [0, {len(HELDOUT_SEEDS)}], got {count}.")
    edits: list[Edit] = []
    index = 0
    while len(edits) < count:
        scene = sample_scene(HELDOUT_SEEDS[index])
        kind = EDIT_KINDS[len(edits) % 2]
        if _edit_choices(scene, kind):
            edits.append(make_edit(scene, scene.seed, kind))
        index += 1
    return edits
