"""Transformer mapping network in the ClipCap style (ClipCap, Pengi).

The encoder features are projected to the output width, ``prefix_length`` learned constant vectors
are appended after them, and ``depth`` pre-norm Transformer encoder layers run over the whole
sequence; the outputs at the constants' positions are the prefix. Whatever the number of input
features, each item becomes ``prefix_length`` vectors. ClipCap and Pengi map one pooled embedding,
first expanded by a linear layer into ``clip_length`` vectors; here every input feature is projected
on its own, so a sequence of frames (or one pooled vector, ``T = 1``) maps alike.
"""

from __future__ import annotations

import torch
from torch import nn


class MappingNetwork(nn.Module):
    """``(n, T, feature_dim) -> (n, prefix_length, out_dim)``.

    Works in the output width ``out_dim`` (ClipCap: the LM's), which ``num_heads`` must divide; the
    layers are ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)`` with ClipCap's 2x ReLU
    FFN, no dropout and no final norm. The constants start at unit variance, as ClipCap's ``prefix_const``.
    """

    def __init__(self, feature_dim: int, out_dim: int, *, prefix_length: int = 10, depth: int = 4, num_heads: int = 8):
        super().__init__()
        if prefix_length < 1 or depth < 1 or num_heads < 1:
            raise ValueError(f"mapper: prefix_length, depth and num_heads must be at least 1, got {prefix_length}, {depth}, {num_heads}")
        if out_dim % num_heads:
            raise ValueError(f"mapper: the output width {out_dim} is not divisible by num_heads {num_heads}")
        self.proj = nn.Linear(feature_dim, out_dim)
        self.prefix = nn.Parameter(torch.randn(prefix_length, out_dim))
        layer = nn.TransformerEncoderLayer(out_dim, num_heads, dim_feedforward=2 * out_dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features ``(n, T, feature_dim)`` -> ``(n, prefix_length, out_dim)``."""
        x = self.proj(features)
        prefix = self.prefix.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([x, prefix], dim=1))[:, x.shape[1]:]
