"""CogCoM's chain of manipulations (Qi et al. 2024), the two it needs for detail questions: grounding,
then crop-and-zoom.

A chain is a two-turn conversation. The question ends with :data:`CHAIN_REQUEST`, so a model trained on
chains and on plain answers to the same questions knows which is asked for. The model's first reply
names the manipulations and the box that grounding found, in CogVLM's box format (corners scaled to
0-999, three digits each)::

    grounding(the square) -> [[333,000,666,333]]; crop_and_zoom([[333,000,666,333]])

The runtime then executes ``crop_and_zoom``: it crops the box out of the image the question is about
and zooms the crop back to that image's size (:func:`crop_and_zoom`). The zoomed crop comes back as
the next user turn, ``<image>``, and the model's second reply is the answer. The world writes such
chains (``chain_qa``) and the evaluation runs the same loop on the model's own boxes
(:func:`mmfuse.eval.tasks.chain_scores`).
"""

from __future__ import annotations

import re

from PIL import Image

CHAIN_REQUEST = "Ground it, then zoom in."  # ends a question to be answered through a chain
BOX_SCALE = 1000  # CogVLM's box coordinates: 0..999 of the image's width and height
_BOX_RE = re.compile(r"\[\[(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\]\]")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in 0..BOX_SCALE - 1


def box_from_pixels(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """A pixel box (clipped to the image) in CogVLM's 0-999 coordinates."""
    def scale(v: float, side: int) -> int:
        return min(BOX_SCALE - 1, max(0, round(v / side * BOX_SCALE)))

    return scale(x0, width), scale(y0, height), scale(x1, width), scale(y1, height)


def format_box(box: Box) -> str:
    """``[[x0,y0,x1,y1]]`` with three digits per corner."""
    return "[[" + ",".join(f"{v:03d}" for v in box) + "]]"


def parse_box(text: str) -> Box | None:
    """The first well-formed box in ``text`` (x0 < x1 and y0 < y1), or None."""
    for match in _BOX_RE.finditer(text):
        x0, y0, x1, y1 = (int(v) for v in match.groups())
        if x0 < x1 and y0 < y1:
            return x0, y0, x1, y1
    return None


def grounding_step(target: str, box: Box) -> str:
    """The first reply of a chain: grounding ``target`` (a noun phrase) to ``box``, then crop-and-zoom."""
    return f"grounding({target}) -> {format_box(box)}; crop_and_zoom({format_box(box)})"


def crop_and_zoom(image: Image.Image, box: Box) -> Image.Image:
    """``box`` cut out of ``image`` and resized to ``image``'s size (bilinear)."""
    w, h = image.size
    x0, y0, x1, y1 = box
    left, top = x0 * w // BOX_SCALE, y0 * h // BOX_SCALE
    right, bottom = max(left + 1, -(-x1 * w // BOX_SCALE)), max(top + 1, -(-y1 * h // BOX_SCALE))
    return image.crop((left, top, right, bottom)).resize((w, h), Image.Resampling.BILINEAR)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0
