"""Fusion strategies, one per survey type (Type-B: one per custom-layer mechanism)."""

from ..config import FusionConfig
from .adapter import AdapterPromptFusion
from .adapter_mixture import AdapterMixtureFusion
from .base import FusionStrategy
from .cross_attention import CrossAttentionFusion
from .embedding import PLACEHOLDER_IDS, EmbeddingFusion
from .expert import ModalityAdaptiveFusion, RoutedExpertFusion
from .markers import MARKER_IDS
from .moe import MoEFusion
from .tokens import TokenFusion

STRATEGIES = {"A": CrossAttentionFusion, "C": EmbeddingFusion, "D": TokenFusion}
TYPE_B_MECHANISMS = {"adapter_prompts": AdapterPromptFusion, "visual_expert": RoutedExpertFusion,
                     "modality_adaptive": ModalityAdaptiveFusion, "moe": MoEFusion,
                     "adapter_mixture": AdapterMixtureFusion}


def build_fusion(cfg: FusionConfig) -> FusionStrategy:
    """The strategy for ``cfg.type``; Type-B picks its mechanism with ``options.mechanism``."""
    options = dict(cfg.options)
    if cfg.type == "B":
        mechanism = options.pop("mechanism", None)
        if mechanism not in TYPE_B_MECHANISMS:
            raise ValueError(f"fusion.type 'B' needs options.mechanism, one of {sorted(TYPE_B_MECHANISMS)}; got {mechanism!r}")
        return TYPE_B_MECHANISMS[mechanism](**options)
    if cfg.type not in STRATEGIES:
        raise ValueError(f"fusion.type {cfg.type!r} is not available; available: {sorted([*STRATEGIES, 'B'])}")
    return STRATEGIES[cfg.type](**cfg.options)


__all__ = ["MARKER_IDS", "PLACEHOLDER_IDS", "STRATEGIES", "TYPE_B_MECHANISMS", "AdapterMixtureFusion", "AdapterPromptFusion", "CrossAttentionFusion",
           "EmbeddingFusion", "FusionStrategy", "ModalityAdaptiveFusion", "MoEFusion", "RoutedExpertFusion", "TokenFusion",
           "build_fusion"]
