"""Learned-query resampler in the BLIP-2 Q-Former style.

A fixed set of learned queries (BLIP-2: 32) runs through transformer blocks of self-attention among
the queries, cross-attention to the encoder features (BLIP-2 inserts it in every other block) and an
FFN; the outputs are projected to the LLM width. Whatever the number of input features, each item
becomes ``num_queries`` tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class QFormerBlock(nn.Module):
    """Pre-norm block: self-attn over queries, optional cross-attn to features, FFN."""

    def __init__(self, width: int, feature_dim: int, num_heads: int, cross_attention: bool):
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.cross_attn = None
        if cross_attention:
            self.cross_norm = nn.LayerNorm(width)
            self.cross_attn = nn.MultiheadAttention(width, num_heads, kdim=feature_dim, vdim=feature_dim, batch_first=True)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(queries)
        queries = queries + self.self_attn(h, h, h, need_weights=False)[0]
        if self.cross_attn is not None:
            h = self.cross_norm(queries)
            queries = queries + self.cross_attn(h, features, features, need_weights=False)[0]
        return queries + self.ffn(self.ffn_norm(queries))


class QFormerResampler(nn.Module):
    """``(n, tokens, feature_dim) -> (n, num_queries, out_dim)``."""

    def __init__(
        self,
        feature_dim: int,
        out_dim: int,
        *,
        num_queries: int = 32,
        width: int | None = None,
        depth: int = 2,
        num_heads: int = 4,
        cross_attention_every: int = 2,
    ):
        super().__init__()
        width = width or feature_dim
        if width % num_heads:
            raise ValueError(f"qformer: width {width} is not divisible by num_heads {num_heads}")
        if cross_attention_every < 1:
            raise ValueError("qformer: cross_attention_every must be at least 1")
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.blocks = nn.ModuleList(
            QFormerBlock(width, feature_dim, num_heads, cross_attention=(i % cross_attention_every == 0))
            for i in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.feature_norm(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, features)
        return self.proj(self.out_norm(queries))
