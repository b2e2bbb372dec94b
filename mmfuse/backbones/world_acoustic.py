"""The built-in world's acoustic encoder: a tiny WavLM on the raw waveform (WavLLM's second encoder).

:func:`pretrain_acoustic_encoder` trains ``WavLMModel(acoustic_config())`` from scratch with dense
per-frame heads on freshly sampled :mod:`mmfuse.data.synth.sounds` clips: at each of its 99 frames (20 ms,
as WavLM's) the sound's kind, pitch and duration class (0 for silence) and the frame's loudness (log10 RMS
of the waveform). It then saves a directory that ``AutoModel.from_pretrained(d)`` and
``AutoFeatureExtractor.from_pretrained(d)`` (a ``Wav2Vec2FeatureExtractor`` that does not normalise the
waveform, so loudness stays readable) load offline. Dropout, layer drop and SpecAugment masking are
off, so the encoder gives the same features in training mode, frozen inside a model.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from torch import nn

from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.backbones.world_audio import EVAL_CLIPS, evaluate_and_save, fit_on_clips
from mmfuse.data.synth import sounds
from mmfuse.data.synth.sounds import Event

N_FRAMES = 99  # encoder frames per 2 s clip: the conv feature encoder's stride is 320 samples
DEFAULT_STEPS = 250
LEARNING_RATE = 2e-3
LOUDNESS_FLOOR = 1e-4  # RMS added before the log, so silence is about -4


def acoustic_config() -> transformers.WavLMConfig:
    """A 3-layer, 128-wide WavLM with a 4-layer conv feature encoder of stride 320 (99 frames per 2 s)."""
    return transformers.WavLMConfig(
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(16, 32, 64, 128),
        conv_kernel=(10, 8, 4, 4),
        conv_stride=(5, 4, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        vocab_size=8,
    )


def feature_extractor() -> transformers.Wav2Vec2FeatureExtractor:
    """The raw 16 kHz waveform, not normalised, as ``input_values``."""
    return transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sounds.SAMPLE_RATE, padding_value=0.0, do_normalize=False, return_attention_mask=False
    )


def loudness(wave: np.ndarray, n_frames: int = N_FRAMES) -> np.ndarray:
    """(n_frames,) float32: log10 of the RMS of each of ``n_frames`` equal cuts of ``wave``."""
    rms = np.array([np.sqrt(np.mean(cut.astype(np.float64) ** 2)) for cut in np.array_split(wave, n_frames)])
    return np.log10(rms + LOUDNESS_FLOOR).astype(np.float32)


class _FrameHeads(nn.Module):
    """Linear probes on encoder states (B, 99, 128): per-frame kind, pitch (B, 99, 4), duration (B, 99, 3)
    and loudness (B, 99)."""

    def __init__(self, width: int):
        super().__init__()
        self.kind = nn.Linear(width, 1 + len(sounds.KINDS))
        self.pitch = nn.Linear(width, 1 + len(sounds.PITCHES))
        self.duration = nn.Linear(width, 1 + len(sounds.DURATIONS))
        self.loudness = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kind": self.kind(hidden), "pitch": self.pitch(hidden), "duration": self.duration(hidden),
                "loudness": self.loudness(hidden).squeeze(-1)}


def _make_batch(n: int, rng: random.Random, extractor, allowed: Callable[[Event], bool] | None) -> dict[str, torch.Tensor]:
    """``n`` fresh clips: waveforms (n, 32000), kind / pitch / duration classes and loudness (n, 99)."""
    clips = [sounds.sample_clip(rng, allowed=allowed) for _ in range(n)]
    waves = [sounds.synthesize(clip, rng=rng) for clip in clips]
    values = extractor(waves, sampling_rate=sounds.SAMPLE_RATE, return_tensors="np")["input_values"]
    labels = [sounds.frame_labels(clip, N_FRAMES) for clip in clips]
    batch = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in ("kind", "pitch", "duration")}
    return {"values": torch.from_numpy(np.asarray(values, dtype=np.float32)),
            "loudness": torch.from_numpy(np.stack([loudness(w) for w in waves])), **batch}


def _loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    return (sum(ce(out[k].flatten(0, 1), batch[k].flatten()) for k in ("kind", "pitch", "duration"))
            + nn.functional.mse_loss(out["loudness"], batch["loudness"]))


@torch.no_grad()
def _evaluate(model: nn.Module, heads: _FrameHeads, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-frame kind / pitch / duration accuracy on sound frames, silence accuracy, loudness mean absolute error."""
    out = heads(model(input_values=batch["values"]).last_hidden_state)
    sound = batch["kind"] > 0
    hit = {k: out[k].argmax(-1) == batch[k] for k in ("kind", "pitch", "duration")}
    return {
        **{f"{k}_accuracy": h[sound].float().mean().item() for k, h in hit.items()},
        "silence_accuracy": hit["kind"][~sound].float().mean().item(),
        "loudness_mae": (out["loudness"] - batch["loudness"]).abs().mean().item(),
    }


def pretrain_acoustic_encoder(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    allowed: Callable[[Event], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train the acoustic encoder on synthetic clips (only ``allowed`` events) and save it to ``out_dir``.

    Deterministic for a given ``seed`` and thread count. Writes the WavLM weights (safetensors), its
    config, the feature extractor config and ``pretrain_metrics.json`` (accuracies on fresh clips, and
    on clips of every event when ``allowed`` is given). ``progress(step, steps, {"loss": float})`` is
    called after every step. Returns ``out_dir``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eval_rng = random.Random(f"{seed}-acoustic-eval")
    extractor = feature_extractor()
    model = transformers.WavLMModel(acoustic_config())
    heads = _FrameHeads(model.config.hidden_size)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)

    model.train()
    heads.train()
    fit_on_clips(lambda batch: _loss(heads(model(input_values=batch["values"]).last_hidden_state), batch), params,
                 optimizer, schedule, lambda n: _make_batch(n, rng, extractor, allowed), steps, batch_size, progress)
    train_seconds = time.perf_counter() - started

    model.eval()
    return evaluate_and_save(
        out_dir, model, extractor, lambda batch: _evaluate(model, heads, batch),
        lambda n, allowed_: _make_batch(n, eval_rng, extractor, allowed_), allowed,
        {"steps": steps, "batch_size": batch_size, "seed": seed, "eval_clips": EVAL_CLIPS, "train_seconds": round(train_seconds, 1)},
    )
