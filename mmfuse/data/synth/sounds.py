"""Synthetic sound clips: the audio half of the built-in world.

A :class:`Clip` is 2 s long and holds 1-3 non-overlapping :class:`Event` s in temporal order, each a
``tone`` (sine), ``chirp`` (upward sweep) or ``noise`` (band-pass noise) at a ``low`` / ``medium`` /
``high`` pitch (300 / 900 / 2700 Hz, a factor 3 apart) and ``short`` (0.2 s) or ``long`` (0.44 s).
A kind appears at most once per clip, so "the chirp" names one event. Everything is seeded by the
``random.Random`` passed in; :func:`synthesize` turns a clip into a waveform, :func:`frame_labels`
into per-frame targets, :func:`caption`, :func:`questions` and :func:`combined_question` into text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile

SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
KINDS = ("tone", "chirp", "noise")
PITCHES = ("low", "medium", "high")
DURATIONS = ("short", "long")

PITCH_HZ = {"low": 300.0, "medium": 900.0, "high": 2700.0}
DURATION_SECONDS = {"short": 0.2, "long": 0.44}
MAX_EVENTS = 3
EDGE_SECONDS = 0.05  # silence kept at both ends of the clip
MIN_GAP_SECONDS = 0.1  # silence kept between events
FADE_SECONDS = 0.01
GRID_SECONDS = 0.02  # event boundaries fall on this grid, i.e. on 10 and 20 ms frame edges
CHIRP_SWEEP = (0.7, 1.4)  # chirp frequency goes from 0.7x to 1.4x the pitch centre
NOISE_BANDWIDTH_OCTAVES = 0.25  # std of the noise band's Gaussian in log2-frequency
PITCH_JITTER = 0.05
NUMBER_WORDS = ("one", "two", "three")
ORDINALS = ("first", "second", "third")


@dataclass
class Event:
    """One sound: ``kind`` in KINDS, ``pitch`` in PITCHES, ``duration`` in DURATIONS, ``start`` in seconds."""

    kind: str
    pitch: str
    duration: str
    start: float

    @property
    def end(self) -> float:
        return self.start + DURATION_SECONDS[self.duration]


@dataclass
class Clip:
    """A 2 s clip: its events in temporal order."""

    events: list[Event]


def sample_clip(
    rng: random.Random,
    n_events: int | None = None,
    allowed: Callable[[Event], bool] | None = None,
) -> Clip:
    """Draw a clip of ``n_events`` events of distinct kinds, in temporal order, starts on a 20 ms grid.

    ``n_events`` defaults to 1-3 uniformly (at most the number of kinds ``allowed`` leaves).
    ``allowed(event)`` filters the (kind, pitch, duration) choices; it is called before placement,
    with ``start=0.0``. Raises ``ValueError`` when fewer than ``n_events`` kinds have an allowed choice.
    """
    if n_events is not None and not 1 <= n_events <= MAX_EVENTS:
        raise ValueError(f"n_events must be between 1 and {MAX_EVENTS}, got {n_events}")
    choices = {
        kind: [(p, d) for p in PITCHES for d in DURATIONS if allowed is None or allowed(Event(kind, p, d, 0.0))]
        for kind in KINDS
    }
    usable = [kind for kind in KINDS if choices[kind]]
    if n_events is None:
        n_events = rng.randint(1, max(1, len(usable)))
    if len(usable) < n_events:
        raise ValueError(f"allowed leaves only kinds {usable}; a clip of {n_events} events needs {n_events} kinds")
    kinds = rng.sample(usable, n_events)
    picks = [rng.choice(choices[kind]) for kind in kinds]

    lengths = [DURATION_SECONDS[d] for _, d in picks]
    slack = CLIP_SECONDS - 2 * EDGE_SECONDS - sum(lengths) - (n_events - 1) * MIN_GAP_SECONDS
    cuts = sorted(rng.uniform(0.0, slack) for _ in range(n_events))  # extra silence before each event
    events, t, used = [], EDGE_SECONDS, 0.0
    for kind, (pitch, duration), length, cut in zip(kinds, picks, lengths, cuts):
        t += cut - used
        used = cut
        start = round(math.floor(t / GRID_SECONDS) * GRID_SECONDS, 2)  # flooring keeps events inside the clip
        events.append(Event(kind, pitch, duration, start))
        t += length + MIN_GAP_SECONDS
    return Clip(events)


def _fade(n: int, sample_rate: int) -> np.ndarray:
    """(n,) envelope rising and falling over FADE_SECONDS with raised-cosine ramps."""
    ramp = min(int(FADE_SECONDS * sample_rate), n // 2)
    env = np.ones(n)
    if ramp:
        rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp] = rise
        env[n - ramp :] = rise[::-1]
    return env


def _event_wave(event: Event, n: int, sample_rate: int, rng: random.Random | None) -> np.ndarray:
    """(n,) float64 waveform of one event with peak amplitude about 1 before scaling."""
    centre = PITCH_HZ[event.pitch]
    if rng is not None:
        centre *= rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    t = np.arange(n) / sample_rate
    if event.kind == "tone":
        phase = 2 * np.pi * centre * t
        wave = np.sin(phase + (rng.uniform(0, 2 * np.pi) if rng is not None else 0.0))
    elif event.kind == "chirp":
        lo, hi = CHIRP_SWEEP
        length = n / sample_rate
        rate = math.log(hi / lo) / length  # exponential sweep: f(t) = lo * centre * exp(rate * t)
        wave = np.sin(2 * np.pi * lo * centre * np.expm1(rate * t) / rate)
    elif event.kind == "noise":
        seed = rng.getrandbits(32) if rng is not None else 0
        white = np.random.default_rng(seed).standard_normal(n)
        freqs = np.fft.rfftfreq(n, 1 / sample_rate)
        octaves = np.log2(np.maximum(freqs, 1.0) / centre)
        band = np.exp(-0.5 * (octaves / NOISE_BANDWIDTH_OCTAVES) ** 2)
        wave = np.fft.irfft(np.fft.rfft(white) * band, n)
        wave *= math.sqrt(0.5) / (wave.std() + 1e-12)  # same RMS as a unit sine
        wave = np.clip(wave, -1.5, 1.5)
    else:
        raise ValueError(f"unknown sound kind {event.kind!r}; expected one of {KINDS}")
    return wave * _fade(n, sample_rate)


def synthesize(clip: Clip, sample_rate: int = SAMPLE_RATE, rng: random.Random | None = None) -> np.ndarray:
    """Render ``clip`` as a (CLIP_SECONDS * sample_rate,) float32 waveform in [-1, 1].

    With ``rng`` the pitch is jittered by ±5%, the loudness varies and a faint background noise is
    added; without it the rendering is exact and silence is zero.
    """
    total = int(round(CLIP_SECONDS * sample_rate))
    out = np.zeros(total)
    for event in clip.events:
        begin = int(round(event.start * sample_rate))
        end = min(int(round(event.end * sample_rate)), total)
        if begin < 0 or end <= begin:
            raise ValueError(f"event {event} does not fit in a {CLIP_SECONDS} s clip")
        gain = rng.uniform(0.3, 0.6) if rng is not None else 0.5
        out[begin:end] += gain * _event_wave(event, end - begin, sample_rate, rng)
    if rng is not None:
        seed = rng.getrandbits(32)
        out += rng.uniform(0.0005, 0.003) * np.random.default_rng(seed).standard_normal(total)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def frame_labels(clip: Clip, n_frames: int) -> dict[str, np.ndarray]:
    """Per-frame targets, the clip cut into ``n_frames`` equal frames labelled by their centre.

    Returns int64 arrays (n_frames,): ``"kind"`` (0 silence, 1 + KINDS index), ``"pitch"``
    (0 silence, 1 + PITCHES index) and ``"duration"`` (0 silence, 1 + DURATIONS index).
    """
    centres = (np.arange(n_frames) + 0.5) * (CLIP_SECONDS / n_frames)
    kind = np.zeros(n_frames, dtype=np.int64)
    pitch = np.zeros(n_frames, dtype=np.int64)
    duration = np.zeros(n_frames, dtype=np.int64)
    for event in clip.events:
        inside = (centres >= event.start) & (centres < event.end)
        kind[inside] = 1 + KINDS.index(event.kind)
        pitch[inside] = 1 + PITCHES.index(event.pitch)
        duration[inside] = 1 + DURATIONS.index(event.duration)
    return {"kind": kind, "pitch": pitch, "duration": duration}


def caption(clip: Clip) -> str:
    """E.g. ``"a short low tone, then a long high chirp."``"""
    return ", then ".join(f"a {e.duration} {e.pitch} {e.kind}" for e in clip.events) + "."


def questions(clip: Clip, rng: random.Random) -> list[tuple[str, str, str]]:
    """One (kind, question, answer) per question kind: count, kind, pitch, duration and, with two or
    more events, order. ``rng`` picks which event each question is about. Answers are lowercase words."""
    events = clip.events
    if not events:
        raise ValueError("questions: the clip has no events")
    n = len(events)
    i = rng.randrange(n)
    out = [
        ("count", "How many sounds are there?", NUMBER_WORDS[n - 1]),
        ("kind", f"What kind is the {ORDINALS[i]} sound?", events[i].kind),
    ]
    e = rng.choice(events)
    out.append(("pitch", f"What is the pitch of the {e.kind}?", e.pitch))
    e = rng.choice(events)
    out.append(("duration", f"Is the {e.kind} short or long?", e.duration))
    if n >= 2:
        i = rng.randrange(n - 1)
        if rng.random() < 0.5:
            out.append(("order", f"What comes after the {events[i].kind}?", events[i + 1].kind))
        else:
            out.append(("order", f"What comes before the {events[i + 1].kind}?", events[i].kind))
    return out


def combined_question(asked: list[tuple[str, str, str]], rng: random.Random) -> tuple[str, str, str]:
    """Two of a clip's questions (``asked``, as :func:`questions` returns them: one per kind), in their
    order, in one instruction: ``("pitch+duration", "What is the pitch of the tone? Is the chirp short
    or long? Answer both.", "high, long")``. ``rng`` picks the two."""
    if len(asked) < 2:
        raise ValueError(f"combined_question: needs two questions, got {len(asked)}")
    first, second = sorted(rng.sample(range(len(asked)), 2))
    (k1, q1, a1), (k2, q2, a2) = asked[first], asked[second]
    return f"{k1}+{k2}", f"{q1} {q2} Answer both.", f"{a1}, {a2}"


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"write_wav: expected a mono (samples,) waveform, got shape {wave.shape}")
    soundfile.write(str(path), wave, sample_rate, subtype="PCM_16")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as a mono float32 waveform in [-1, 1]; multi-channel audio is averaged."""
    wave, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return wave.mean(axis=1), sample_rate
