"""A Type-B or Type-C strategy with a Type-A branch: CogAgent (CogVLM's visual expert plus cross-attention
to high-resolution image features) and MM-Interleaved (image tokens in the sequence plus cross-attention
from the LLM's layers to the image encoder's features).

The main strategy lays the media out and conditions the LLM as it does alone. The branch is a set of
gated cross-attention blocks (:class:`~mmfuse.fusion.CrossAttentionFusion`'s) before chosen decoder
layers; their keys and values come from each item's encoder features, before the connector, so the
sequence can carry a few compressed tokens while the blocks read every patch. A token attends to the
items whose layout starts at or before it (``media_attention`` as in Type-A: the nearest item, or every
earlier one); an item starts at the first token of the main strategy's layout (CogVLM's begin-of-image),
so the item's own tokens read it too. The gates start at 0: at initialisation the model is the main
strategy's model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .base import FusionStrategy
from .cross_attention import CrossAttentionFusion
from .markers import run_starts


class WithCrossAttention(FusionStrategy):
    """``main`` (a Type-B or Type-C strategy) plus ``cross_attention``'s blocks reading the encoders'
    features; ``feature_dims``: modality -> its encoder's width."""

    reads_features = True

    def __init__(self, main: FusionStrategy, cross_attention: CrossAttentionFusion, feature_dims: dict[str, int]):
        super().__init__()
        if main.survey_type not in ("B", "C"):
            raise ValueError(f"fusion.cross_attention: the main strategy must be Type-B or Type-C, got Type-{main.survey_type}")
        self.main, self.cross_attention = main, cross_attention
        self.feature_dims = dict(feature_dims)
        self.survey_type = main.survey_type
        self.output_modalities = main.output_modalities

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        return self.main.layout(modality, num_tokens)

    def connector_width(self, encoder_dim: int, llm_dim: int) -> int:
        return self.main.connector_width(encoder_dim, llm_dim)

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        self.main.attach(llm, media_dims)
        self.cross_attention.attach_blocks(llm, {m: self.feature_dims[m] for m in media_dims})

    def item_starts(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """modality -> ``(B, L)`` bool: the first position of each of its items (where a run of the
        first token of its layout begins)."""
        starts = {}
        for modality in self.feature_dims:
            starts[modality] = run_starts(input_ids == self.main.layout(modality, 1)[0])
        return starts

    def llm_inputs(self, llm, input_ids, media, features=None, written=None):
        """The main strategy's inputs plus ``"media_context"``, the blocks' keys and values from
        ``features`` (modality -> encoder outputs ``(items, tokens, feature_dim)``, items in layout order)."""
        inputs = self.main.llm_inputs(llm, input_ids, media)
        features = {m: f for m, f in (features or {}).items() if m in self.feature_dims}
        inputs["media_context"] = self.cross_attention.media_context(input_ids, features, self.item_starts(input_ids))
        return inputs

    def labels(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.main.labels(labels, inputs)

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self.main.auxiliary_loss()

    @contextlib.contextmanager
    def generation_inputs(self, inputs: dict) -> Iterator[dict]:
        """Both strategies' contexts held for the call (see :meth:`FusionStrategy.generation_inputs`)."""
        with self.main.generation_inputs(inputs) as main_inputs, self.cross_attention.generation_inputs(main_inputs) as both:
            yield both
