"""Collate processed samples into a padded batch."""

from __future__ import annotations

import torch

from .badsamples import Skipped
from .processor import IGNORE_INDEX, Encoded


class Collator:
    """``list[Encoded | Skipped] -> batch dict``.

    Batch: ``input_ids``/``attention_mask``/``labels`` ``(B, L)``, ``media`` modality -> ``(items, ...)``
    with items in batch order, ``ids`` the sample ids, ``skipped`` the :class:`Skipped` records of the
    samples the processor skipped, which are left out (a batch of skipped samples only has ``B = 0``).
    The records travel with the batch so that the main process counts what loader workers skipped.
    ``padding_side="left"`` for batched generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: list[Encoded | Skipped]) -> dict:
        if not features:
            raise ValueError("collate: the batch is empty")
        skipped = [f for f in features if isinstance(f, Skipped)]
        features = [f for f in features if not isinstance(f, Skipped)]
        length = max((len(f.input_ids) for f in features), default=0)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f.input_ids)
            cols = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(f.input_ids)
            labels[row, cols] = torch.tensor(f.labels)
            attention_mask[row, cols] = 1
        media: dict[str, torch.Tensor] = {}
        for modality in sorted({m for f in features for m in f.media}):
            items = [f.media[modality] for f in features if modality in f.media]
            shapes = {tuple(t.shape[1:]) for t in items}
            if len(shapes) > 1:
                ids = [f.id for f in features if modality in f.media]
                raise ValueError(f"collate: {modality} inputs of samples {ids} have different shapes {sorted(shapes)}")
            media[modality] = torch.cat(items)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "media": media,
            "ids": [f.id for f in features],
            "skipped": skipped,
        }
