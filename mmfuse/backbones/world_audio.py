"""The built-in world's small pretrained audio encoder: a tiny Whisper trained on synthetic sounds.

:func:`pretrain_audio_encoder` trains the encoder of ``WhisperModel(audio_config())`` with dense
per-frame heads (sound kind and pitch at each of the 100 encoder frames, plus the clip's event count)
on freshly sampled :mod:`mmfuse.data.synth.sounds` clips, then saves a directory that
``AutoModel.from_pretrained(d).get_encoder()`` and ``AutoFeatureExtractor.from_pretrained(d)``
load offline. The decoder is an untrained stub that only makes the checkpoint a valid Whisper.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from torch import nn

from mmfuse.backbones.loading import progress_bars_off
from mmfuse.data.synth import sounds
from mmfuse.data.synth.sounds import Event

N_MELS = 40
HOP_LENGTH = 160
N_FRAMES = 100  # encoder frames per clip: 200 mel frames after the stride-2 conv
DEFAULT_STEPS = 500
LEARNING_RATE = 3e-3
WARMUP_FRACTION = 0.05
CHUNK_BATCHES = 8  # batches of clips synthesized and featurized at once
EVAL_CLIPS = 512


def audio_config() -> transformers.WhisperConfig:
    """A 3-layer, 128-wide Whisper over 40 mel bins and 2 s clips (100 encoder positions)."""
    return transformers.WhisperConfig(
        num_mel_bins=N_MELS,
        d_model=128,
        encoder_layers=3,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        max_source_positions=N_FRAMES,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        vocab_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        max_target_positions=8,
    )


def feature_extractor() -> transformers.WhisperFeatureExtractor:
    """Log-mel features (40, 200) for a 2 s clip at 16 kHz."""
    return transformers.WhisperFeatureExtractor(
        feature_size=N_MELS,
        sampling_rate=sounds.SAMPLE_RATE,
        chunk_length=int(sounds.CLIP_SECONDS),
        hop_length=HOP_LENGTH,
        n_fft=400,
    )


class _FrameHeads(nn.Module):
    """Linear probes on encoder states (B, 100, 128): per-frame kind and pitch (B, 100, 4), count (B, 3)."""

    def __init__(self, width: int):
        super().__init__()
        self.kind = nn.Linear(width, 1 + len(sounds.KINDS))
        self.pitch = nn.Linear(width, 1 + len(sounds.PITCHES))
        self.count = nn.Linear(width, sounds.MAX_EVENTS)

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kind": self.kind(hidden), "pitch": self.pitch(hidden), "count": self.count(hidden.mean(1))}


def _make_batch(
    n: int,
    rng: random.Random,
    extractor: transformers.WhisperFeatureExtractor,
    allowed: Callable[[Event], bool] | None,
) -> dict[str, torch.Tensor]:
    """``n`` fresh clips: features (n, 40, 200), kind and pitch (n, 100), count (n,) as 0-based classes."""
    clips = [sounds.sample_clip(rng, allowed=allowed) for _ in range(n)]
    waves = np.stack([sounds.synthesize(clip, rng=rng) for clip in clips])
    features = extractor(waves, sampling_rate=sounds.SAMPLE_RATE, return_tensors="np")["input_features"]
    labels = [sounds.frame_labels(clip, N_FRAMES) for clip in clips]
    return {
        "features": torch.from_numpy(features),
        "kind": torch.from_numpy(np.stack([lab["kind"] for lab in labels])),
        "pitch": torch.from_numpy(np.stack([lab["pitch"] for lab in labels])),
        "count": torch.tensor([len(clip.events) - 1 for clip in clips]),
    }


def _loss(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    return (
        ce(logits["kind"].flatten(0, 1), batch["kind"].flatten())
        + ce(logits["pitch"].flatten(0, 1), batch["pitch"].flatten())
        + ce(logits["count"], batch["count"])
    )


@torch.no_grad()
def _evaluate(encoder: nn.Module, heads: _FrameHeads, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-frame kind / pitch accuracy on non-silent frames, silence accuracy, and clip count accuracy."""
    logits = heads(encoder(batch["features"]).last_hidden_state)
    sound = batch["kind"] > 0
    kind_hit = logits["kind"].argmax(-1) == batch["kind"]
    pitch_hit = logits["pitch"].argmax(-1) == batch["pitch"]
    return {
        "kind_accuracy": kind_hit[sound].float().mean().item(),
        "pitch_accuracy": pitch_hit[sound].float().mean().item(),
        "silence_accuracy": kind_hit[~sound].float().mean().item(),
        "count_accuracy": (logits["count"].argmax(-1) == batch["count"]).float().mean().item(),
    }


def pretrain_audio_encoder(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    allowed: Callable[[Event], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train the audio encoder on synthetic clips (only ``allowed`` events) and save it to ``out_dir``.

    Deterministic for a given ``seed``. Writes the Whisper weights (safetensors), its config, the
    feature extractor config and ``pretrain_metrics.json`` (accuracies on fresh held-out clips).
    ``progress(step, steps, {"loss": float})`` is called after every step. Returns ``out_dir``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eval_rng = random.Random(f"{seed}-eval")  # a separate stream: held-out clips never seen in training
    extractor = feature_extractor()

    model = transformers.WhisperModel(audio_config())
    encoder = model.get_encoder()
    heads = _FrameHeads(model.config.d_model)
    params = [p for p in [*encoder.parameters(), *heads.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.01)
    warmup = max(1, int(WARMUP_FRACTION * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))),
    )

    encoder.train()
    heads.train()
    fit_on_clips(lambda batch: _loss(heads(encoder(batch["features"]).last_hidden_state), batch), params, optimizer,
                 schedule, lambda n: _make_batch(n, rng, extractor, allowed), steps, batch_size, progress)
    train_seconds = time.perf_counter() - started

    encoder.eval()
    heads.eval()
    return evaluate_and_save(
        out_dir, model, extractor, lambda batch: _evaluate(encoder, heads, batch),
        lambda n, allowed_: _make_batch(n, eval_rng, extractor, allowed_), allowed,
        {"steps": steps, "batch_size": batch_size, "seed": seed, "eval_clips": EVAL_CLIPS, "train_seconds": train_seconds},
    )


def fit_on_clips(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    steps: int,
    batch_size: int,
    progress: Callable[[int, int, dict], None] | None,
) -> None:
    """The pretraining loop of the world's audio encoders: ``steps`` batches of fresh clips, drawn
    ``make_batch(n)`` CHUNK_BATCHES batches at a time, each a step on ``loss_of(batch)`` with the
    gradient norm clipped at 1; ``progress(step, steps, {"loss": float})`` after every step."""
    chunk: list[dict[str, torch.Tensor]] = []
    for step in range(1, steps + 1):
        if not chunk:
            n = min(CHUNK_BATCHES, steps - step + 1)
            data = make_batch(n * batch_size)
            chunk = [{k: v[i * batch_size : (i + 1) * batch_size] for k, v in data.items()} for i in range(n)]
        loss = loss_of(chunk.pop(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item()})


def evaluate_and_save(
    out_dir: Path,
    model: transformers.PreTrainedModel,
    extractor,
    evaluate: Callable[[dict[str, torch.Tensor]], dict[str, float]],
    make_batch: Callable[[int, Callable[[Event], bool] | None], dict[str, torch.Tensor]],
    allowed: Callable[[Event], bool] | None,
    settings: dict,
) -> Path:
    """Score a world audio encoder on EVAL_CLIPS fresh clips of ``allowed`` events (``make_batch(n,
    allowed)``) and, when ``allowed`` rejects some, on clips of every event (``all_events_*``); save the
    model, its feature extractor and ``pretrain_metrics.json`` (the scores and ``settings``) to ``out_dir``."""
    metrics = evaluate(make_batch(EVAL_CLIPS, allowed))
    if allowed is not None:
        unrestricted = evaluate(make_batch(EVAL_CLIPS, None))
        metrics.update({f"all_events_{k}": v for k, v in unrestricted.items()})
    metrics.update(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bars_off():
        model.save_pretrained(out_dir)
    extractor.save_pretrained(out_dir)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return out_dir
