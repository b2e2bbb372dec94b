"""Semantic audio tokens (AudioPaLM-style): k-means clusters of a frozen Whisper encoder's frames.

:class:`SemanticAudioCodec` runs the Whisper encoder on log-mel features, averages every ``pool``
encoder frames (Whisper's 50 Hz -> 25 Hz at the default 2) and assigns each to its nearest of
``num_clusters`` centroids: codes ``(items, frames, 1)``. Decoding embeds the codes, predicts the
audio codec's log-magnitude STFT frames with a small conv net (:class:`SpectrogramDecoder`) and
runs Griffin-Lim, so generated semantic tokens become sound. The encoder, centroids and decoder are
all module state (saved in the codec's safetensors). :func:`pretrain_semantic_audio` fits the
centroids on the world's encoder (``world:audio``) and trains the decoder.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from sklearn.cluster import MiniBatchKMeans
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmfuse.backbones.loading import config_dict, default_processor, hf_config_from_dict, progress_bars_off, resolve_path
from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.codecs.audio import (
    EVAL_CLIPS, SHIFT_FRACTION, Spectrogram, SpectrogramDecoder, code_frame_spectra, pitch_metrics, spectral_loss, to_wave,
    world_clips,
)
from mmfuse.codecs.base import MediaCodec
from mmfuse.data.synth import sounds
from mmfuse.data.synth.sounds import Clip, Event

DEFAULT_STEPS = 1000
KMEANS_CLIPS = 1024


class SemanticAudioCodec(MediaCodec):
    """Whisper encoder -> mean-pool ``pool`` frames -> nearest of ``num_clusters`` centroids; decode
    through code embeddings -> conv net -> log-magnitudes (``n_fft``, ``hop``) -> Griffin-Lim.

    ``encoder`` is the Whisper config dict. One code frame covers ``pool * 2 * 160`` samples (Whisper's
    conv stride 2 over 10 ms mel frames), which must be a whole number of ``hop`` STFT frames.
    """

    modality = "audio"
    num_codebooks = 1
    MEL_HOP = 160  # Whisper feature extractors' hop at 16 kHz

    def __init__(
        self,
        *,
        encoder: dict,
        num_clusters: int = 256,
        pool: int = 2,
        n_fft: int = 640,
        hop: int = 160,
        width: int = 256,
        dim: int = 64,
        griffin_lim_iterations: int = 32,
    ):
        super().__init__()
        config = hf_config_from_dict(encoder)
        if config.model_type != "whisper":
            raise ValueError(f"semantic_audio codec: encoder must be a whisper config, got model_type {config.model_type!r}")
        positions = config.max_source_positions
        if pool < 1 or positions % pool:
            raise ValueError(f"semantic_audio codec: pool {pool} must divide the encoder's max_source_positions {positions}")
        samples_per_frame = pool * 2 * self.MEL_HOP
        if samples_per_frame % hop:
            raise ValueError(f"semantic_audio codec: a code frame ({samples_per_frame} samples) is not a whole number of hop {hop} STFT frames")
        self._settings = {
            "kind": "semantic_audio", "encoder": config_dict(config), "num_clusters": num_clusters, "pool": pool,
            "n_fft": n_fft, "hop": hop, "width": width, "dim": dim, "griffin_lim_iterations": griffin_lim_iterations,
        }
        self.pool, self.frames = pool, positions // pool
        self.stride = samples_per_frame // hop
        self.codebook_size = num_clusters
        self.encoder = WhisperEncoder(config).eval()
        self.encoder.requires_grad_(False)
        self.register_buffer("centroids", torch.zeros(num_clusters, config.d_model))
        self.spectrogram = Spectrogram(n_fft, hop, iterations=griffin_lim_iterations)
        self.embed = nn.Embedding(num_clusters, dim)
        self.decoder = SpectrogramDecoder(dim, width, self.spectrogram.bins, self.stride)
        self._processor = default_processor("audio", config)

    def settings(self) -> dict:
        return dict(self._settings)

    def processor(self):
        """The Whisper feature extractor: ``input_features`` (mel, 2 * max_source_positions) per item."""
        return self._processor

    def train(self, mode: bool = True) -> "SemanticAudioCodec":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the codec's mode
        return self

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        expected = (self.encoder.config.num_mel_bins, 2 * self.encoder.config.max_source_positions)
        if tuple(item_shape) != expected:
            raise ValueError(f"semantic_audio codec: expected input_features items of shape {expected}, got {tuple(item_shape)}")
        return self.frames

    @torch.no_grad()
    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Log-mel features (items, mel, 2P) -> pooled encoder frames (items, P / pool, d_model)."""
        self.num_frames(tuple(inputs.shape[1:]))
        hidden = self.encoder(inputs).last_hidden_state
        return hidden.unflatten(1, (self.frames, self.pool)).mean(2)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Log-mel features (items, mel, 2P) -> codes (items, P / pool, 1): each pooled frame's nearest centroid."""
        return self.encode_with_features(inputs)[0]

    @torch.no_grad()
    def encode_with_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(inputs)
        return torch.cdist(features, self.centroids.expand(len(features), -1, -1)).argmin(-1, keepdim=True), features

    def decode_spectrogram(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, F, 1) -> log-magnitudes (B, bins, F * stride)."""
        if codes.dim() != 3 or codes.shape[2] != 1:
            raise ValueError(f"semantic_audio codec: expected codes of shape (items, frames, 1), got {tuple(codes.shape)}")
        return self.decoder(self.embed(codes[..., 0]))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, F, 1) -> waves (items, F * pool * 320) in [-1, 1]."""
        return to_wave(self.spectrogram, self.decode_spectrogram(codes))


def _features(extractor, waves: torch.Tensor) -> torch.Tensor:
    rate = extractor.sampling_rate
    return torch.from_numpy(extractor(list(waves.numpy()), sampling_rate=rate, return_tensors="np")["input_features"])


def _labels(clips: list[Clip], frames: int) -> np.ndarray:
    """(kind, pitch) class per code frame, (clips * frames,): 0 silence, else 1 + 3 * kind + pitch."""
    per_clip = [sounds.frame_labels(clip, frames) for clip in clips]
    return np.concatenate([np.where(lab["kind"] > 0, 3 * lab["kind"] + lab["pitch"] - 3, 0) for lab in per_clip])


def pretrain_semantic_audio(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    lr: float = 2e-3,
    audio_encoder: str = "world:audio",
    kmeans_clips: int = KMEANS_CLIPS,
    codec_settings: dict | None = None,
    allowed: Callable[[Event], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Fit the centroids of a :class:`SemanticAudioCodec` on ``audio_encoder`` (a Whisper checkpoint,
    ``world:<name>`` resolved) over ``kmeans_clips`` fresh world clips of ``allowed`` events and as
    many pitch-shifted ones (the audio codec's ``shift_factor``), train its
    decoder for ``steps`` batches (half of the clips shifted) to predict the clips' log-magnitudes
    from the codes (the audio codec's ``spectral_loss``), and save it.

    Deterministic for a given seed and thread count. ``pretrain_metrics.json`` holds, on
    ``EVAL_CLIPS`` fresh clips: the share of clusters in use, the label purity (share of code frames
    whose (kind, pitch) label, or silence, is their cluster's majority label on the unshifted k-means
    clips), the decoder's log-magnitude MSE, ``pitch_kept`` (share of events whose decoded dominant
    frequency is within 10%) and ``pitch_median_error``; ``held_out_events`` the same on one-event
    clips of the events ``allowed`` rejects, if any.
    ``progress(step, steps, {"loss": float})`` is called after every decoder step.
    """
    from mmfuse.codecs import save_codec

    if steps < 1 or batch_size < 1 or kmeans_clips < 1:
        raise ValueError(f"steps, batch_size and kmeans_clips must be positive, got {steps}, {batch_size}, {kmeans_clips}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    path = resolve_path(audio_encoder)
    with progress_bars_off():
        whisper = transformers.WhisperModel.from_pretrained(path, use_safetensors=True)
    codec = SemanticAudioCodec(encoder=config_dict(whisper.config), **(codec_settings or {}))
    codec.encoder.load_state_dict(whisper.get_encoder().state_dict())
    codec._processor = transformers.AutoFeatureExtractor.from_pretrained(path)

    clips, waves = world_clips(rng, kmeans_clips, allowed)
    shifted = world_clips(rng, kmeans_clips, allowed, shifted=1.0)[1]
    features = _pooled(codec, waves)
    kmeans = MiniBatchKMeans(codec.codebook_size, random_state=seed, batch_size=2048, n_init=3)
    kmeans.fit(torch.cat([features, _pooled(codec, shifted)]).flatten(0, 1).numpy())
    codec.centroids.copy_(torch.from_numpy(kmeans.cluster_centers_))
    majority: dict[int, Counter] = {}
    for code, label in zip(kmeans.predict(features.flatten(0, 1).numpy()).tolist(), _labels(clips, codec.frames)):
        majority.setdefault(code, Counter())[label] += 1

    params = [*codec.embed.parameters(), *codec.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    codec.train()
    for step in range(1, steps + 1):
        _, waves = world_clips(rng, batch_size, allowed, shifted=SHIFT_FRACTION)
        codes = codec.encode(_features(codec._processor, waves))
        loss = spectral_loss(codec.decode_spectrogram(codes), code_frame_spectra(codec.spectrogram, waves, codec.stride))[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item()})
    train_seconds = time.perf_counter() - start

    codec.eval()
    eval_rng = random.Random(f"semantic_audio-eval-{seed}")
    metrics = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "kmeans_clips": kmeans_clips,
        "audio_encoder": audio_encoder,
        "train_seconds": round(train_seconds, 1),
        "eval_clips": EVAL_CLIPS,
        **_evaluate(codec, majority, *world_clips(eval_rng, EVAL_CLIPS, allowed)),
    }
    if allowed is not None:
        held_out = lambda e: not allowed(e)  # noqa: E731
        metrics["held_out_events"] = _evaluate(codec, majority, *world_clips(eval_rng, EVAL_CLIPS, held_out, n_events=1))
    out_dir = save_codec(codec, out_dir)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


def _pooled(codec: SemanticAudioCodec, waves: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Waves (B, S) -> pooled encoder frames (B, F, d_model)."""
    return torch.cat([codec.features(_features(codec.processor(), waves[i : i + batch])) for i in range(0, len(waves), batch)])


@torch.no_grad()
def _evaluate(codec: SemanticAudioCodec, majority: dict[int, Counter], clips: list[Clip], waves: torch.Tensor, batch: int = 64) -> dict:
    """Cluster usage, label purity against ``majority`` (code -> label counts), log-magnitude MSE and
    :func:`pitch_metrics` of the decoded waves."""
    codes = torch.cat([codec.encode(_features(codec.processor(), waves[i : i + batch])) for i in range(0, len(waves), batch)])
    spectra = torch.cat([codec.decode_spectrogram(codes[i : i + batch]) for i in range(0, len(codes), batch)])
    decoded = torch.cat([to_wave(codec.spectrogram, spectra[i : i + batch]) for i in range(0, len(spectra), batch)])
    predicted = [majority[c].most_common(1)[0][0] if c in majority else -1 for c in codes.flatten().tolist()]
    return {
        "cluster_usage": round(codes.unique().numel() / codec.codebook_size, 4),
        "label_purity": round(float(np.mean(np.asarray(predicted) == _labels(clips, codec.frames))), 4),
        "log_magnitude_mse": round(F.mse_loss(spectra, code_frame_spectra(codec.spectrogram, waves, codec.stride)).item(), 4),
        **pitch_metrics(waves.numpy(), decoded.numpy(), clips),
    }
