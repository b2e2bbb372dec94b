"""A small residual-VQ spectrogram codec for the world's 16 kHz sound clips (AnyGPT-style audio tokens).

The waveform's log-magnitude STFT (``n_fft`` 640, hop 160: 10 ms frames, 25 Hz bins) is cut into
groups of ``stride`` frames; a conv encoder turns each group into one latent frame (25 Hz at the
default stride 4), a ``vector_quantize_pytorch.ResidualVQ`` quantizes it with ``num_quantizers``
codebooks, and a conv decoder predicts the group's log-magnitudes back. :meth:`Spectrogram.griffin_lim`
turns magnitudes into a waveform. :func:`pretrain_audio_codec` trains it on fresh world clips.
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
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2FeatureExtractor
from vector_quantize_pytorch import ResidualVQ

from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.codecs.base import MediaCodec
from mmfuse.data.synth import sounds
from mmfuse.data.synth.sounds import Clip, Event

DEFAULT_STEPS = 1000
EVAL_CLIPS = 128
PITCH_TOLERANCE = 0.1  # a decoded event keeps its pitch when its dominant frequency is within 10%
# Augmentation for held-out (kind, pitch) pairs, which training clips never contain: a share
# SHIFT_FRACTION of training clips is resampled (pitch and time scaled together) so that its first
# event's centre frequency moves to a random SHIFT_RANGE frequency. A shift is redrawn while it
# would put any event of the clip within SHIFT_MARGIN (a factor; it covers the 5% pitch jitter) of a
# world pitch at which its kind is not allowed, so a shifted clip never plays a held-out pair. Having
# heard each kind at many pitches, the codec also reproduces the held-out pairs (a low noise, a high
# chirp) instead of snapping them to the nearest familiar sound.
SHIFT_FRACTION = 0.5
SHIFT_RANGE = (120.0, 5500.0)  # Hz
SHIFT_MARGIN = 1.32
SHIFT_MAX_FACTOR = 6.0  # resampling factors beyond 1/6..6 squeeze or stretch events too much


class Spectrogram:
    """Log-magnitude STFT (Hann window, ``center=True``) and Griffin-Lim phase reconstruction.

    ``log_magnitude``: waves (B, S) -> (B, n_fft // 2 + 1, S // hop + 1) = ``log(1 + |STFT| / floor)``
    (silence near 0, a loud tone's peak near 9);
    ``griffin_lim``: that back to waves (B, length) in [-1, 1]. Deterministic: the initial phase is seeded.
    """

    def __init__(self, n_fft: int = 640, hop: int = 160, floor: float = 1e-2, iterations: int = 32):
        self.n_fft, self.hop, self.floor, self.iterations = n_fft, hop, floor, iterations

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def _stft(self, waves: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.n_fft, device=waves.device)
        return torch.stft(waves, self.n_fft, self.hop, window=window, center=True, return_complex=True)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        window = torch.hann_window(self.n_fft, device=spec.device)
        return torch.istft(spec, self.n_fft, self.hop, window=window, center=True, length=length)

    def log_magnitude(self, waves: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self._stft(waves.float()).abs() / self.floor)

    @torch.no_grad()
    def griffin_lim(self, log_magnitude: torch.Tensor, length: int, momentum: float = 0.99) -> torch.Tensor:
        """Fast Griffin-Lim (Perraudin et al. 2013) from log-magnitudes (B, bins, frames); every item
        starts from the same seeded random phase, so an item's wave does not depend on its batch."""
        magnitude = torch.expm1(log_magnitude.float()).clamp_min(0) * self.floor
        generator = torch.Generator().manual_seed(0)
        phase = torch.rand(magnitude.shape[-2:], generator=generator).to(magnitude.device) * 2 * math.pi
        angles, previous = torch.polar(torch.ones_like(magnitude), phase), 0
        for _ in range(self.iterations):
            rebuilt = self._stft(self._istft(magnitude * angles, length))
            angles = rebuilt - momentum / (1 + momentum) * previous
            angles = angles / angles.abs().clamp_min(1e-8)
            previous = rebuilt
        return self._istft(magnitude * angles, length).clamp(-1, 1)


class _ResBlock1d(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, width), nn.GELU(), nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation),
            nn.GroupNorm(8, width), nn.GELU(), nn.Conv1d(width, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SpectrogramDecoder(nn.Module):
    """Latent frames (B, F, dim) -> log-magnitudes (B, bins, F * stride): residual dilated convs at the
    latent rate, then a transposed conv that spreads each latent frame over ``stride`` STFT frames."""

    def __init__(self, dim: int, width: int, bins: int, stride: int, blocks: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(dim, width, 3, padding=1), *[_ResBlock1d(width, 3**i) for i in range(blocks)],
            nn.GroupNorm(8, width), nn.GELU(), nn.ConvTranspose1d(width, bins, stride, stride=stride),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents.transpose(1, 2))


class AudioCodec(MediaCodec):
    """Log-magnitude STFT -> conv encoder -> residual VQ -> conv decoder -> Griffin-Lim.

    One code frame covers ``stride * hop`` samples (640 = 40 ms by default, 50 frames for a 2 s clip);
    each holds ``num_quantizers`` codes of ``codebook_size``.
    """

    modality = "audio"

    def __init__(
        self,
        *,
        sampling_rate: int = sounds.SAMPLE_RATE,
        n_fft: int = 640,
        hop: int = 160,
        stride: int = 4,
        width: int = 256,
        dim: int = 64,
        num_quantizers: int = 4,
        codebook_size: int = 256,
        griffin_lim_iterations: int = 32,
    ):
        super().__init__()
        for name, value in (("n_fft", n_fft), ("hop", hop), ("stride", stride), ("num_quantizers", num_quantizers), ("codebook_size", codebook_size)):
            if value < 1:
                raise ValueError(f"audio codec: {name} must be positive, got {value}")
        self._settings = {
            "kind": "audio", "sampling_rate": sampling_rate, "n_fft": n_fft, "hop": hop, "stride": stride,
            "width": width, "dim": dim, "num_quantizers": num_quantizers, "codebook_size": codebook_size,
            "griffin_lim_iterations": griffin_lim_iterations,
        }
        self.spectrogram = Spectrogram(n_fft, hop, iterations=griffin_lim_iterations)
        self.stride, self.samples_per_frame = stride, stride * hop
        self.codebook_size, self.num_codebooks = codebook_size, num_quantizers
        bins = self.spectrogram.bins
        self.encoder = nn.Sequential(
            nn.Conv1d(bins, width, stride, stride=stride), *[_ResBlock1d(width, 3**i) for i in range(3)],
            nn.GroupNorm(8, width), nn.GELU(), nn.Conv1d(width, dim, 1),
        )
        self.quantizer = ResidualVQ(
            dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, kmeans_init=True,
            decay=0.95, threshold_ema_dead_code=2, commitment_weight=0.25,
        )
        self.decoder = SpectrogramDecoder(dim, width, bins, stride)
        self._processor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=sampling_rate, do_normalize=False, padding_value=0.0
        )

    def settings(self) -> dict:
        return dict(self._settings)

    def processor(self):
        """Raw waveform in, ``input_values`` (samples,) per item, unnormalised."""
        return self._processor

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        if len(item_shape) != 1:
            raise ValueError(f"audio codec: expected waveform items of shape (samples,), got {tuple(item_shape)}")
        return -(-item_shape[0] // self.samples_per_frame)

    def target(self, waves: torch.Tensor) -> torch.Tensor:
        """Waves (B, S) -> log-magnitudes (B, bins, F * stride), S zero-padded to F whole code frames."""
        if waves.dim() != 2:
            raise ValueError(f"audio codec: expected waveforms (items, samples), got shape {tuple(waves.shape)}")
        return code_frame_spectra(self.spectrogram, waves, self.stride)

    def quantize(self, log_magnitude: torch.Tensor, freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-magnitudes (B, bins, F * stride) -> quantized (B, F, dim), codes (B, F, num_quantizers),
        commitment loss (scalar). In training mode the codebooks follow the batch unless ``freeze``."""
        latents = self.encoder(log_magnitude).transpose(1, 2)
        quantized, codes, loss = self.quantizer(latents, freeze_codebook=freeze)
        return quantized, codes, loss.sum()

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Waves (items, samples) -> codes (items, ceil(samples / (stride * hop)), num_quantizers); never
        changes the codebooks, whatever the module's mode."""
        return self.quantize(self.target(inputs), freeze=True)[1]

    def decode_spectrogram(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, F, num_quantizers) -> log-magnitudes (B, bins, F * stride)."""
        if codes.dim() != 3 or codes.shape[2] != self.num_codebooks:
            raise ValueError(f"audio codec: expected codes of shape (items, frames, {self.num_codebooks}), got {tuple(codes.shape)}")
        return self.decoder(self.quantizer.get_output_from_indices(codes))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, F, num_quantizers) -> waves (items, F * stride * hop) in [-1, 1]."""
        return to_wave(self.spectrogram, self.decode_spectrogram(codes))


def spectral_loss(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log-magnitude MSE) between log-magnitudes (B, bins, T). The loss adds the spectral
    convergence ``||expm1(predicted) - expm1(target)|| / ||expm1(target)||`` per item (linear
    magnitudes): the log MSE alone averages a narrow peak whose exact bin is uncertain (a high tone's
    5% jitter spans 10 bins) into a faint plateau, and the decoded event would be near silent."""
    mse = F.mse_loss(predicted, target)
    linear, reference = torch.expm1(predicted.clamp(max=14)).flatten(1), torch.expm1(target).flatten(1)
    convergence = (linear - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1.0)
    return mse + convergence.mean(), mse


def code_frame_spectra(spectrogram: Spectrogram, waves: torch.Tensor, stride: int) -> torch.Tensor:
    """Waves (B, S) -> log-magnitudes (B, bins, F * stride) of F = ceil(S / (stride * hop)) whole code
    frames (S zero-padded; ``center=True``'s final STFT frame dropped)."""
    samples_per_frame = stride * spectrogram.hop
    frames = -(-waves.shape[1] // samples_per_frame)
    waves = F.pad(waves, (0, frames * samples_per_frame - waves.shape[1]))
    return spectrogram.log_magnitude(waves)[..., : frames * stride]


def to_wave(spectrogram: Spectrogram, log_magnitude: torch.Tensor) -> torch.Tensor:
    """Log-magnitudes (B, bins, T) of whole code frames -> waves (B, T * hop): the final STFT frame
    (``center=True`` has T + 1) repeats the last one."""
    full = torch.cat([log_magnitude, log_magnitude[..., -1:]], dim=-1)
    return spectrogram.griffin_lim(full, log_magnitude.shape[-1] * spectrogram.hop)


def world_clips(
    rng: random.Random, n: int, allowed: Callable[[Event], bool] | None = None, *, n_events: int | None = None, shifted: float = 0.0
) -> tuple[list[Clip], torch.Tensor]:
    """``n`` fresh clips of events passing ``allowed`` and their waves (n, 32000), jittered and noisy.
    A share ``shifted`` of the waves is resampled by :func:`shift_factor` around the first event's
    start (which stays in the clip); their clips then name the events' kinds but not their pitches."""
    clips = [sounds.sample_clip(rng, n_events=n_events, allowed=allowed) for _ in range(n)]
    waves = [sounds.synthesize(clip, rng=rng) for clip in clips]
    for i, clip in enumerate(clips):
        if rng.random() < shifted:
            factor = shift_factor(rng, clip, allowed)
            positions, anchor = np.arange(len(waves[i])), clip.events[0].start * sounds.SAMPLE_RATE
            waves[i] = np.interp(anchor + (positions - anchor) * factor, positions, waves[i], left=0.0, right=0.0).astype(np.float32)
    return clips, torch.from_numpy(np.stack(waves))


def shift_factor(rng: random.Random, clip: Clip, allowed: Callable[[Event], bool] | None = None) -> float:
    """A pitch-shift factor moving the clip's first event to a random ``SHIFT_RANGE`` frequency, such
    that no event lands within ``SHIFT_MARGIN`` of a world pitch its kind is not ``allowed`` at."""
    low, high = (math.log(f) for f in SHIFT_RANGE)
    first = sounds.PITCH_HZ[clip.events[0].pitch]
    while True:
        factor = math.exp(rng.uniform(low, high)) / first
        if not 1 / SHIFT_MAX_FACTOR <= factor <= SHIFT_MAX_FACTOR:
            continue
        near = [
            (event, pitch) for event in clip.events for pitch, hz in sounds.PITCH_HZ.items()
            if abs(math.log(sounds.PITCH_HZ[event.pitch] * factor / hz)) < math.log(SHIFT_MARGIN)
        ]
        if allowed is None or all(allowed(Event(e.kind, pitch, e.duration, 0.0)) for e, pitch in near):
            return factor


def dominant_frequency(wave: np.ndarray, event: Event, sampling_rate: int = sounds.SAMPLE_RATE) -> float:
    """The power-weighted mean log-frequency (Hz) of ``event``'s span of ``wave``, over spectrum bins
    within 20 dB of the peak: the tone's frequency, the noise band's centre, the chirp's sweep middle."""
    margin = sounds.FADE_SECONDS
    segment = wave[int((event.start + margin) * sampling_rate) : int((event.end - margin) * sampling_rate)]
    power = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), n=1 << 15)) ** 2
    freqs = np.fft.rfftfreq(1 << 15, 1 / sampling_rate)
    keep = (power >= power.max() / 100) & (freqs > 0)
    return float(2 ** ((np.log2(freqs[keep]) * power[keep]).sum() / power[keep].sum()))


def pitch_metrics(originals: np.ndarray, decoded: np.ndarray, clips: list[Clip]) -> dict[str, dict[str, float]]:
    """Each event's relative error ``|f_decoded - f_original| / f_original`` of its dominant frequency,
    over waves (B, S): ``pitch_kept`` is the share within ``PITCH_TOLERANCE``, ``pitch_median_error``
    the median, each for all events and per kind."""
    errors: dict[str, list[float]] = {kind: [] for kind in sounds.KINDS}
    for original, out, clip in zip(originals, decoded, clips):
        for event in clip.events:
            reference = dominant_frequency(original, event)
            errors[event.kind].append(abs(dominant_frequency(out, event) - reference) / reference)
    groups = {"all": [e for kind in errors.values() for e in kind], **{k: v for k, v in errors.items() if v}}
    return {
        "pitch_kept": {k: round(float(np.mean(np.asarray(v) <= PITCH_TOLERANCE)), 4) for k, v in groups.items()},
        "pitch_median_error": {k: round(float(np.median(v)), 4) for k, v in groups.items()},
    }


def pretrain_audio_codec(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    lr: float = 3e-3,
    codec_settings: dict | None = None,
    allowed: Callable[[Event], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train an :class:`AudioCodec` (``codec_settings`` override its defaults) on fresh world clips of
    ``allowed`` events to reconstruct their log-magnitude spectrograms (:func:`spectral_loss` plus the
    RVQ commitment loss), and save it with ``save_codec``.

    Deterministic for a given seed and thread count. ``pretrain_metrics.json`` holds, on
    ``EVAL_CLIPS`` fresh clips: the log-magnitude MSE, the share of events whose decoded waveform
    keeps its dominant frequency within 10% (``pitch_kept``, per kind too), the median relative
    frequency error and each codebook's share of codes in use; ``held_out_events`` the same on
    one-event clips of the events ``allowed`` rejects, if any. A share ``SHIFT_FRACTION`` of the
    training clips is pitch-shifted (see :func:`shift_factor`).
    ``progress(step, steps, {"loss": float, "mse": float})`` is called after every step.
    """
    from mmfuse.codecs import save_codec

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    codec = AudioCodec(**(codec_settings or {}))
    optimizer = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    codec.train()
    for step in range(1, steps + 1):
        target = codec.target(world_clips(rng, batch_size, allowed, shifted=SHIFT_FRACTION)[1])
        quantized, _, commitment = codec.quantize(target)
        spectral, mse = spectral_loss(codec.decoder(quantized), target)
        loss = spectral + commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item(), "mse": mse.item()})
    train_seconds = time.perf_counter() - start

    codec.eval()
    eval_rng = random.Random(f"audio_codec-eval-{seed}")
    metrics = {"seed": seed, "steps": steps, "batch_size": batch_size, "train_seconds": round(train_seconds, 1), "eval_clips": EVAL_CLIPS}
    metrics.update(evaluate_audio(codec, *world_clips(eval_rng, EVAL_CLIPS, allowed)))
    if allowed is not None:
        held_out = lambda e: not allowed(e)  # noqa: E731
        metrics["held_out_events"] = evaluate_audio(codec, *world_clips(eval_rng, EVAL_CLIPS, held_out, n_events=1))
    out_dir = save_codec(codec, out_dir)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


@torch.no_grad()
def evaluate_audio(codec: AudioCodec, clips: list[Clip], waves: torch.Tensor, batch: int = 64) -> dict:
    """Log-magnitude MSE of the round trip, :func:`pitch_metrics` of the decoded waves, codebook usage."""
    codes = torch.cat([codec.encode(waves[i : i + batch]) for i in range(0, len(waves), batch)])
    spectra = torch.cat([codec.decode_spectrogram(codes[i : i + batch]) for i in range(0, len(codes), batch)])
    decoded = torch.cat([to_wave(codec.spectrogram, spectra[i : i + batch]) for i in range(0, len(spectra), batch)])
    usage = [codes[..., q].unique().numel() / codec.codebook_size for q in range(codec.num_codebooks)]
    return {
        "log_magnitude_mse": round(F.mse_loss(spectra, codec.target(waves)).item(), 4),
        **pitch_metrics(waves.numpy(), decoded.numpy(), clips),
        "codebook_usage": [round(u, 4) for u in usage],
    }
