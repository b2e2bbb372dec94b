"""Media markers: one position per media item in the token stream (Flamingo's ``<image>`` token).

Fusion strategies that read media from inside the LLM (Type-A cross-attention, Type-B adapter
prompts) keep the media out of the sequence; each item leaves a single marker position whose
embedding is learned, which also tells which row and place an item belongs to.
"""

from __future__ import annotations

import torch
from torch import nn

# Sentinel ids for marker positions: never looked up in the embedding table.
MARKER_IDS = {"image": -300, "audio": -301, "video": -302}


class MediaMarkers(nn.Module):
    """One learned ``(d,)`` embedding per modality, for the modalities the model has, written at the
    positions of that modality's sentinel id in ``ids`` (media markers by default; CogVLM's
    begin/end-of-image vectors use their own ids)."""

    def __init__(self, modalities: list[str], dim: int = 0, std: float = 0.02, ids: dict[str, int] = MARKER_IDS):
        super().__init__()
        unknown = sorted(set(modalities) - set(ids))
        if unknown:
            raise ValueError(f"no sentinel id for modalities {unknown}; known: {sorted(ids)}")
        self.ids = ids
        self.embeddings = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * std) for m in modalities})

    def masks(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """modality -> ``(B, L)`` bool, where its sentinel ids are."""
        return {m: input_ids == self.ids[m] for m in self.embeddings}

    def place(self, embeds: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, L, d)`` embeddings with each modality's vector written where its mask is True."""
        for modality, mask in masks.items():
            embeds = torch.where(mask.unsqueeze(-1), self.embeddings[modality].to(embeds.dtype), embeds)
        return embeds

    def embed(self, llm: nn.Module, input_ids: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, L)`` ids with markers -> ``(B, L, d)`` input embeddings, markers at their learned vector."""
        return self.place(llm.get_input_embeddings()(input_ids.clamp(min=0)), masks)


def init_std(llm: nn.Module) -> float:
    """The LLM's weight-initialisation scale, for vectors that live among its input embeddings."""
    return getattr(llm.config.get_text_config(), "initializer_range", 0.02)


def check_item_counts(masks: dict[str, torch.Tensor], media: dict[str, torch.Tensor]) -> dict[str, int]:
    """Markers per modality in the batch; ValueError when a modality's encoded items do not match."""
    counts = {m: int(mask.sum()) for m, mask in masks.items()}
    for modality, n_markers in counts.items():
        n_items = 0 if media.get(modality) is None else media[modality].shape[0]
        if n_markers != n_items:
            raise ValueError(f"{modality}: the batch has {n_markers} media markers but {n_items} encoded items")
    return counts


def run_starts(mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool -> True at the first position of each run of True (an item's first position
    when its positions are contiguous)."""
    return mask & ~nn.functional.pad(mask, (1, 0))[:, :-1]
