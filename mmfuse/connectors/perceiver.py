"""Perceiver resampler in the Flamingo style (Flamingo, OpenFlamingo, IDEFICS).

A fixed set of learned latents (Flamingo: 64) is refined by ``depth`` layers. In each layer the
latents are the queries of one attention whose keys and values are the media features
*concatenated with the latents themselves*, followed by an FFN; both are pre-norm residual blocks.
A final LayerNorm and a linear projection to the LLM width follow. Whatever the number of input
features, each item becomes ``num_latents`` tokens.

For video, a learned embedding per frame index (``max_frames`` of them) is added to every token of
that frame before the frames' tokens are flattened into one set; without frame embeddings the
resampler cannot tell the frames apart (attention is invariant to the order of its keys). For the
same reason it cannot tell where in a frame a token was unless the encoder's features say so;
``positions_2d`` adds fixed 2-D sin-cos positions of each frame's square grid of tokens to the
features (keys and values alike, so the latents carry where what they read was).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .frames import add_frame_embeddings, frame_embeddings
from .qformer import add_positions_2d


class PerceiverAttention(nn.Module):
    """Latents ``(n, L, dim)`` attend to ``concat(features, latents)``; returns ``(n, L, dim)``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (n, s, heads * head_dim) -> (n, heads, s, head_dim)
        n, s, _ = x.shape
        return x.view(n, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """features ``(n, S, dim)``, latents ``(n, L, dim)`` -> ``(n, L, dim)``."""
        latents = self.norm_latents(latents)
        context = torch.cat([self.norm_media(features), latents], dim=1)  # (n, S + L, dim)
        q = self._split_heads(self.to_q(latents))
        k, v = (self._split_heads(t) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, L, head_dim)
        n, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))


class PerceiverLayer(nn.Module):
    """``latents += attn(latents, concat(features, latents)); latents += FFN(latents)``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn = PerceiverAttention(dim, num_heads, head_dim)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(features, latents)
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """``(n, frames * tokens, feature_dim) -> (n, num_latents, out_dim)``.

    Works in the encoder width ``feature_dim``; ``head_dim`` defaults to ``feature_dim // num_heads``.
    ``max_frames`` > 0 adds a learned embedding per frame index (at most ``max_frames`` frames);
    0 means no frame embeddings. ``positions_2d`` adds each token's 2-D grid position in its frame.
    """

    def __init__(
        self,
        feature_dim: int,
        out_dim: int,
        *,
        num_latents: int = 64,
        depth: int = 6,
        num_heads: int = 8,
        head_dim: int | None = None,
        ff_mult: int = 4,
        max_frames: int = 0,
        positions_2d: bool = False,
    ):
        super().__init__()
        if num_latents < 1 or depth < 1 or num_heads < 1 or ff_mult < 1:
            raise ValueError(
                f"perceiver: num_latents, depth, num_heads and ff_mult must be at least 1, "
                f"got {num_latents}, {depth}, {num_heads}, {ff_mult}"
            )
        head_dim = head_dim if head_dim is not None else feature_dim // num_heads
        if head_dim < 1:
            raise ValueError(f"perceiver: head_dim must be at least 1 (feature_dim {feature_dim}, num_heads {num_heads})")
        # unit-variance init as OpenFlamingo: at the scale of the (layer-normalised) features, so the frame
        # embeddings are not drowned out and frames stay distinguishable from the first step
        self.latents = nn.Parameter(torch.randn(num_latents, feature_dim))
        self.frame_embeddings = frame_embeddings(max_frames, feature_dim)
        self.positions_2d = positions_2d
        self.layers = nn.ModuleList(PerceiverLayer(feature_dim, num_heads, head_dim, ff_mult) for _ in range(depth))
        self.out_norm = nn.LayerNorm(feature_dim)
        # none when the output stays at the encoder width (Type-A: OpenFlamingo's resampler has no projection)
        self.proj = nn.Linear(feature_dim, out_dim) if out_dim != feature_dim else nn.Identity()

    def forward(self, features: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """features ``(n, frames * tokens, feature_dim)`` (frame-major) -> ``(n, num_latents, out_dim)``."""
        n = features.shape[0]
        try:
            features = add_frame_embeddings(features, self.frame_embeddings, frames)
        except ValueError as err:
            raise ValueError(f"perceiver: {err}") from err
        if self.positions_2d:
            features = add_positions_2d(features, frames, "perceiver")
        latents = self.latents.to(features.dtype).unsqueeze(0).expand(n, -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.proj(self.out_norm(latents))
