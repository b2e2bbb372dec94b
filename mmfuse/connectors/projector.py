"""Token-wise projectors: ``linear`` (LLaVA) and ``mlp<k>x_gelu`` (LLaVA-1.5 uses k=2)."""

from __future__ import annotations

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``(..., in_dim) -> (..., out_dim)``; ``mlp2x_gelu`` is Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"connector 'identity' needs encoder width == LLM width, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = _MLP.match(kind)
    if match is None:
        raise ValueError(f"unknown projector {kind!r}; use 'linear', 'identity' or 'mlp<k>x_gelu'")
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"projector {kind!r}: depth must be at least 1")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
