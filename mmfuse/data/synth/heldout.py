"""The attribute combinations the world keeps out of every training set.

Images and videos never show a held-out (colour, shape) pair, and sound clips never play a held-out
(kind, pitch) pair, in anything a model trains on: the train / val / test splits, the text corpus and
the world backbones. The ``heldout`` split is made only of items that contain at least one, so it
measures compositional generalisation. This module is the single place that defines them.
"""

from __future__ import annotations

import random
from typing import Callable, TypeVar

HELDOUT_SHAPES = (("green", "triangle"), ("purple", "circle"), ("yellow", "square"))  # (colour, shape)
HELDOUT_SOUNDS = (("chirp", "high"), ("noise", "low"))  # (kind, pitch)
MAX_TRIES = 1000

T = TypeVar("T")


def shape_is_heldout(shape) -> bool:
    """True for a scene :class:`Shape` (or a video's moving object) of a held-out (colour, shape)."""
    return (shape.colour, shape.shape) in HELDOUT_SHAPES


def shape_allowed(shape) -> bool:
    """The ``allowed`` filter for training images and videos."""
    return not shape_is_heldout(shape)


def event_is_heldout(event) -> bool:
    """True for a sound :class:`Event` of a held-out (kind, pitch)."""
    return (event.kind, event.pitch) in HELDOUT_SOUNDS


def event_allowed(event) -> bool:
    """The ``allowed`` filter for training sound clips."""
    return not event_is_heldout(event)


def scene_is_heldout(scene) -> bool:
    """True when any shape of the scene is held out."""
    return any(shape_is_heldout(s) for s in scene.shapes)


def clip_is_heldout(clip) -> bool:
    """True when any event of the sound clip is held out."""
    return any(event_is_heldout(e) for e in clip.events)


def sample_heldout(sample: Callable[[random.Random], T], is_heldout: Callable[[T], bool], rng: random.Random) -> T:
    """Draw ``sample(rng)`` until ``is_heldout`` accepts it (rejection sampling, seeded by ``rng``)."""
    for _ in range(MAX_TRIES):
        item = sample(rng)
        if is_heldout(item):
            return item
    raise RuntimeError(f"no held-out item in {MAX_TRIES} draws; is the held-out set reachable by the sampler?")
