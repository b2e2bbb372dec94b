"""Shape scenes: the visual half of the built-in synthetic world.

A scene places 1-3 coloured shapes on a 3x3 grid of an ``IMAGE_SIZE`` x ``IMAGE_SIZE`` image, one shape
per cell. Within a scene every colour and every shape type appears at most once, so "the circle",
"the red object" and "the red circle" each name exactly one object. Rendering is exact (no
anti-aliasing, no noise): a pixel is either the background grey or one of ``COLOUR_RGB``'s colours.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from ..manipulations import Box, box_from_pixels

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
IMAGE_SIZE = 48
PATCH_SIZE = 8
GRID = 3  # cells per side

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
BACKGROUND_RGB = (225, 225, 225)
RADIUS = {"small": 4 / IMAGE_SIZE, "large": 7 / IMAGE_SIZE}  # shape radius as a fraction of the image side
CELL_NAMES = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
_CELL_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the middle", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
COUNT_WORDS = ("zero", "one", "two", "three")
BOX_MARGIN = 2  # pixels around an object's box (a grounded box holds the whole object)
_RANDOM_DRAWS = 64  # rejection-sampling tries per object before enumerating every allowed candidate


@dataclass
class Shape:
    """One object: ``row`` 0..2 is top/middle/bottom, ``col`` 0..2 is left/middle/right."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self):
        for name, value, options in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS), ("size", self.size, SIZES)):
            if value not in options:
                raise ValueError(f"Shape.{name} is {value!r}; expected one of {options}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"Shape cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")

    @property
    def cell(self) -> int:
        """Reading-order index 0..8 of the grid cell."""
        return self.row * GRID + self.col

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    shapes: list[Shape]


def sample_scene(rng: random.Random, n_shapes: int | None = None, allowed: Callable[[Shape], bool] | None = None) -> Scene:
    """A scene of ``n_shapes`` (default: uniform 1-3) objects in distinct cells, with distinct colours
    and distinct shape types, each accepted by ``allowed``; shapes are listed in reading order."""
    n = rng.randint(1, GRID) if n_shapes is None else n_shapes
    if not 1 <= n <= GRID:
        raise ValueError(f"n_shapes must be 1..{GRID}, got {n}")
    allowed = allowed or (lambda s: True)
    shapes: list[Shape] = []
    for _ in range(n):
        cells = [c for c in range(GRID * GRID) if c not in {s.cell for s in shapes}]
        kinds = [k for k in SHAPES if k not in {s.shape for s in shapes}]
        colours = [c for c in COLOURS if c not in {s.colour for s in shapes}]
        shapes.append(_draw_shape(rng, kinds, colours, cells, allowed))
    return Scene(sorted(shapes, key=lambda s: s.cell))


def _draw_shape(rng: random.Random, kinds: list[str], colours: list[str], cells: list[int], allowed: Callable[[Shape], bool]) -> Shape:
    """A uniformly drawn allowed shape from the free kinds, colours and cells."""
    for _ in range(_RANDOM_DRAWS):
        cell = rng.choice(cells)
        candidate = Shape(rng.choice(kinds), rng.choice(colours), rng.choice(SIZES), cell // GRID, cell % GRID)
        if allowed(candidate):
            return candidate
    candidates = [
        Shape(k, c, s, cell // GRID, cell % GRID)
        for k in kinds for c in colours for s in SIZES for cell in cells
    ]
    candidates = [s for s in candidates if allowed(s)]
    if not candidates:
        raise ValueError(
            "sample_scene: `allowed` rejects every shape that still fits this scene; "
            "allow more (colour, shape) pairs or ask for fewer shapes"
        )
    return rng.choice(candidates)


@functools.lru_cache(maxsize=1024)
def shape_mask(shape: str, centre_x: float, centre_y: float, radius: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (centre_x, centre_y) pixels; a pixel is inside
    when its centre is. Squares have half-side ``radius``; triangles point up and span 2*radius."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - centre_x, ys - centre_y
    if shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        mask = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    elif shape == "triangle":
        mask = (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def geometry(shape: Shape, size: int = IMAGE_SIZE) -> tuple[float, float, float]:
    """(centre_x, centre_y, radius) in pixels of ``shape`` drawn at ``size``."""
    cell = size / GRID
    return (shape.col + 0.5) * cell, (shape.row + 0.5) * cell, RADIUS[shape.size] * size


def object_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """int64 (size, size): 0 for background, ``i + 1`` where ``scene.shapes[i]`` covers the pixel."""
    out = np.zeros((size, size), dtype=np.int64)
    for i, s in enumerate(scene.shapes):
        out[shape_mask(s.shape, *geometry(s, size), size)] = i + 1
    return out


def render_array(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) RGB rendering of ``scene``."""
    palette = np.array([BACKGROUND_RGB] + [COLOUR_RGB[s.colour] for s in scene.shapes], dtype=np.uint8)
    return palette[object_map(scene, size)]


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB image of ``scene``: shapes centred in their cells on a light grey background."""
    return Image.fromarray(render_array(scene, size), mode="RGB")


def patch_labels(scene: Scene, size: int = IMAGE_SIZE, patch: int = PATCH_SIZE) -> dict[str, np.ndarray]:
    """Per-patch targets, int64 (size // patch, size // patch) each: ``"colour"`` (0 background,
    1 + COLOURS index), ``"shape"`` (0, 1 + SHAPES index), ``"size"`` (0, 1 small, 2 large). A patch
    takes the object covering most of its pixels, and is background only when no object touches it."""
    classes = {
        "colour": [1 + COLOURS.index(s.colour) for s in scene.shapes],
        "shape": [1 + SHAPES.index(s.shape) for s in scene.shapes],
        "size": [1 + SIZES.index(s.size) for s in scene.shapes],
    }
    return labels_by_patch(object_map(scene, size), classes, patch)


def labels_by_patch(objects: np.ndarray, classes: dict[str, list[int]], patch: int = PATCH_SIZE) -> dict[str, np.ndarray]:
    """Majority-object labels per patch. ``objects`` (size, size): 0 background, ``i + 1`` for object
    i; ``classes[name][i]`` is object i's class. Returns int64 (size // patch, size // patch) per name,
    0 where no object touches the patch."""
    size = objects.shape[0]
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of patch size {patch}")
    grid = size // patch
    n_objects = int(objects.max(initial=0))
    blocks = objects.reshape(grid, patch, grid, patch)
    counts = np.stack([np.zeros((grid, grid), dtype=np.int64)] + [(blocks == i + 1).sum(axis=(1, 3)) for i in range(n_objects)])
    winner = counts.argmax(axis=0)  # the all-zero background row wins only where no object has a pixel
    return {name: np.asarray([0, *values], dtype=np.int64)[winner] for name, values in classes.items()}


def caption(scene: Scene) -> str:
    """``"a large red circle at the top left and a small blue square in the middle."``"""
    parts = [f"a {s.size} {s.colour} {s.shape} {_CELL_PHRASES[s.cell]}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def detail_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str, Shape]]:
    """``(kind, question, target, answer, shape)`` for a colour and a shape question about objects drawn
    with ``rng`` (the first two of :func:`questions`), with the noun phrase that names the object
    (``"the square"``, ``"the red object"``) and the object itself."""
    colour, shape = rng.choice(scene.shapes), rng.choice(scene.shapes)
    return [
        ("colour", f"What colour is the {colour.shape}?", f"the {colour.shape}", colour.colour, colour),
        ("shape", f"What shape is the {shape.colour} object?", f"the {shape.colour} object", shape.shape, shape),
    ]


def object_box(shape: Shape, size: int = IMAGE_SIZE, margin: float = BOX_MARGIN) -> Box:
    """The box around ``shape`` drawn at ``size``, ``margin`` pixels wider on every side, in CogVLM's
    0-999 coordinates."""
    x, y, r = geometry(shape, size)
    return box_from_pixels(x - r - margin, y - r - margin, x + r + margin, y + r + margin, size, size)


def questions(scene: Scene, rng: random.Random, allowed: Callable[[Shape], bool] | None = None) -> list[tuple[str, str, str]]:
    """One ``(kind, question, answer)`` per kind: colour, shape, count, position, yesno, size.

    The asked-about object is drawn with ``rng``; yes/no questions are yes half the time, and a "no"
    asks a (colour, shape) pair absent from the scene. ``allowed`` (read for its colour/shape only,
    called with a small shape at the top left) keeps held-out pairs out of the "no" questions.
    """
    if not scene.shapes:
        raise ValueError("questions: the scene has no shapes")
    out = [(kind, question, answer) for kind, question, _, answer, _ in detail_questions(scene, rng)]
    out.append(("count", "How many shapes are there?", COUNT_WORDS[len(scene.shapes)]))
    s = rng.choice(scene.shapes)
    out.append(("position", f"Where is the {s.name}?", CELL_NAMES[s.cell]))
    present = {(s.colour, s.shape) for s in scene.shapes}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present and (allowed is None or allowed(Shape(k, c, "small", 0, 0)))]
    if rng.random() < 0.5 or not absent:
        s = rng.choice(scene.shapes)
        out.append(("yesno", f"Is there a {s.name}?", "yes"))
    else:
        colour, kind = rng.choice(absent)
        out.append(("yesno", f"Is there a {colour} {kind}?", "no"))
    s = rng.choice(scene.shapes)
    out.append(("size", f"Is the {s.name} small or large?", s.size))
    return out
