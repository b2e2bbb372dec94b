"""Switching a module's train/eval mode for the length of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` inside the block; the previous mode is restored after, even on error."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
