"""A connector: optional sequence pooling, a projector or resampler, optional boundary vectors."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConnectorConfig
from .projector import build_projector
from .qformer import QFormerResampler


class Connector(nn.Module):
    """``(n, tokens, encoder_dim) -> (n, tokens', llm_dim)``.

    ``pool_stride`` average-pools along the token axis first (Qwen-Audio: 2); ``boundary_tokens``
    wraps every item in learned begin/end vectors (Qwen-Audio's audio BOS/EOS), so the item takes
    two more positions.
    """

    def __init__(self, cfg: ConnectorConfig, encoder_dim: int, llm_dim: int):
        super().__init__()
        if cfg.pool_stride < 1:
            raise ValueError(f"connector pool_stride must be >= 1, got {cfg.pool_stride}")
        self.pool_stride = cfg.pool_stride
        self.input_norm = nn.LayerNorm(encoder_dim) if cfg.input_norm else None
        if cfg.kind == "qformer":
            self.core = QFormerResampler(
                encoder_dim,
                llm_dim,
                num_queries=cfg.num_queries,
                width=cfg.hidden_size,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                cross_attention_every=cfg.cross_attention_every,
            )
        else:
            self.core = build_projector(cfg.kind, encoder_dim, llm_dim)
        self.boundary = nn.Parameter(torch.randn(2, llm_dim) * 0.02) if cfg.boundary_tokens else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.pool_stride > 1:
            if features.shape[1] < self.pool_stride:
                raise ValueError(f"connector: {features.shape[1]} tokens is fewer than pool_stride {self.pool_stride}")
            features = nn.functional.avg_pool1d(features.transpose(1, 2), self.pool_stride, self.pool_stride).transpose(1, 2)
        out = self.core(features)
        if self.boundary is not None:
            n = out.shape[0]
            begin = self.boundary[0].expand(n, 1, -1).to(out.dtype)
            end = self.boundary[1].expand(n, 1, -1).to(out.dtype)
            out = torch.cat([begin, out, end], dim=1)
        return out
