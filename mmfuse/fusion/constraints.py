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

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids ``(B, t)`` so far, scores ``(B, V)`` -> scores with forbidden ids at ``-inf``."""
        batch, length = input_ids.shape
        outside = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        for modality, vocab in self.vocabularies.items():
            outside[vocab.begin + (modality in self.outputs): vocab.begin + vocab.size] = True
        if "text" not in self.outputs:  # media only: nothing but the end of the reply between spans
            outside[: min(v.begin for v in self.vocabularies.values())] = True
            outside[self.stop_ids] = False
        forbidden = outside.expand(batch, -1).clone()
        position = torch.arange(length, device=input_ids.device)
        for modality, vocab in self.vocabularies.items():
            last_begin = torch.where(input_ids == vocab.begin, position, -1).amax(dim=1)
            last_end = torch.where(input_ids == vocab.end, position, -1).amax(dim=1)
            done = (length - 1 - last_begin).tolist()
            for row in ((last_begin >= 0) & (last_begin > last_end)).nonzero().flatten().tolist():
                forbidden[row] = True
                if done[row] < self.lengths[modality]:
                    lo, hi = vocab.allowed(done[row])
                    forbidden[row, lo:hi] = False
                else:
                    forbidden[row, vocab.end] = False
        return scores.masked_fill(forbidden, float("-inf"))


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
