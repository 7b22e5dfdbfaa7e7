"""A deterministic synthetic world for training and evaluating the tiny SD-architecture model.

Scenes are 64 x 64 RGB images of one to three flat-coloured shapes on a plain or textured
background. Every pixel is known, so DiffEdit's masks and background preservation can be scored
against ground truth: an `Edit` changes one attribute (colour or shape) of one object and carries
the true edit mask (old | new object pixels) and the background mask (outside every object).

Geometry, in integer pixel coordinates (x = column, y = row) with size s = half-extent:

    circle    (x - cx)^2 + (y - cy)^2 <= s (s + 1)
    square    |x - cx| <= s  and  |y - cy| <= s
    triangle  upright, apex (cx, cy - s), base on row cy + s:  2 |x - cx| <= (y - cy) + s

All three fill the same (2s + 1) x (2s + 1) box. Boxes are placed at least OBJECT_GAP pixels
apart, so objects never overlap, not even after a shape edit. Objects are drawn without
anti-aliasing: an object's mask is exactly the set of pixels painted in its colour.

Caption grammar (objects left to right, i.e. sorted by (cx, cy), the order of `Scene.objects`):

    caption := object ("and" object)* "on a" [texture] background_colour "background"
    object  := "a" colour shape

e.g. "a red circle and a blue square on a striped gray background". The plain background has no
texture word. Texture orientation, positions and sizes are not in the caption.

Seeds: `sample_scene(seed)` draws everything from Generator(PCG64(seed)). Training uses seeds
TRAINING_SEEDS = [0, 10**6), held-out evaluation uses HELDOUT_SEEDS = [10**9, 10**9 + 10**6):
disjoint ranges, so no evaluation scene is a training scene. `make_edit(scene, seed)` draws from
Generator(PCG64([seed, 1])), a stream independent of the scene's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import ParameterError, PromptError

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
OBJECT_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOURS = tuple(OBJECT_RGB)
# Low-saturation mid tones: every object colour stays >= 118 (RGB distance) from every
# background colour at the extremes of its texture, and object colours are >= 160 apart.
BACKGROUND_RGB = {
    "gray": (128, 128, 128),
    "brown": (125, 95, 65),
    "beige": (185, 170, 135),
}
BACKGROUND_COLOURS = tuple(BACKGROUND_RGB)
BACKGROUND_KINDS = ("plain", "shaded", "striped", "checkered")
TEXTURE_AXES = ("x", "y")

MIN_SIZE, MAX_SIZE = 8, 15          # half-extent s of an object, pixels
OBJECT_GAP = 3                      # empty pixels at least between two objects' boxes
BORDER = 2                          # empty pixels at least between a box and the image edge
GRADIENT_AMPLITUDE = 16             # "shaded": linear ramp from -16 to +16 across the image
STRIPE_AMPLITUDE, STRIPE_WIDTH = 10, 4   # "striped": bands of 4 px alternating +-10
CHECK_AMPLITUDE, CHECK_CELL = 10, 8      # "checkered": 8 x 8 cells alternating +-10

OBJECT_COUNT_PROBABILITIES = {1: 0.3, 2: 0.4, 3: 0.3}
BACKGROUND_KIND_PROBABILITIES = {"plain": 0.4, "shaded": 0.2, "striped": 0.2, "checkered": 0.2}

TRAINING_SEEDS = range(0, 10**6)
HELDOUT_SEEDS = range(10**9, 10**9 + 10**6)
EDIT_STREAM = 1
EDIT_KINDS = ("colour", "shape")
MAX_CAPTION_WORDS = 3 * 3 + 2 + 5   # three objects, two "and", "on a <texture> <colour> background"

_YS, _XS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


@dataclass(frozen=True)
class SceneObject:
    shape: str                 # one of SHAPES
    colour: str                # one of COLOURS
    centre: tuple[int, int]    # (x, y) pixel coordinates
    size: int                  # half-extent s: the object fills the box [cx - s, cx + s] x [cy - s, cy + s]


@dataclass(frozen=True)
class Background:
    kind: str                  # one of BACKGROUND_KINDS
    colour: str                # one of BACKGROUND_COLOURS
    axis: str | None = None    # "x" or "y", the image axis a "shaded"/"striped" texture varies along


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]   # left to right: the caption's order
    background: Background
    seed: int | None = None            # the seed it was sampled from, if any


# ---------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, cx, cy, size, xs=_XS, ys=_YS) -> np.ndarray:
    """Pixels of a shape; cx, cy, size may be arrays broadcasting against the coordinate grids."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= size * (size + 1)
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    if shape == "triangle":
        return (dy >= -size) & (dy <= size) & (2 * np.abs(dx) <= dy + size)
    raise ParameterError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}.")


def object_mask(obj: SceneObject) -> np.ndarray:
    """(H, W) bool: the pixels painted for one object."""
    return shape_mask(obj.shape, obj.centre[0], obj.centre[1], obj.size)


def object_masks(scene: Scene) -> np.ndarray:
    """(n_objects, H, W) bool, in the order of `scene.objects`."""
    return np.stack([object_mask(obj) for obj in scene.objects])


def render_background(background: Background) -> np.ndarray:
    """(H, W, 3) uint8: the background alone."""
    coord = _XS if background.axis == "x" else _YS
    if background.kind == "plain":
        offset = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    elif background.kind == "shaded":
        offset = GRADIENT_AMPLITUDE * (2.0 * coord / (IMAGE_SIZE - 1) - 1.0)
    elif background.kind == "striped":
        offset = np.where((coord // STRIPE_WIDTH) % 2 == 0, STRIPE_AMPLITUDE, -STRIPE_AMPLITUDE)
    elif background.kind == "checkered":
        cells = _XS // CHECK_CELL + _YS // CHECK_CELL
        offset = np.where(cells % 2 == 0, CHECK_AMPLITUDE, -CHECK_AMPLITUDE)
    else:
        raise ParameterError(f"unknown background kind {background.kind!r}; use one of {', '.join(BACKGROUND_KINDS)}.")
    base = np.array(BACKGROUND_RGB[background.colour], dtype=np.float64)
    return np.clip(np.rint(base + offset[..., None]), 0, 255).astype(np.uint8)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, masks (n_objects, H, W) bool): crisp, so masks match the drawing exactly."""
    image = render_background(scene.background)
    masks = object_masks(scene)
    for obj, mask in zip(scene.objects, masks):
        image[mask] = OBJECT_RGB[obj.colour]
    return image, masks


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """(N, H, W, 3) uint8 images of several scenes."""
    return np.stack([render(scene)[0] for scene in scenes])


def to_tensor(image: np.ndarray):
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 torch tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    batch = image[None] if image.ndim == 3 else image
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return x / 127.5 - 1.0


def to_image(tensor) -> np.ndarray:
    """float torch tensor (N, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) or (H, W, 3)."""
    import torch

    x = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


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
# Captions


def caption(scene: Scene) -> str:
    """e.g. "a red circle and a blue square on a striped gray background"."""
    objects = " and ".join(f"a {obj.colour} {obj.shape}" for obj in scene.objects)
    texture = "" if scene.background.kind == "plain" else scene.background.kind + " "
    return f"{objects} on a {texture}{scene.background.colour} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    textures = [kind for kind in BACKGROUND_KINDS if kind != "plain"]
    return ["a", "and", "on", "background", *COLOURS, *SHAPES, *textures, *BACKGROUND_COLOURS]


@dataclass(frozen=True)
class CaptionParts:
    objects: tuple[tuple[str, str], ...]   # (colour, shape), left to right
    background_kind: str
    background_colour: str


def parse_caption(text: str) -> CaptionParts:
    """Inverse of `caption` up to positions, sizes and texture axis; PromptError off the grammar."""
    words = text.split()
    error = PromptError(f"caption {text!r} is not in the shapes-world grammar; write e.g. "
                        f"'a red circle and a blue square on a striped gray background'.")
    objects, i = [], 0
    while True:
        if i + 3 > len(words) or words[i] != "a" or words[i + 1] not in COLOURS or words[i + 2] not in SHAPES:
            raise error
        objects.append((words[i + 1], words[i + 2]))
        i += 3
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    rest = words[i:]
    if len(rest) == 5 and rest[2] in BACKGROUND_KINDS[1:]:
        kind, rest = rest[2], rest[:2] + rest[3:]
    else:
        kind = "plain"
    if len(rest) != 4 or rest[:2] != ["on", "a"] or rest[2] not in BACKGROUND_COLOURS or rest[3] != "background":
        raise error
    return CaptionParts(tuple(objects), kind, rest[2])


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
