"""Real handwritten digits: scikit-learn's bundled 8x8 digits (1797 images, no download), drawn as
dark ink on the scenes' light grey background and upscaled to ``IMAGE_SIZE``."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from mmfuse.data.synth.scenes import BACKGROUND_RGB, IMAGE_SIZE

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_RGB = (30, 30, 30)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[list[Image.Image], np.ndarray]:
    """All 1797 digits as RGB ``size`` x ``size`` images and their int64 labels (N,)."""
    digits = load_digits()
    ink = digits.images[..., None] / 16.0  # (N, 8, 8, 1) in [0, 1]
    pixels = np.asarray(BACKGROUND_RGB) * (1 - ink) + np.asarray(INK_RGB) * ink
    pixels = np.rint(pixels).astype(np.uint8)
    images = [Image.fromarray(p, mode="RGB").resize((size, size), Image.Resampling.BILINEAR) for p in pixels]
    return images, digits.target.astype(np.int64)


def _word(label: int) -> str:
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9, got {label}")
    return DIGIT_WORDS[int(label)]


def caption(label: int) -> str:
    """``"a handwritten seven."``"""
    return f"a handwritten {_word(label)}."


def questions(label: int) -> list[tuple[str, str, str]]:
    """``[("digit", "What digit is this?", "seven")]``."""
    return [("digit", "What digit is this?", _word(label))]
