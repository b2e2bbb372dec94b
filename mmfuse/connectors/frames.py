"""Learned frame (temporal position) embeddings for video features.

A video item's features are ``frames * tokens`` vectors in frame-major order; a learned embedding per
frame index is added to every token of that frame, so a resampler after it can tell the frames apart
(attention is invariant to the order of its keys). Flamingo's perceiver and Video-LLaMA's video
Q-Former both do this; each owns a ``(max_frames, dim)`` parameter made by :func:`frame_embeddings`.
"""

from __future__ import annotations

import torch
from torch import nn


def frame_embeddings(max_frames: int, dim: int) -> nn.Parameter | None:
    """``(max_frames, dim)`` unit-variance embeddings (OpenFlamingo's init: at the scale of layer-normalised
    features, so they are not drowned out), or None when ``max_frames`` is 0."""
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 (0 = no frame embeddings), got {max_frames}")
    return nn.Parameter(torch.randn(max_frames, dim)) if max_frames else None


def add_frame_embeddings(features: torch.Tensor, embeddings: torch.Tensor | None, frames: int) -> torch.Tensor:
    """``(n, frames * tokens, dim)`` plus ``embeddings[f]`` on every token of frame ``f`` (unchanged when
    ``embeddings`` is None); ValueError when the tokens do not split into ``frames`` or there are more
    frames than embeddings."""
    n, total, dim = features.shape
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if total % frames:
        raise ValueError(f"{total} feature tokens cannot be split into {frames} frames of equal length")
    if embeddings is None:
        return features
    if frames > embeddings.shape[0]:
        raise ValueError(f"the input has {frames} frames but the frame embeddings cover {embeddings.shape[0]} frames "
                         "(raise max_frames)")
    per_frame = features.reshape(n, frames, total // frames, dim) + embeddings[:frames, None, :].to(features.dtype)
    return per_frame.reshape(n, total, dim)
