"""Sliding-window connector in the Audio Flamingo style.

Audio Flamingo (Kong et al. 2024) cuts the audio into sliding windows, takes ONE embedding per
window, and runs a small Transformer encoder over the window embeddings ("audio representation
transformation": 3 layers, 8 heads) before gated cross-attention reads them. Here the windows are
taken over the time axis of the audio encoder's frame features: ``window`` frames per window,
``hop`` frames between window starts, so ``num_windows = 1 + (frames - window) // hop`` (trailing
frames that do not fill a whole window are dropped). Each window's embedding is the mean of its
frames; a learned embedding per window index (``max_windows`` of them) tells the windows apart;
``depth`` pre-norm Transformer encoder layers, a final LayerNorm and a linear projection to the LLM
width follow.
"""

from __future__ import annotations

import torch
from torch import nn


class SlidingWindowTransformer(nn.Module):
    """``(n, frames, feature_dim) -> (n, num_windows, out_dim)``, ``num_windows = 1 + (frames - window) // hop``.

    Works in the encoder width ``feature_dim`` (which ``num_heads`` must divide); the layers are
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)`` with a 4x GELU FFN and no
    dropout. ``depth`` 0 leaves only the window means + position embeddings, the final LayerNorm and
    the projection.
    """

    def __init__(
        self,
        feature_dim: int,
        out_dim: int,
        *,
        window: int,
        hop: int,
        depth: int = 3,
        num_heads: int = 8,
        max_windows: int = 64,
    ):
        super().__init__()
        if window < 1 or hop < 1:
            raise ValueError(f"windows: window and hop must be at least 1, got window {window}, hop {hop}")
        if depth < 0 or num_heads < 1 or max_windows < 1:
            raise ValueError(
                f"windows: depth must be >= 0 and num_heads, max_windows >= 1, got {depth}, {num_heads}, {max_windows}"
            )
        if feature_dim % num_heads:
            raise ValueError(f"windows: feature_dim {feature_dim} is not divisible by num_heads {num_heads}")
        self.window, self.hop, self.max_windows = window, hop, max_windows
        self.position_embeddings = nn.Parameter(torch.randn(max_windows, feature_dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                feature_dim,
                num_heads,
                dim_feedforward=4 * feature_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(feature_dim)
        # none when the output stays at the encoder width (Type-A: OpenFlamingo's resampler has no projection)
        self.proj = nn.Linear(feature_dim, out_dim) if out_dim != feature_dim else nn.Identity()

    def num_windows(self, frames: int) -> int:
        """Windows for ``frames`` input frames; ValueError when shorter than one window or too many."""
        if frames < self.window:
            raise ValueError(f"windows: {frames} frames is fewer than one window of {self.window} frames")
        count = 1 + (frames - self.window) // self.hop
        if count > self.max_windows:
            raise ValueError(
                f"windows: {frames} frames give {count} windows (window {self.window}, hop {self.hop}) but the "
                f"position embeddings cover {self.max_windows} windows (raise max_windows or hop)"
            )
        return count

    def window_means(self, features: torch.Tensor) -> torch.Tensor:
        """features ``(n, frames, feature_dim)`` -> ``(n, num_windows, feature_dim)``, each the mean of its frames."""
        self.num_windows(features.shape[1])
        # unfold: (n, num_windows, feature_dim, window)
        return features.unfold(1, self.window, self.hop).mean(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features ``(n, frames, feature_dim)`` -> ``(n, num_windows, out_dim)``."""
        x = self.window_means(features)
        x = x + self.position_embeddings[: x.shape[1]].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.out_norm(x))
