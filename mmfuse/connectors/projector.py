"""Token-wise projectors: ``linear`` (LLaVA), ``mlp<k>x_gelu`` (LLaVA-1.5 uses k=2) and ``glu`` (CogVLM's
adapter: a linear layer, LayerNorm and GELU, then a SwiGLU MLP, :class:`SwiGLU`)."""

from __future__ import annotations

import re

import torch
from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class SwiGLU(nn.Module):
    """``(..., dim) -> (..., dim)``: ``down(silu(gate(x)) * up(x))`` with ``hidden`` units (Llama's MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class GLUProjector(SwiGLU):
    """``(..., in_dim) -> (..., out_dim)``: ``x = GELU(LN(W x))``, then a SwiGLU MLP of width
    ``8/3 * out_dim`` (CogVLM uses the LLM's FFN width)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(out_dim, 8 * out_dim // 3)
        self.linear_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.gelu(self.norm(self.linear_proj(x))))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``(..., in_dim) -> (..., out_dim)``; ``mlp2x_gelu`` is Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "glu":
        return GLUProjector(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"connector 'identity' needs encoder width == LLM width, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = _MLP.match(kind)
    if match is None:
        raise ValueError(f"unknown projector {kind!r}; use 'linear', 'glu', 'identity' or 'mlp<k>x_gelu'")
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"projector {kind!r}: depth must be at least 1")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
