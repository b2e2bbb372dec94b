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
from .with_cross_attention import WithCrossAttention

STRATEGIES = {"A": CrossAttentionFusion, "C": EmbeddingFusion, "D": TokenFusion}
TYPE_B_MECHANISMS = {"adapter_prompts": AdapterPromptFusion, "visual_expert": RoutedExpertFusion,
                     "modality_adaptive": ModalityAdaptiveFusion, "moe": MoEFusion,
                     "adapter_mixture": AdapterMixtureFusion}


def build_fusion(cfg: FusionConfig, encoder_dims: dict[str, int] | None = None) -> FusionStrategy:
    """The strategy for ``cfg.type``; Type-B picks its mechanism with ``options.mechanism``; with
    ``cfg.cross_attention``, wrapped with a Type-A branch over the encoders' features (``encoder_dims``:
    modality -> encoder width)."""
    options = dict(cfg.options)
    if cfg.type == "B":
        mechanism = options.pop("mechanism", None)
        if mechanism not in TYPE_B_MECHANISMS:
            raise ValueError(f"fusion.type 'B' needs options.mechanism, one of {sorted(TYPE_B_MECHANISMS)}; got {mechanism!r}")
        strategy = TYPE_B_MECHANISMS[mechanism](**options)
    elif cfg.type not in STRATEGIES:
        raise ValueError(f"fusion.type {cfg.type!r} is not available; available: {sorted([*STRATEGIES, 'B'])}")
    else:
        strategy = STRATEGIES[cfg.type](**options)
    if cfg.cross_attention is None:
        return strategy
    if not encoder_dims:
        raise ValueError("fusion.cross_attention reads media encoders' features; the model has no encoder")
    return WithCrossAttention(strategy, CrossAttentionFusion(**cfg.cross_attention), encoder_dims)


__all__ = ["MARKER_IDS", "PLACEHOLDER_IDS", "STRATEGIES", "TYPE_B_MECHANISMS", "AdapterMixtureFusion", "AdapterPromptFusion", "CrossAttentionFusion",
           "EmbeddingFusion", "FusionStrategy", "ModalityAdaptiveFusion", "MoEFusion", "RoutedExpertFusion", "TokenFusion",
           "WithCrossAttention", "build_fusion"]
