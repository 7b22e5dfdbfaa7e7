"""The scene model of the shapes world: what a scene is (one to three objects on a background),
how it is drawn and how it is captioned. world.py samples scenes from seeds and edits them; it
re-exports every name of this module, so `diffedit.shapes.world` is the one import for the world.

Scenes are 64 x 64 RGB images of one to three flat-coloured shapes on a plain or textured
background. Geometry, in integer pixel coordinates (x = column, y = row) with size s = half-extent:

    circle    (x - cx)^2 + (y - cy)^2 <= s (s + 1)
    square    |x - cx| <= s  and  |y - cy| <= s
    triangle  upright, apex (cx, cy - s), base on row cy + s:  2 |x - cx| <= (y - cy) + s

All three fill the same (2s + 1) x (2s + 1) box. Objects are drawn without anti-aliasing: an
object's mask is exactly the set of pixels painted in its colour.

Caption grammar (objects left to right, i.e. sorted by (cx, cy), the order of `Scene.objects`):

    caption := object ("and" object)* "on a" [texture] background_colour "background"
    object  := "a" colour shape

e.g. "a red circle and a blue square on a striped gray background". The plain background has no
texture word. Texture orientation, positions and sizes are not in the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffedit.errors import ParameterError, PromptError

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

GRADIENT_AMPLITUDE = 16             # "shaded": linear ramp from -16 to +16 across the image
STRIPE_AMPLITUDE, STRIPE_WIDTH = 10, 4   # "striped": bands of 4 px alternating +-10
CHECK_AMPLITUDE, CHECK_CELL = 10, 8      # "checkered": 8 x 8 cells alternating +-10
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
