"""Type-D decoding: which tokens may come next, and how a generated sequence splits into text and media.

Chameleon's inference code steers modalities with logits processors (allow only image tokens inside
an image, disallow them elsewhere); :class:`MediaSpans` is that rule as one transformers
``LogitsProcessor``, so it composes with sampling, beam search and classifier-free guidance.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .tokens import ModalityVocabulary


class MediaSpans(LogitsProcessor):
    """Inside a span (after a modality's begin token): only the codes of the codebook each position
    needs, for exactly ``lengths[m]`` tokens, then only the end token. Outside: no code or end token,
    and no begin token of a modality missing from ``outputs``.

    vocabularies: modality -> id layout; lengths: modality -> codes per span; outputs: the modalities the
    reply may hold ("text" among them allows text tokens outside spans; without it only ``stop_ids``,
    the tokens that end the reply, may stand between spans)."""

    def __init__(self, vocabularies: dict[str, ModalityVocabulary], lengths: dict[str, int], outputs: tuple[str, ...],
                 stop_ids: list[int]):
        self.vocabularies = vocabularies
        self.lengths = lengths
        self.outputs = tuple(outputs)
        self.stop_ids = list(stop_ids)

    def _outside(self, size: int, device: torch.device) -> torch.Tensor:
        """The ``(V,)`` mask of ids forbidden outside any span; built once per vocabulary size and device."""
        key = (size, device)
        cached = getattr(self, "_outside_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        outside = torch.zeros(size, dtype=torch.bool, device=device)
        for modality, vocab in self.vocabularies.items():
            outside[vocab.begin + (modality in self.outputs): vocab.begin + vocab.size] = True
        if "text" not in self.outputs:  # media only: nothing but the end of the reply between spans
            outside[: min(v.begin for v in self.vocabularies.values())] = True
            outside[self.stop_ids] = False
        self._outside_cache = (key, outside)
        return outside

    def open_spans(self, input_ids: torch.Tensor) -> list[tuple[str, ModalityVocabulary, torch.Tensor, torch.Tensor]]:
        """Per modality: ``(modality, vocab, last_begin (B,), rows inside one of its spans (B,) bool)``."""
        position = torch.arange(input_ids.shape[1], device=input_ids.device)
        out = []
        for modality, vocab in self.vocabularies.items():
            last_begin = torch.where(input_ids == vocab.begin, position, -1).amax(dim=1)
            last_end = torch.where(input_ids == vocab.end, position, -1).amax(dim=1)
            out.append((modality, vocab, last_begin, last_begin > last_end))
        return out

    def static(self, input_ids: torch.Tensor, vocab_size: int) -> "BannedIds | None":
        """For a text-only reply whose prompt ends outside every span: the equivalent constant mask (no
        span can open, so every step forbids the same ids), else None."""
        if self.outputs != ("text",) or any(bool(rows.any()) for *_, rows in self.open_spans(input_ids)):
            return None
        return BannedIds(self._outside(vocab_size, input_ids.device))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids ``(B, t)`` so far, scores ``(B, V)`` -> scores with forbidden ids at ``-inf``."""
        batch, length = input_ids.shape
        outside = self._outside(scores.shape[-1], scores.device)
        open_spans = self.open_spans(input_ids)
        inside = open_spans[0][3]
        for *_, rows in open_spans[1:]:
            inside = inside | rows
        if not bool(inside.any()):  # the common case outside media: one broadcast mask, no per-row work
            return scores.masked_fill(outside, float("-inf"))
        forbidden = outside.expand(batch, -1).clone()
        for modality, vocab, last_begin, rows in open_spans:
            done = (length - 1 - last_begin).tolist()
            for row in rows.nonzero().flatten().tolist():
                forbidden[row] = True
                if done[row] < self.lengths[modality]:
                    lo, hi = vocab.allowed(done[row])
                    forbidden[row, lo:hi] = False
                else:
                    forbidden[row, vocab.end] = False
        return scores.masked_fill(forbidden, float("-inf"))


class BannedIds(LogitsProcessor):
    """The same ids forbidden at every step: ``scores`` with ``mask`` ``(V,)`` at ``-inf``."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.masked_fill(self.mask, float("-inf"))


def split_media_spans(ids: torch.Tensor, vocabularies: dict[str, ModalityVocabulary]):
    """One generated row ``(n,)`` -> ``(pieces, media)``: ``pieces`` alternate text id tensors and
    ``(modality,)`` tuples where a complete span was; ``media`` lists ``(modality, code ids)`` per span.
    A span with no end token (generation stopped inside it) is dropped."""
    begins = {v.begin: v for v in vocabularies.values()}
    pieces, media, start, i = [], [], 0, 0
    values = ids.tolist()
    while i < len(values):
        vocab = begins.get(values[i])
        if vocab is None:
            i += 1
            continue
        pieces.append(ids[start:i])
        close = next((j for j in range(i + 1, len(values)) if values[j] == vocab.end), None)
        if close is None:
            return pieces, media
        pieces.append((vocab.modality,))
        media.append((vocab.modality, ids[i + 1:close]))
        start = i = close + 1
    pieces.append(ids[start:])
    return pieces, media
