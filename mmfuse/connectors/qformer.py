"""Learned-query resampler in the BLIP-2 Q-Former style.

A fixed set of learned queries (BLIP-2: 32) runs through transformer blocks of self-attention among
the queries, cross-attention to the encoder features (BLIP-2 inserts it in every other block) and an
FFN; the outputs are projected to the LLM width. Whatever the number of input features, each item
becomes ``num_queries`` tokens.

``max_frames`` adds Video-LLaMA's temporal position embeddings: a learned vector per frame index on
the features of each video frame (:mod:`.frames`). ``positions_2d`` adds Qwen-VL's 2-D absolute positions: fixed sin-cos encodings of a square grid,
added to the queries (laid out on their own grid) and to the features on the query and key side of
every cross-attention, not to the values, so the queries can find *where* a feature is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .frames import add_frame_embeddings, frame_embeddings


def sincos_2d(tokens: int, dim: int) -> torch.Tensor:
    """``(tokens, dim)`` fixed 2-D sin-cos positions of a ``side x side`` grid in row-major order (MAE's):
    the first half of the channels encodes the row, the second the column."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"2-D positions need a square grid of tokens, got {tokens}")
    if dim % 4:
        raise ValueError(f"2-D positions need a width divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * frequencies  # (tokens, dim / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


def add_positions_2d(features: torch.Tensor, frames: int, owner: str) -> torch.Tensor:
    """``(n, frames * tokens, dim)`` frame-major features plus each frame's :func:`sincos_2d` grid;
    a grid that is not square is an error naming ``owner``."""
    try:
        grid = sincos_2d(features.shape[1] // frames, features.shape[2])
    except ValueError as err:
        raise ValueError(f"{owner} positions_2d: {err}") from err
    return features + grid.to(features).repeat(frames, 1)


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

    def forward(self, queries: torch.Tensor, features: torch.Tensor, query_pos: torch.Tensor | None = None,
                feature_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``query_pos`` / ``feature_pos``: positions added on the query and key side of the cross-attention."""
        h = self.self_norm(queries)
        queries = queries + self.self_attn(h, h, h, need_weights=False)[0]
        if self.cross_attn is not None:
            h = self.cross_norm(queries)
            q = h if query_pos is None else h + query_pos.to(h.dtype)
            k = features if feature_pos is None else features + feature_pos.to(features.dtype)
            queries = queries + self.cross_attn(q, k, features, need_weights=False)[0]
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
        positions_2d: bool = False,
        max_frames: int = 0,
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
        self.frame_embeddings = frame_embeddings(max_frames, feature_dim)
        self.register_buffer("query_pos", sincos_2d(num_queries, width) if positions_2d else None, persistent=False)

    def forward(self, features: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """features ``(n, frames * tokens, feature_dim)`` (frame-major for video) -> ``(n, num_queries, out_dim)``."""
        try:
            features = add_frame_embeddings(self.feature_norm(features), self.frame_embeddings, frames)
        except ValueError as err:
            raise ValueError(f"qformer: {err}") from err
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        feature_pos = None
        if self.query_pos is not None:
            feature_pos = sincos_2d(features.shape[1], features.shape[2]).to(features)
        for block in self.blocks:
            queries = block(queries, features, self.query_pos, feature_pos)
        return self.proj(self.out_norm(queries))
