"""The fusion-strategy interface: the only place the survey type changes the code path.

A strategy answers three questions (see DESIGN.md):
1. layout: what one media item becomes in the token stream;
2. attachment: what it adds to or wraps inside the LLM (``attach``), and which parameters are its own;
3. conditioning: how media features reach the LLM in one forward call (``llm_inputs``), which
   ``generate()`` reuses with the LLM's KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class FusionStrategy(nn.Module):
    survey_type: str = ""
    output_modalities: tuple[str, ...] = ("text",)  # what the model can generate
    labels_media: bool = False  # whether the processor labels media positions inside learned spans (Type-D)
    reads_features: bool = False  # whether llm_inputs also takes the codecs' continuous features (Type-D, LaVIT)
    writes_features: bool = False  # whether a written media item is regressed as features, not chosen as codes (Type-D, VL-GPT)
    # the llm_inputs key that Hugging Face ``generate`` rejects (it takes no unknown keywords): held in
    # ``_generation_context`` for the duration of the call instead, where the strategy's hooks read it
    context_key: str | None = None
    _generation_context = None

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        """Token ids standing for one ``modality`` item whose connector yields ``num_tokens`` vectors."""
        raise NotImplementedError

    def connector_width(self, encoder_dim: int, llm_dim: int) -> int:
        """The width a modality's connector outputs (here the LLM's: media become input embeddings)."""
        return llm_dim

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        """Add or wrap modules inside ``llm``; called once when the model is built.

        ``media_dims``: modality -> width of its connector's output."""
        raise NotImplementedError

    def llm_inputs(
        self, llm: nn.Module, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``llm(...)`` / ``llm.generate(...)`` that carry the media.

        input_ids: ``(B, L)`` from the processor's layout; media: modality -> ``(items, tokens, width)``
        connector outputs (``width`` from :meth:`connector_width`), items in the order their markers appear in the batch (row-major).
        """
        raise NotImplementedError

    def call_context(self, kwargs: dict):
        """The per-call context a hook reads: popped from the forward's ``kwargs`` under
        :attr:`context_key` (so the LLM's own modules never see it), else the one held for ``generate``."""
        context = kwargs.pop(self.context_key, None)
        return context if context is not None else self._generation_context

    def labels(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The LM labels for ``inputs`` (Type-D fills in the media codes it learns); unchanged here."""
        return labels

    def added_vocabulary(self) -> range:
        """Vocabulary ids the strategy added to the LLM (Type-D's media codes); none here."""
        return range(0)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss term of the last forward that the model adds to the LM loss (an MoE router's balance
        loss), or None."""
        return None

    @contextlib.contextmanager
    def generation_inputs(self, inputs: dict) -> Iterator[dict]:
        """The keyword arguments for ``llm.generate`` made from ``llm_inputs``'s: all but
        :attr:`context_key`, which is set as ``_generation_context`` until the call returns."""
        if self.context_key is None:
            yield inputs
            return
        inputs = dict(inputs)
        self._generation_context = inputs.pop(self.context_key)
        try:
            yield inputs
        finally:
            self._generation_context = None
