"""WavLLM's combination of several encoders' time-aligned features before the connector's projector."""

from __future__ import annotations

import torch
from torch import nn

from .projector import build_projector


class EncoderCombiner(nn.Module):
    """``(n, frames, sum(widths)) -> (n, frames, out_dim)``: the features of several encoders, concatenated
    in the feature dimension (:class:`~mmfuse.backbones.multi.MultiEncoder`), split back into each
    encoder's part; each part is layer-normalised (``norm``) and mapped by its own projector of ``kind``
    to ``width`` (``kind=None``: left as it is), and the parts are concatenated again. WavLLM: a
    subsampler + adapter + projection per encoder, then one linear layer over the concatenation."""

    def __init__(self, widths: tuple[int, ...], kind: str | None, width: int, norm: bool):
        super().__init__()
        self.widths = list(widths)
        self.norms = nn.ModuleList(nn.LayerNorm(w) if norm else nn.Identity() for w in widths)
        self.projectors = nn.ModuleList(build_projector(kind, w, width) if kind else nn.Identity() for w in widths)
        self.out_dim = width * len(widths) if kind else sum(widths)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.split(self.widths, dim=-1)
        return torch.cat([proj(norm(part)) for part, norm, proj in zip(parts, self.norms, self.projectors)], dim=-1)
