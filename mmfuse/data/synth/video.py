"""Short videos of one shape moving in a straight line, in the scenes' visual style.

Positions are in pixels of an ``IMAGE_SIZE`` frame and scale with the rendered size. Over a clip a
slow shape travels a quarter of the frame side and a fast one half, whatever the frame count, so
fast moves twice as far per frame; the start is drawn so the shape stays fully inside every frame.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageSequence

from mmfuse.data.synth.scenes import BACKGROUND_RGB, COLOUR_RGB, COLOURS, IMAGE_SIZE, PATCH_SIZE, SHAPES, labels_by_patch, shape_mask

DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
SPEED_WORDS = {"slow": "slowly", "fast": "fast"}
TRAVEL = {"slow": IMAGE_SIZE // 4, "fast": IMAGE_SIZE // 2}  # pixels covered over the whole clip
RADIUS = 6  # pixels at IMAGE_SIZE
MARGIN = RADIUS + 1  # the centre keeps this far from every edge, so a background border remains
_MAX_DRAWS = 1000  # random motions tried before giving up on `allowed`
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)


@dataclass
class Motion:
    """One moving shape; (start_x, start_y) is its centre in the first frame, in IMAGE_SIZE pixels."""

    shape: str
    colour: str
    direction: str
    speed: str
    start_x: int
    start_y: int

    def __post_init__(self):
        for name, value, options in (
            ("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
            ("direction", self.direction, DIRECTIONS), ("speed", self.speed, SPEEDS),
        ):
            if value not in options:
                raise ValueError(f"Motion.{name} is {value!r}; expected one of {options}")
        for x, y in (self.centre(0.0), self.centre(1.0)):
            if not (MARGIN <= x <= IMAGE_SIZE - MARGIN and MARGIN <= y <= IMAGE_SIZE - MARGIN):
                raise ValueError(f"{self} leaves the frame: its centre reaches ({x}, {y})")

    def centre(self, t: float) -> tuple[float, float]:
        """Centre at clip time ``t`` in [0, 1], in IMAGE_SIZE pixels."""
        dx, dy = _STEP[self.direction]
        travel = TRAVEL[self.speed] * t
        return self.start_x + dx * travel, self.start_y + dy * travel


def sample_motion(rng: random.Random, allowed: Callable[[Motion], bool] | None = None) -> Motion:
    """A uniformly drawn motion accepted by ``allowed``. ``allowed`` sees the Motion; a predicate
    that reads only ``.colour`` and ``.shape`` serves scenes' ``Shape`` filters too."""
    for _ in range(_MAX_DRAWS):
        shape, colour, direction, speed = rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(DIRECTIONS), rng.choice(SPEEDS)
        dx, dy = _STEP[direction]
        travel = TRAVEL[speed]
        # along the motion the start leaves room for the travel; across it any inside position works
        lo_x, hi_x = MARGIN + travel * (dx < 0), IMAGE_SIZE - MARGIN - travel * (dx > 0)
        lo_y, hi_y = MARGIN + travel * (dy < 0), IMAGE_SIZE - MARGIN - travel * (dy > 0)
        motion = Motion(shape, colour, direction, speed, rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y))
        if allowed is None or allowed(motion):
            return motion
    raise ValueError(f"sample_motion: `allowed` rejected {_MAX_DRAWS} random motions; allow more (colour, shape) pairs")


def _masks(motion: Motion, frames: int, size: int) -> list[np.ndarray]:
    """Boolean (size, size) shape mask of every frame."""
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    scale = size / IMAGE_SIZE
    centres = [motion.centre(i / (frames - 1)) for i in range(frames)]
    return [shape_mask(motion.shape, x * scale, y * scale, RADIUS * scale, size) for x, y in centres]


def render_video(motion: Motion, frames: int = 8, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """``frames`` RGB images of ``size`` x ``size`` with the shape moving from its start."""
    out = []
    for mask in _masks(motion, frames, size):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = BACKGROUND_RGB
        pixels[mask] = COLOUR_RGB[motion.colour]
        out.append(Image.fromarray(pixels, mode="RGB"))
    return out


def patch_labels(motion: Motion, frames: int = 8, size: int = IMAGE_SIZE, patch: int = PATCH_SIZE) -> dict[str, np.ndarray]:
    """Per-frame, per-patch targets like ``scenes.patch_labels``: int64 (frames, size // patch,
    size // patch) for ``"colour"`` and ``"shape"`` (0 where the shape does not touch the patch)."""
    classes = {"colour": [1 + COLOURS.index(motion.colour)], "shape": [1 + SHAPES.index(motion.shape)]}
    per_frame = [labels_by_patch(mask.astype(np.int64), classes, patch) for mask in _masks(motion, frames, size)]
    return {name: np.stack([labels[name] for labels in per_frame]) for name in classes}


def save_gif(frames: list[Image.Image], path: str | Path, frame_ms: int = 125) -> None:
    """Write ``frames`` as a looping GIF. All frames share one exact palette (no dithering), so
    videos with at most 256 distinct colours, such as the world's, round-trip losslessly."""
    if not frames:
        raise ValueError("save_gif: no frames")
    strip = np.concatenate([np.asarray(f.convert("RGB")) for f in frames], axis=0)
    palette = Image.fromarray(strip, mode="RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indexed = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    indexed[0].save(path, save_all=True, append_images=indexed[1:], duration=frame_ms, loop=0, disposal=2, optimize=False)


def load_gif(path: str | Path) -> list[Image.Image]:
    """Every frame of a GIF, as RGB images."""
    with Image.open(path) as im:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]


def caption(motion: Motion) -> str:
    """``"a red circle moves left slowly."``"""
    return f"a {motion.colour} {motion.shape} moves {motion.direction} {SPEED_WORDS[motion.speed]}."


def questions(motion: Motion, rng: random.Random) -> list[tuple[str, str, str]]:
    """One ``(kind, question, answer)`` per kind: direction, speed, colour, shape. ``rng`` picks how
    the direction and speed questions name the object ("the circle", "the red shape", "the red circle")."""
    names = (motion.shape, f"{motion.colour} shape", f"{motion.colour} {motion.shape}")
    return [
        ("direction", f"Which way does the {rng.choice(names)} move?", motion.direction),
        ("speed", f"Does the {rng.choice(names)} move slowly or fast?", SPEED_WORDS[motion.speed]),
        ("colour", f"What colour is the moving {motion.shape}?", motion.colour),
        ("shape", f"What shape is the {motion.colour} object?", motion.shape),
    ]
