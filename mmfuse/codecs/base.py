"""The modality-tokenizer interface of Type-D fusion: media to discrete codes and back.

A codec turns one modality's processed items into integer codes ``(items, frames, codebooks)`` and
decodes codes back to media: images ``(items, 3, H, W)`` in ``[0, 1]``, audio ``(items, samples)`` in
``[-1, 1]``. ``frames`` is the number of code positions per item (image: latent cells in raster order;
audio: time frames); multi-codebook (residual) codes are flattened frame-major by the fusion strategy.
"""

from __future__ import annotations

import torch
from torch import nn


class MediaCodec(nn.Module):
    modality: str = "image"
    codebook_size: int = 0  # codes per codebook
    num_codebooks: int = 1  # residual depth (1 for a single codebook)
    can_decode: bool = True  # False for encode-only codecs (transformers' ChameleonVQVAE has no decoder)
    feature_dim: int = 0  # width of :meth:`features` (0: the codec gives no continuous features)
    # UniCode: the codebook is an LLM's embeddings of its text ids from here (code c is id start + c)
    text_ids_start: int | None = None

    def settings(self) -> dict:
        """JSON-able ``{"kind": ..., **arguments}`` that rebuilds this codec's architecture (no weights)."""
        raise NotImplementedError

    def processor(self):
        """The transformers image processor / feature extractor that makes :meth:`encode`'s input from
        raw media (``mmfuse.data.media.MediaProcessor`` wraps it)."""
        raise NotImplementedError

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        """Code positions per item of processed input shape ``item_shape``."""
        raise NotImplementedError

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Processed items ``(items, ...)`` -> codes ``(items, frames, num_codebooks)`` (long)."""
        raise NotImplementedError

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Processed items ``(items, ...)`` -> the continuous features the codes quantize
        ``(items, frames, feature_dim)`` (LaVIT reads images through these, not through their codes)."""
        raise NotImplementedError(f"the {type(self).__name__} gives no continuous features; LaVIT-style reading "
                                  "(fusion.options.read: features) needs a codec that does, such as the image codec")

    def encode_with_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` and :meth:`features` of the same items (a codec whose codes quantize its
        features computes them once)."""
        return self.encode(inputs), self.features(inputs)

    def quantize_features(self, features: torch.Tensor) -> torch.Tensor:
        """Continuous features ``(items, frames, feature_dim)``, e.g. an LLM's regression of them (VL-GPT)
        -> the codes they quantize to ``(items, frames, num_codebooks)``."""
        raise NotImplementedError(f"the {type(self).__name__} cannot quantize features back to codes; writing features "
                                  "(fusion.options.write: features) needs a codec that can, such as the image codec")

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(items, frames, num_codebooks)`` -> media (see the module docstring)."""
        raise NotImplementedError
