"""Probe classifiers that judge generated world media: what does a generated image or sound show?

Type-D models draw images ("a large red circle at the top left") and make sounds ("a long high
tone"). To score them we need judges that know the world but are not the model under test:
:class:`ImageProbe` (a small CNN over a ``(n, 3, 48, 48)`` image in ``[0, 1]``) names the colour,
shape, size and grid cell of a ONE-object scene; :class:`AudioProbe` (a small CNN over a
log-frequency magnitude spectrogram computed with ``torch.stft``) names the kind, pitch and
duration of a ONE-event clip. ``probe.predict(media)`` returns ``{attribute: [name per item]}``.

Training (:func:`train_image_probe`, :func:`train_audio_probe`) uses only REAL rendered world media,
freshly sampled and seeded at every step, and covers every attribute combination, the held-out
(colour, shape) and (kind, pitch) pairs of :mod:`mmfuse.data.synth.heldout` included: a probe is a
judge, not a model under test, and it must recognise a held-out pair that a model draws. A share of
every batch is empty (background only / silence) with the target ``"none"`` for every attribute, so
an empty image or a silent clip is predicted ``"none"`` rather than a specific object.

Generated media come out of lossy codecs (a 6x6-latent VQ autoencoder for images, a spectrogram
codec with Griffin-Lim phase reconstruction for audio), so training degrades most examples
(:func:`degrade_images`, :func:`degrade_waves`, :func:`smear_bands`): images are rescaled and
shifted by a pixel or two, blurred, resampled through a lower resolution, desaturated, faded,
colour-jittered and noised; sounds get random loudness, Griffin-Lim re-synthesis (random phase
start, 0-4 iterations, several FFT sizes), spectral smearing and noise. The image probe also sees
its input only at 24x24. It therefore reads the object's mean colour and outline, and a sound's band
and time course, not pixel-exact edges or phase. Where a codec really loses the information (a small
square decoded as a round blob) the probe reports what the decoded image shows.

Training and prediction run on one CPU thread (restored after): the probes are tiny, and on a busy
machine torch's extra intra-op threads made training up to 10x slower.

:func:`load_probe` trains a probe on first use and caches it (``model.safetensors`` plus
``probe.json`` with its settings and metrics) under ``cache_dir() / "world" / "probes" /
<modality>`` (``<modality>-steps<scale>`` when ``MMFUSE_WORLD_STEPS_SCALE`` is not 1), written to a
temporary directory and renamed into place; a scale below 1 also evaluates on proportionally fewer
items (at least 16). :func:`probe_metrics` returns the saved accuracies.
``python -m mmfuse.eval.probes`` prints them (training the probes first if needed).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.data.synth import scenes, sounds
from mmfuse.data.synth.heldout import event_is_heldout, sample_heldout, scene_is_heldout
from mmfuse.modes import one_cpu_thread

__all__ = [
    "AudioProbe", "ImageProbe", "NONE", "build_probe", "degrade_images", "degrade_waves", "griffin_lim",
    "load_probe", "probe_dir", "probe_metrics", "smear_bands", "train_audio_probe", "train_image_probe",
]

NONE = "none"  # the class of every attribute for an empty image / a silent clip
MODALITIES = ("image", "audio")
PROBE_VERSION = 1  # bump when a probe's architecture, features or training change: stale caches are retrained
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "probe.json"

IMAGE_ATTRIBUTES = {
    "colour": scenes.COLOURS, "shape": scenes.SHAPES, "size": scenes.SIZES, "cell": scenes.CELL_NAMES,
}
AUDIO_ATTRIBUTES = {"kind": sounds.KINDS, "pitch": sounds.PITCHES, "duration": sounds.DURATIONS}
IMAGE_STEPS = 400
AUDIO_STEPS = 120
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
EMPTY_FRACTION = 0.1  # share of each training batch that is empty (target "none")
CLEAN_FRACTION = 0.15  # share of each training batch passed without degradation
EVAL_ITEMS = 512
GRIFFIN_LIM_EVAL_ITEMS = 128  # Griffin-Lim re-synthesis is slow: the audio probe's codec-like check uses fewer clips
GRIFFIN_LIM_EVAL_ITERATIONS = 8

# audio features: |STFT| pooled into log-spaced frequency bands, log-compressed
N_FFT = 1024
HOP = 512
N_BANDS = 48
F_MIN, F_MAX = 120.0, 6000.0
CLIP_SAMPLES = int(round(sounds.CLIP_SECONDS * sounds.SAMPLE_RATE))
LENGTH_TOLERANCE = int(0.1 * sounds.SAMPLE_RATE)  # clips this much shorter / longer are padded / cropped
GRIFFIN_LIM_FRACTION = 0.1  # share of training clips re-synthesised by Griffin-Lim (the costly part)
LOG_FLOOR = 1e-4  # amplitude floor of the log spectrogram (a unit sine has amplitude 1)


def _classes(attributes: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {name: (*values, NONE) for name, values in attributes.items()}


class _Probe(nn.Module):
    """Shared ``predict`` / ``probabilities`` of a probe with one classification head per attribute."""

    modality = ""
    attributes: dict[str, tuple[str, ...]] = {}

    @property
    def classes(self) -> dict[str, tuple[str, ...]]:
        """Attribute -> class names; the last class of each is :data:`NONE`."""
        return _classes(self.attributes)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _prepare(self, media) -> torch.Tensor:
        """Validate ``media`` and return it as a float CPU tensor in the probe's input layout."""
        raise NotImplementedError

    def logits(self, media) -> dict[str, torch.Tensor]:
        """Media -> ``{attribute: (n, classes) logits}``; differentiable (no ``no_grad``), on the probe's device."""
        return self(self._prepare(media).to(self._device))

    @torch.no_grad()
    def probabilities(self, media, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Media -> ``{attribute: (n, classes) softmax probabilities}`` in :attr:`classes` order (CPU),
        computed in eval mode ``batch_size`` items at a time."""
        x = self._prepare(media)
        was_training = self.training
        self.eval()
        try:
            with one_cpu_thread():
                parts = [self(x[i : i + batch_size].to(self._device)) for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return {name: torch.cat([p[name] for p in parts]).softmax(-1).cpu() for name in parts[0]}

    def predict(self, media) -> dict[str, list[str]]:
        """Media -> ``{attribute: [predicted class name per item]}``; ``"none"`` means no object / sound."""
        return {
            name: [self.classes[name][i] for i in probs.argmax(-1).tolist()]
            for name, probs in self.probabilities(media).items()
        }


def _as_float_tensor(media, what: str) -> torch.Tensor:
    x = torch.as_tensor(media) if not isinstance(media, torch.Tensor) else media
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected float values, got dtype {x.dtype} (convert uint8 pixels with x / 255)")
    return x.detach().float().cpu()


# ----------------------------------------------------------------------------------------------- image


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ImageProbe(_Probe):
    """A small CNN over ``(n, 3, 48, 48)`` images in ``[0, 1]``: colour, shape, size and cell of one object.

    The image is first area-averaged to 24x24, so the probe cannot rely on pixel-exact edges. Colour,
    shape and size come from globally max- and mean-pooled features (position-invariant); the cell
    also sees a coarse 6x6 map of where the features fire.
    """

    modality = "image"
    attributes = IMAGE_ATTRIBUTES

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()
        self.settings = {"width": width, "hidden": hidden}
        self.register_buffer("background", torch.tensor(scenes.BACKGROUND_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 255)
        self.features = nn.Sequential(
            nn.AvgPool2d(2),  # 24
            *_conv(3, width), nn.MaxPool2d(2),  # 12
            *_conv(width, 2 * width), nn.MaxPool2d(2),  # 6
            *_conv(2 * width, 2 * width),
        )
        self.where = nn.Conv2d(2 * width, 4, 1)
        side = scenes.IMAGE_SIZE // 8
        self.trunk = nn.Sequential(nn.Linear(4 * width + 4 * side * side, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(c)) for name, c in self.classes.items()})

    def _prepare(self, images) -> torch.Tensor:
        x = _as_float_tensor(images, "ImageProbe")
        expected = (3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ImageProbe: expected images of shape (n, {', '.join(map(str, expected))}) in [0, 1], got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("ImageProbe: got an empty batch (n = 0)")
        if not torch.isfinite(x).all():
            raise ValueError("ImageProbe: images contain NaN or infinite values")
        return x.clamp(0, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features((images - self.background) * 4)
        pooled = torch.cat([h.amax((2, 3)), h.mean((2, 3)), self.where(h).flatten(1)], 1)
        z = self.trunk(pooled)
        return {name: head(z) for name, head in self.heads.items()}


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2 * radius + 1) normalised 1-D Gaussians; sigma 0 gives the identity kernel."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps / sigmas.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur(x: torch.Tensor, sigma_y: torch.Tensor, sigma_x: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-item separable Gaussian blur of ``x`` (n, c, h, w) with replicate padding."""
    n, c, h, w = x.shape
    ky = _gaussian_kernels(sigma_y, radius).repeat_interleave(c, 0).view(n * c, 1, -1, 1)
    kx = _gaussian_kernels(sigma_x, radius).repeat_interleave(c, 0).view(n * c, 1, 1, -1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), ky, groups=n * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kx, groups=n * c)
    return y.view(n, c, h, w)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def degrade_images(images: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Codec-like damage to ``images`` (n, 3, H, W) in [0, 1], drawn per item from ``gen``.

    A rescale by up to 8% and a shift of up to 2 px, a blur of sigma up to 1.6 px (most items), a
    round trip through a 2-4x lower resolution (a third), desaturation and fading towards the
    background, a per-channel colour gain / offset and pixel noise. ``strength``
    scales every amount (0: unchanged).
    """
    n = images.shape[0]
    bg = torch.tensor(scenes.BACKGROUND_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 255
    scale = 1 + strength * _uniform(n, -0.08, 0.08, gen)  # object size x0.92-1.08
    shift = strength * _uniform(2 * n, -2.0, 2.0, gen).view(n, 2) * (2 / images.shape[-1])  # up to 2 px
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
    blurred = torch.rand(n, generator=gen) < 0.75
    sigma = torch.where(blurred, _uniform(n, 0.3, 1.6, gen), torch.zeros(n)) * strength
    out = _blur(out, sigma, sigma, radius=4)
    low = torch.rand(n, generator=gen) < 0.35 * min(strength, 1.0)
    if low.any():
        factor = int(torch.randint(2, 5, (1,), generator=gen))
        size = images.shape[-1]
        small = F.interpolate(out[low], size=size // factor, mode="area")
        out[low] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    grey = out.mean(1, keepdim=True)  # desaturate by up to 25%, then fade towards the background by up to 15%
    out = grey + (1 - strength * _uniform(n, 0.0, 0.25, gen).view(n, 1, 1, 1)) * (out - grey)
    out = bg + (1 - strength * _uniform(n, 0.0, 0.15, gen).view(n, 1, 1, 1)) * (out - bg)
    gain = 1 + strength * _uniform(n * 3, -0.08, 0.08, gen).view(n, 3, 1, 1)
    offset = strength * _uniform(n * 3, -0.04, 0.04, gen).view(n, 3, 1, 1)
    noise = strength * _uniform(n, 0.0, 0.04, gen).view(n, 1, 1, 1) * torch.randn(out.shape, generator=gen)
    return (out * gain + offset + noise).clamp(0, 1)


def _image_batch(
    n: int, rng: random.Random, *, heldout: bool = False, empty_fraction: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh one-object scenes (``empty_fraction`` of them empty): images (n, 3, 48, 48) in [0, 1]
    and class indices per attribute (the last class, "none", for empty images)."""
    classes = _classes(IMAGE_ATTRIBUTES)
    images, labels = [], {name: [] for name in IMAGE_ATTRIBUTES}
    for _ in range(n):
        if empty_fraction and rng.random() < empty_fraction:
            scene = scenes.Scene([])
            for name in labels:
                labels[name].append(len(classes[name]) - 1)
        else:
            if heldout:
                scene = sample_heldout(lambda r: scenes.sample_scene(r, n_shapes=1), scene_is_heldout, rng)
            else:
                scene = scenes.sample_scene(rng, n_shapes=1)
            s = scene.shapes[0]
            labels["colour"].append(scenes.COLOURS.index(s.colour))
            labels["shape"].append(scenes.SHAPES.index(s.shape))
            labels["size"].append(scenes.SIZES.index(s.size))
            labels["cell"].append(s.cell)
        images.append(scenes.render_array(scene))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, {name: torch.tensor(v) for name, v in labels.items()}


# ----------------------------------------------------------------------------------------------- audio


def _band_filters(n_fft: int = N_FFT, sample_rate: int = sounds.SAMPLE_RATE) -> torch.Tensor:
    """(N_BANDS, n_fft // 2 + 1) triangular filters, log-spaced from F_MIN to F_MAX, rows summing to 1.
    A band narrower than one FFT bin is widened to a bin, so none is empty."""
    freqs = torch.fft.rfftfreq(n_fft, 1 / sample_rate).double()
    centres = torch.linspace(math.log2(F_MIN), math.log2(F_MAX), N_BANDS, dtype=torch.float64)
    spacing = float(centres[1] - centres[0])
    bin_hz = sample_rate / n_fft
    width = torch.clamp(torch.log2((2**centres + bin_hz) / 2**centres), min=spacing)
    logf = torch.log2(freqs.clamp_min(1.0))
    w = (1 - (logf[None, :] - centres[:, None]).abs() / width[:, None]).clamp_min(0)
    w[:, 0] = 0  # no DC
    return (w / w.sum(1, keepdim=True)).float()


def _power(waves: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT|^2 (n, n_fft // 2 + 1, frames), scaled so a unit-amplitude sine's peak is about 1."""
    window = torch.hann_window(n_fft)
    spec = torch.view_as_real(torch.stft(waves, n_fft, hop, window=window, center=True, return_complex=True))
    return spec.square().sum(-1) * (2 / window.sum()) ** 2


def griffin_lim(
    waves: torch.Tensor, gen: torch.Generator, *, n_fft: int = 512, hop: int = 128, iterations: int = 8
) -> torch.Tensor:
    """Re-synthesise ``waves`` (n, samples) from their STFT magnitude alone: random initial phase,
    ``iterations`` Griffin-Lim updates (0 keeps the random phase). Mimics a magnitude-only audio codec."""
    with one_cpu_thread():
        window = torch.hann_window(n_fft)
        length = waves.shape[-1]
        mag = torch.stft(waves, n_fft, hop, window=window, center=True, return_complex=True).abs()
        phase = torch.polar(torch.ones_like(mag), 2 * math.pi * torch.rand(mag.shape, generator=gen))
        for _ in range(iterations):
            x = torch.istft(mag * phase, n_fft, hop, window=window, center=True, length=length)
            spec = torch.view_as_real(torch.stft(x, n_fft, hop, window=window, center=True, return_complex=True))
            phase = torch.view_as_complex(spec / spec.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-8))
        return torch.istft(mag * phase, n_fft, hop, window=window, center=True, length=length)


class AudioProbe(_Probe):
    """A 1-D CNN over a 48-band log-frequency log-magnitude spectrogram (63 frames of 32 ms for 2 s):
    kind, pitch and duration of one sound. The bands are the input channels (pitch is where the energy
    is; kind is its width, steadiness and sweep), three temporal convs and max + mean pooling over time
    give presence and extent (duration)."""

    modality = "audio"
    attributes = AUDIO_ATTRIBUTES

    def __init__(self, width: int = 96, hidden: int = 128):
        super().__init__()
        self.settings = {"width": width, "hidden": hidden}
        self.register_buffer("filters", _band_filters(), persistent=False)
        self.conv = nn.Sequential(
            nn.Conv1d(N_BANDS, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        )
        self.trunk = nn.Sequential(nn.Linear(2 * width, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(c)) for name, c in self.classes.items()})

    def _prepare(self, waves) -> torch.Tensor:
        x = _as_float_tensor(waves, "AudioProbe")
        if x.ndim != 2:
            raise ValueError(f"AudioProbe: expected mono waveforms of shape (n, samples), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("AudioProbe: got an empty batch (n = 0)")
        if abs(x.shape[1] - CLIP_SAMPLES) > LENGTH_TOLERANCE:
            raise ValueError(
                f"AudioProbe: expected {CLIP_SAMPLES} samples per clip ({sounds.CLIP_SECONDS:g} s at "
                f"{sounds.SAMPLE_RATE} Hz, ±{LENGTH_TOLERANCE} tolerated), got {x.shape[1]}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("AudioProbe: waveforms contain NaN or infinite values")
        x = x[:, :CLIP_SAMPLES]
        return F.pad(x, (0, CLIP_SAMPLES - x.shape[1])).clamp(-1, 1)

    def bands(self, waves: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> band magnitudes (n, N_BANDS, frames): the RMS of |STFT| over each band's filter."""
        return (self.filters @ _power(waves, N_FFT, HOP)).sqrt()

    def classify(self, bands: torch.Tensor) -> dict[str, torch.Tensor]:
        """Band magnitudes (n, N_BANDS, frames) -> logits per attribute."""
        x = (torch.log(bands + LOG_FLOOR) - math.log(LOG_FLOOR)) / 4  # 0 at silence, about 2.3 for a unit sine
        h = self.conv(x)
        z = self.trunk(torch.cat([h.amax(-1), h.mean(-1)], 1))
        return {name: head(z) for name, head in self.heads.items()}

    def forward(self, waves: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.bands(waves))


def degrade_waves(waves: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Codec-like damage to ``waves`` (n, samples): loudness x0.4-2, Griffin-Lim re-synthesis of a
    ``GRIFFIN_LIM_FRACTION`` share (random initial phase, FFT 256-1024, 0-4 iterations: at least as
    smeared as a real Griffin-Lim decoder) and faint added noise. ``strength`` 0 leaves them unchanged."""
    n = waves.shape[0]
    out = waves * torch.exp(strength * _uniform(n, math.log(0.4), math.log(2.0), gen)).view(n, 1)
    redo = torch.rand(n, generator=gen) < GRIFFIN_LIM_FRACTION * min(strength, 1.0)
    if redo.any():
        n_fft = int(2 ** torch.randint(8, 11, (1,), generator=gen))
        iterations = int(torch.randint(0, 5, (1,), generator=gen))
        out[redo] = griffin_lim(out[redo], gen, n_fft=n_fft, hop=n_fft // 4, iterations=iterations)
    noise = strength * torch.exp(_uniform(n, math.log(1e-4), math.log(5e-3), gen)).view(n, 1)
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def smear_bands(bands: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Spectral smearing of band magnitudes (n, N_BANDS, frames): per-clip Gaussian blur across bands
    (sigma up to 1.2) and time (up to 1.5 frames), a small per-band gain ripple and a noise floor."""
    n, b, t = bands.shape
    sf = strength * _uniform(n, 0.0, 1.2, gen)
    st = strength * _uniform(n, 0.0, 1.5, gen)
    out = _blur(bands.unsqueeze(1), sf, st, radius=3).squeeze(1)
    ripple = torch.exp(strength * 0.15 * torch.randn(n, b, 1, generator=gen))
    floor = strength * torch.exp(_uniform(n, math.log(1e-5), math.log(2e-3), gen)).view(n, 1, 1)
    return (out * ripple + floor * torch.rand(out.shape, generator=gen)).clamp_min(0)


def _audio_batch(
    n: int, rng: random.Random, *, heldout: bool = False, empty_fraction: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh one-event clips (``empty_fraction`` of them silent, i.e. background noise only):
    waveforms (n, 32000) and class indices per attribute ("none" for silence)."""
    classes = _classes(AUDIO_ATTRIBUTES)
    waves, labels = [], {name: [] for name in AUDIO_ATTRIBUTES}
    for _ in range(n):
        if empty_fraction and rng.random() < empty_fraction:
            clip = sounds.Clip([])
            for name in labels:
                labels[name].append(len(classes[name]) - 1)
        else:
            if heldout:
                clip = sample_heldout(lambda r: sounds.sample_clip(r, n_events=1), lambda c: event_is_heldout(c.events[0]), rng)
            else:
                clip = sounds.sample_clip(rng, n_events=1)
            e = clip.events[0]
            labels["kind"].append(sounds.KINDS.index(e.kind))
            labels["pitch"].append(sounds.PITCHES.index(e.pitch))
            labels["duration"].append(sounds.DURATIONS.index(e.duration))
        waves.append(sounds.synthesize(clip, rng=rng))
    return torch.from_numpy(np.stack(waves)), {name: torch.tensor(v) for name, v in labels.items()}


# -------------------------------------------------------------------------------------------- training


def _accuracy(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: round((logits[name].argmax(-1) == labels[name]).float().mean().item(), 4) for name in labels}


def _train(
    probe: _Probe,
    make_batch: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    degraded: Callable[[_Probe, torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
    *,
    seed: int,
    steps: int,
    batch_size: int,
    eval_items: int,
    progress: Callable[[int, int, dict], None] | None,
    extra_eval: Callable[[_Probe, torch.Tensor, dict[str, torch.Tensor], torch.Generator], dict] | None = None,
) -> dict:
    """Train ``probe`` in place on ``make_batch`` items, ``degraded(probe, media, gen)`` giving the logits
    of damaged media (a random CLEAN_FRACTION of each batch is passed clean instead); returns metrics."""
    if steps < 1 or batch_size < 1 or eval_items < 4:
        raise ValueError(f"steps and batch_size must be positive and eval_items >= 4, got steps={steps}, "
                         f"batch_size={batch_size}, eval_items={eval_items}")
    started = time.perf_counter()
    rng = random.Random(f"probe-{probe.modality}-{seed}")
    gen = torch.Generator().manual_seed(seed)
    params = list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, steps)
    probe.train()
    for step in range(1, steps + 1):
        media, labels = make_batch(batch_size, rng, empty_fraction=EMPTY_FRACTION)
        clean = int((torch.rand(batch_size, generator=gen) < CLEAN_FRACTION).sum())  # the first `clean` stay clean
        if clean == batch_size:
            logits = probe(media)
        else:
            damaged = degraded(probe, media[clean:], gen)
            logits = probe(media[:clean]) if clean else None
            logits = damaged if logits is None else {k: torch.cat([logits[k], damaged[k]]) for k in damaged}
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item()})
    train_seconds = time.perf_counter() - started

    probe.eval()
    eval_rng = random.Random(f"probe-{probe.modality}-{seed}-eval")  # a separate stream: items never trained on
    eval_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        media, labels = make_batch(eval_items, eval_rng)
        metrics = {"accuracy": _accuracy(probe(media), labels)}
        metrics["degraded_accuracy"] = _accuracy(degraded(probe, media, eval_gen), labels)
        if extra_eval is not None:
            metrics.update(extra_eval(probe, media, labels, eval_gen))
        media, labels = make_batch(eval_items // 2, eval_rng, heldout=True)
        metrics["heldout_accuracy"] = _accuracy(probe(media), labels)
        empty, _ = make_batch(eval_items // 4, eval_rng, empty_fraction=1.0)
        predicted = probe.predict(empty)
        metrics["empty_predicted_none"] = round(float(np.mean([p == NONE for p in predicted[next(iter(predicted))]])), 4)
    metrics.update({
        "steps": steps, "batch_size": batch_size, "seed": seed, "eval_items": eval_items,
        "train_seconds": round(train_seconds, 2),
        "trained_on": "all attribute combinations, held-out pairs included; one object / event per item, "
                      f"{EMPTY_FRACTION:.0%} empty",
    })
    return metrics


def _image_degraded(probe: ImageProbe, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return probe(degrade_images(images, gen))


def _audio_degraded(probe: AudioProbe, waves: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return probe.classify(smear_bands(probe.bands(degrade_waves(waves, gen)), gen))


def _griffin_lim_eval(probe: AudioProbe, waves: torch.Tensor, labels: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    """Accuracy on clips re-synthesised from their magnitude by a proper Griffin-Lim (a codec stand-in)."""
    n = min(GRIFFIN_LIM_EVAL_ITEMS, waves.shape[0])
    redone = griffin_lim(waves[:n], gen, n_fft=512, hop=128, iterations=GRIFFIN_LIM_EVAL_ITERATIONS)
    return {"griffin_lim_accuracy": _accuracy(probe(redone), {k: v[:n] for k, v in labels.items()})}


def train_image_probe(
    *,
    seed: int = 0,
    steps: int = IMAGE_STEPS,
    batch_size: int = BATCH_SIZE,
    eval_items: int | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[ImageProbe, dict]:
    """Train an :class:`ImageProbe` on fresh seeded one-object world scenes, most degraded like codec output.

    Deterministic for a given seed (training runs on one CPU thread); the caller's torch RNG and
    thread setting are left untouched.
    ``progress(step, steps, {"loss": float})`` is called after every step. Returns the probe (eval
    mode) and metrics on fresh items from a separate stream: per-attribute ``accuracy`` (clean
    scenes, all combinations), ``degraded_accuracy`` (the same through :func:`degrade_images`),
    ``heldout_accuracy`` (held-out (colour, shape) pairs only), ``empty_predicted_none`` (share of
    empty images predicted "none"), plus steps, batch size, seed and ``train_seconds``.
    """
    eval_items = EVAL_ITEMS if eval_items is None else eval_items
    with torch.random.fork_rng(devices=[]), one_cpu_thread():
        torch.manual_seed(seed)
        probe = ImageProbe()
        metrics = _train(probe, _image_batch, _image_degraded, seed=seed, steps=steps, batch_size=batch_size,
                         eval_items=eval_items, progress=progress)
    return probe, metrics


def train_audio_probe(
    *,
    seed: int = 0,
    steps: int = AUDIO_STEPS,
    batch_size: int = BATCH_SIZE,
    eval_items: int | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[AudioProbe, dict]:
    """Train an :class:`AudioProbe` on fresh seeded one-event world clips, most degraded like codec output.

    As :func:`train_image_probe`; ``degraded_accuracy`` uses :func:`degrade_waves` and
    :func:`smear_bands`, ``heldout_accuracy`` the held-out (kind, pitch) pairs, and
    ``griffin_lim_accuracy`` clips re-synthesised by an 8-iteration Griffin-Lim from random phase (up to 128 clips).
    """
    eval_items = EVAL_ITEMS if eval_items is None else eval_items
    with torch.random.fork_rng(devices=[]), one_cpu_thread():
        torch.manual_seed(seed)
        probe = AudioProbe()
        metrics = _train(probe, _audio_batch, _audio_degraded, seed=seed, steps=steps, batch_size=batch_size,
                         eval_items=eval_items, progress=progress, extra_eval=_griffin_lim_eval)
    return probe, metrics


# ------------------------------------------------------------------------------------------------ cache

_PROBES = {"image": (ImageProbe, train_image_probe, IMAGE_STEPS), "audio": (AudioProbe, train_audio_probe, AUDIO_STEPS)}
SEED = 0


def _entry(modality: str):
    if modality not in _PROBES:
        raise ValueError(f"unknown probe modality {modality!r}; expected one of {MODALITIES}")
    return _PROBES[modality]


def probe_dir(modality: str) -> Path:
    """Where the ``modality`` probe is (or will be) cached under the current steps scale."""
    from mmfuse.backbones.world import cache_dir, scaled_leaf

    _entry(modality)
    return cache_dir() / "world" / "probes" / scaled_leaf(modality)


def _read_info(directory: Path) -> dict | None:
    try:
        info = json.loads((directory / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    if info.get("version") != PROBE_VERSION or not (directory / WEIGHTS_NAME).is_file():
        return None
    return info


def build_probe(modality: str, force: bool = False) -> Path:
    """Return the ``modality`` probe's cached directory, training it (again, with ``force``) when needed."""
    from mmfuse.backbones.world import build_progress, steps_scale

    _, train, default_steps = _entry(modality)
    target = probe_dir(modality)
    if not force and _read_info(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with build_progress(f"{modality} probe") as progress:
            scale = steps_scale()
            eval_items = EVAL_ITEMS if scale >= 1 else max(16, round(EVAL_ITEMS * scale))  # a quick build, a quick check
            probe, metrics = train(seed=SEED, steps=max(1, round(default_steps * scale)), eval_items=eval_items, progress=progress)
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        info = {"version": PROBE_VERSION, "modality": modality, "settings": probe.settings,
                "classes": {k: list(v) for k, v in probe.classes.items()}, "metrics": metrics}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if target.exists():
            if not force and _read_info(target) is not None:  # another process finished first; keep its build
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "probe")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_probe(modality: str) -> ImageProbe | AudioProbe:
    """The cached ``"image"`` or ``"audio"`` probe (eval mode), trained and saved on first use.
    The caller's torch RNG is left untouched."""
    cls = _entry(modality)[0]
    directory = build_probe(modality)
    info = _read_info(directory)
    probe = cls(**info["settings"])
    probe.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return probe.eval()


def probe_metrics(modality: str) -> dict:
    """The saved metrics of the cached ``modality`` probe (training it first if needed): per-attribute
    ``accuracy`` / ``degraded_accuracy`` / ``heldout_accuracy``, ``empty_predicted_none``, steps, time."""
    return _read_info(build_probe(modality))["metrics"]


if __name__ == "__main__":
    for name in MODALITIES:
        print(name, json.dumps(probe_metrics(name), indent=2, sort_keys=True))
