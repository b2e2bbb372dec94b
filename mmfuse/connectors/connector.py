"""A connector: optional sequence pooling, a projector or resampler, optional boundary vectors."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConnectorConfig
from .combine import EncoderCombiner
from .mapper import MappingNetwork
from .middleware import LanguageMiddleware
from .perceiver import PerceiverResampler
from .projector import build_projector
from .qformer import QFormerResampler, add_positions_2d
from .windows import SlidingWindowTransformer


class Connector(nn.Module):
    """``(n, tokens, encoder_dim) -> (n, tokens', llm_dim)``.

    ``pool_stride`` average-pools along the token axis first (Qwen-Audio: 2); ``boundary_tokens``
    wraps every item in learned begin/end vectors (Qwen-Audio's audio BOS/EOS), so the item takes
    two more positions. ``kind="perceiver"`` is a Flamingo perceiver resampler; it and ``qformer`` take ``frames``
    for video, to add their frame embeddings (the other kinds ignore ``frames``). ``kind="windows"`` is
    Audio Flamingo's sliding-window transformer: one token per window of ``window`` frames every ``hop``.
    ``kind="mapper"`` is ClipCap/Pengi's transformer mapping network: ``prefix_length`` tokens per item.
    ``kind="qllama"`` is InternVL's language middleware: learned queries through a copy of ``llm``'s
    first ``depth`` layers with added cross-attention (:mod:`.middleware`); it needs ``llm``.
    ``positions_2d`` adds fixed 2-D sin-cos positions of each frame's square grid of features before a
    projector (the resamplers add their own): a visual expert gives every image position one rotary
    position id (CogVLM), so where a patch was must be in its features.
    ``parts``: the widths of several encoders whose features are concatenated (WavLLM); after pooling,
    an :class:`EncoderCombiner` maps each part with ``cfg.encoder_projector`` before the core.
    """

    def __init__(self, cfg: ConnectorConfig, encoder_dim: int, llm_dim: int, parts: tuple[int, ...] = (),
                 llm: nn.Module | None = None):
        super().__init__()
        if cfg.pool_stride < 1:
            raise ValueError(f"connector pool_stride must be >= 1, got {cfg.pool_stride}")
        if cfg.encoder_projector and len(parts) < 2:
            raise ValueError(f"connector encoder_projector {cfg.encoder_projector!r} maps each of several encoders; "
                             "this modality has one (add encoders.<m>.extra, or drop encoder_projector)")
        self.pool_stride = cfg.pool_stride
        self.combine = (EncoderCombiner(parts, cfg.encoder_projector, llm_dim // len(parts), cfg.input_norm)
                        if len(parts) > 1 else None)
        self.input_norm = nn.LayerNorm(encoder_dim) if cfg.input_norm and self.combine is None else None
        self.core = build_core(cfg, self.combine.out_dim if self.combine else encoder_dim, llm_dim, llm)
        if cfg.positions_2d and cfg.kind in ("mapper", "windows", "qllama"):
            raise ValueError(f"connector positions_2d applies to projectors, 'perceiver' and 'qformer', not {cfg.kind!r}")
        self.positions_2d = cfg.positions_2d and cfg.kind not in ("perceiver", "qformer")  # those add their own
        self.boundary = nn.Parameter(torch.randn(2, llm_dim) * 0.02) if cfg.boundary_tokens else None

    def forward(self, features: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """features ``(n, frames * tokens, encoder_dim)``; ``frames`` > 1 for video (frame-major tokens)."""
        reads_frames = isinstance(self.core, (PerceiverResampler, QFormerResampler))
        if reads_frames and self.pool_stride > 1 and frames > 1:
            raise ValueError(
                f"connector: pool_stride {self.pool_stride} cannot be combined with a resampler over {frames} frames "
                "(pooling would mix tokens across frame boundaries); set pool_stride to 1"
            )
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.positions_2d:
            features = add_positions_2d(features, frames, "connector")
        if self.pool_stride > 1:
            if features.shape[1] < self.pool_stride:
                raise ValueError(f"connector: {features.shape[1]} tokens is fewer than pool_stride {self.pool_stride}")
            features = nn.functional.avg_pool1d(features.transpose(1, 2), self.pool_stride, self.pool_stride).transpose(1, 2)
        if self.combine is not None:
            features = self.combine(features)
        out = self.core(features, frames=frames) if reads_frames else self.core(features)
        if self.boundary is not None:
            n = out.shape[0]
            begin = self.boundary[0].expand(n, 1, -1).to(out.dtype)
            end = self.boundary[1].expand(n, 1, -1).to(out.dtype)
            out = torch.cat([begin, out, end], dim=1)
        return out


def build_core(cfg: ConnectorConfig, encoder_dim: int, llm_dim: int, llm: nn.Module | None = None) -> nn.Module:
    """The connector's resampler or projector for ``cfg.kind`` (``llm``: the LLM a ``qllama`` copies)."""
    if cfg.kind == "qllama":
        if llm is None:
            raise ValueError("connector kind 'qllama' copies the LLM's first layers; build it with the LLM")
        return LanguageMiddleware(encoder_dim, llm_dim, llm, num_queries=cfg.num_queries, depth=cfg.depth,
                                  cross_attention_every=cfg.cross_attention_every)
    if cfg.kind == "qformer":
        return QFormerResampler(encoder_dim, llm_dim, num_queries=cfg.num_queries, width=cfg.hidden_size, depth=cfg.depth,
                                num_heads=cfg.num_heads, cross_attention_every=cfg.cross_attention_every,
                                positions_2d=cfg.positions_2d, max_frames=cfg.max_frames)
    if cfg.kind == "perceiver":
        return PerceiverResampler(encoder_dim, llm_dim, num_latents=cfg.num_latents, depth=cfg.depth, num_heads=cfg.num_heads,
                                  max_frames=cfg.max_frames, positions_2d=cfg.positions_2d)
    if cfg.kind == "mapper":
        return MappingNetwork(encoder_dim, llm_dim, prefix_length=cfg.prefix_length, depth=cfg.depth, num_heads=cfg.num_heads)
    if cfg.kind == "windows":
        if cfg.window < 1 or cfg.hop < 1:
            raise ValueError(f"connector kind 'windows' needs window >= 1 and hop >= 1 (encoder frames), "
                             f"got window {cfg.window}, hop {cfg.hop}")
        return SlidingWindowTransformer(encoder_dim, llm_dim, window=cfg.window, hop=cfg.hop, depth=cfg.depth,
                                        num_heads=cfg.num_heads, max_windows=cfg.max_windows)
    return build_projector(cfg.kind, encoder_dim, llm_dim)

