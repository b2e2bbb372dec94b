"""Fusion strategies, one per survey type."""

from ..config import FusionConfig
from .base import FusionStrategy
from .cross_attention import MARKER_IDS, CrossAttentionFusion
from .embedding import PLACEHOLDER_IDS, EmbeddingFusion

STRATEGIES = {"A": CrossAttentionFusion, "C": EmbeddingFusion}


def build_fusion(cfg: FusionConfig) -> FusionStrategy:
    if cfg.type not in STRATEGIES:
        raise ValueError(f"fusion.type {cfg.type!r} is not available; available: {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.type](**cfg.options)


__all__ = ["MARKER_IDS", "PLACEHOLDER_IDS", "STRATEGIES", "CrossAttentionFusion", "EmbeddingFusion", "FusionStrategy",
           "build_fusion"]
