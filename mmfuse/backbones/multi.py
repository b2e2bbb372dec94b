"""Several encoders for one modality (WavLLM: Whisper for content, WavLM for acoustics).

:class:`MultiProcessor` loads a clip once and gives it to every encoder's own processor (Whisper: log-mel
features; WavLM: the waveform), packing their outputs into one flat tensor per item, so a batch still
holds one tensor per modality through collation, sharding and device moves. :class:`MultiEncoder`
unpacks it, runs each encoder, aligns every encoder's frames to the first one's
(:func:`align_frames`) and concatenates the features; the connector combines them
(:class:`~mmfuse.connectors.combine.EncoderCombiner`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import EncoderConfig
from ..data.media import MediaProcessor, load_audio
from .encoders import MediaEncoder
from .loading import config_dict, load_encoder_model, load_media_processor


def align_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """``(n, t, d) -> (n, frames, d)``: output frame ``i`` is the mean of the input frames its span of the
    clip overlaps (adaptive average pooling in time; a longer output repeats frames). Equal lengths are
    returned unchanged."""
    if features.shape[1] == frames:
        return features
    return nn.functional.adaptive_avg_pool1d(features.transpose(1, 2), frames).transpose(1, 2)


class MultiProcessor:
    """One audio clip -> every encoder's input, flattened and concatenated: ``(sum of sizes,)``.

    The first processor must have a fixed window (Whisper's ``n_samples``); a longer clip is refused by
    it, and the others read the clip zero-padded to that window, so every encoder covers the same span
    and every item has the same ``shapes`` (each processor's output shape, in order).
    """

    def __init__(self, processors: list[MediaProcessor]):
        first = processors[0]
        self.modality = first.modality
        self.processors = processors
        self.window = getattr(first.hf_processor, "n_samples", None)
        if self.window is None:
            raise ValueError(f"encoders.{self.modality}.extra: the first {self.modality} encoder's feature extractor "
                             f"({type(first.hf_processor).__name__}) has no fixed window (n_samples, as Whisper's); "
                             "list a fixed-window encoder first")
        for i, processor in enumerate(processors[1:]):
            if processor.sampling_rate != first.sampling_rate:
                raise ValueError(f"encoders.{self.modality}.extra[{i}]: its feature extractor reads {processor.sampling_rate} Hz, "
                                 f"the first encoder's {first.sampling_rate} Hz; they must read the same samples")
        silence = np.zeros(self.window, dtype=np.float32)
        self.shapes = [tuple(p(silence).shape) for p in processors]

    @property
    def sampling_rate(self) -> int:
        return self.processors[0].sampling_rate

    def __call__(self, item: Any, sample_id: str = "?", index: int = 0) -> torch.Tensor:
        wave = load_audio(item, self.sampling_rate, sample_id, index)
        first = self.processors[0](wave, sample_id, index)  # refuses a clip longer than the window
        padded = np.pad(wave, (0, self.window - wave.shape[0]))
        return torch.cat([first.flatten(), *(p(padded, sample_id, index).flatten() for p in self.processors[1:])])

    def save_pretrained(self, directory: str | Path) -> None:
        """The first processor in ``directory``, the others in ``directory/extra-<i>``."""
        self.processors[0].save_pretrained(directory)
        for i, processor in enumerate(self.processors[1:]):
            processor.save_pretrained(Path(directory) / f"extra-{i}")


class MultiEncoder(nn.Module):
    """forward(x): ``(n, sum of sizes)`` packed by :class:`MultiProcessor` -> ``(n, frames, sum(widths))``:
    each encoder's features (``feature_layer`` and all, as :class:`MediaEncoder`), aligned to the first
    encoder's ``frames`` by :func:`align_frames`, concatenated in the feature dimension in order."""

    def __init__(self, encoders: list[MediaEncoder], shapes: list[tuple[int, ...]]):
        super().__init__()
        self.modality = encoders[0].modality
        self.encoders = nn.ModuleList(encoders)
        self.shapes = shapes
        self.sizes = [math.prod(shape) for shape in shapes]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(encoder.hidden_size for encoder in self.encoders)

    @property
    def hidden_size(self) -> int:
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != sum(self.sizes):
            raise ValueError(f"{self.modality} encoders: expected packed inputs (items, {sum(self.sizes)}) holding "
                             f"{' + '.join(map(str, self.shapes))}, got {tuple(x.shape)}")
        parts = x.split(self.sizes, dim=1)
        features = [enc(part.reshape(-1, *shape)) for enc, part, shape in zip(self.encoders, parts, self.shapes)]
        frames = features[0].shape[1]
        return torch.cat([align_frames(f, frames) for f in features], dim=-1)


def with_extra_encoders(cfg: EncoderConfig, encoder: MediaEncoder, processor: MediaProcessor,
                        directory: str | Path | None = None) -> tuple[MultiEncoder, MultiProcessor]:
    """``encoder`` and ``processor`` joined by those of ``cfg.extra`` (each ``hf_config`` is filled in
    for the checkpoint); ``directory``: a saved checkpoint's ``processors/<m>`` to read their processors from."""
    encoders, processors = [encoder], [processor]
    for i, extra in enumerate(cfg.extra):
        model = load_encoder_model(extra)
        saved = None if directory is None else str(Path(directory) / f"extra-{i}")
        processors.append(MediaProcessor(extra.modality, load_media_processor(extra, model.config, directory=saved)))
        extra.hf_config = config_dict(model.config)
        encoders.append(MediaEncoder(extra, model))
    multi = MultiProcessor(processors)
    return MultiEncoder(encoders, multi.shapes), multi
