"""Settings held for the length of a block: a module's train/eval mode, torch's CPU threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch ops on one CPU thread, restoring the caller's setting after. For tiny models (probes):
    extra intra-op threads gain little and on a busy machine cost up to 10x in spin-waiting; one thread
    also makes training reproducible across machines with different core counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
