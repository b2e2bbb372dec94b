import random

import numpy as np
import pytest

from mmfuse.data.synth import sounds
from mmfuse.data.synth.sounds import Clip, Event

N_SAMPLES = int(sounds.CLIP_SECONDS * sounds.SAMPLE_RATE)


def _clips(seed, n, **kwargs):
    rng = random.Random(seed)
    return [sounds.sample_clip(rng, **kwargs) for _ in range(n)]


def _peak_hz(wave):
    spectrum = np.abs(np.fft.rfft(wave))
    return np.fft.rfftfreq(len(wave), 1 / sounds.SAMPLE_RATE)[spectrum.argmax()]


def _nearest_pitch(hz):
    return min(sounds.PITCHES, key=lambda p: abs(np.log(hz / sounds.PITCH_HZ[p])))


def test_same_seed_same_clips_and_waves():
    assert _clips(3, 20) == _clips(3, 20)
    assert _clips(3, 20) != _clips(4, 20)
    clip = _clips(3, 1)[0]
    a = sounds.synthesize(clip, rng=random.Random(7))
    b = sounds.synthesize(clip, rng=random.Random(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sounds.synthesize(clip, rng=random.Random(8)))


def test_events_are_ordered_distinct_and_fit_in_the_clip():
    clips = _clips(0, 500)
    assert {len(c.events) for c in clips} == {1, 2, 3}
    for clip in clips:
        kinds = [e.kind for e in clip.events]
        assert len(set(kinds)) == len(kinds)
        for e in clip.events:
            assert e.kind in sounds.KINDS and e.pitch in sounds.PITCHES and e.duration in sounds.DURATIONS
            assert 0.0 <= e.start and e.end <= sounds.CLIP_SECONDS
        for prev, nxt in zip(clip.events, clip.events[1:]):
            assert nxt.start >= prev.end + 0.05  # a silent gap between events
    assert all(len(c.events) == 2 for c in _clips(1, 50, n_events=2))
    with pytest.raises(ValueError, match="n_events"):
        sounds.sample_clip(random.Random(0), n_events=4)


def test_allowed_excludes_combinations():
    def no_high_tone(e):
        return not (e.kind == "tone" and e.pitch == "high")

    clips = _clips(0, 400, allowed=no_high_tone)
    events = [e for c in clips for e in c.events]
    assert not [e for e in events if e.kind == "tone" and e.pitch == "high"]
    assert {(e.kind, e.pitch) for e in events} == {(k, p) for k in sounds.KINDS for p in sounds.PITCHES} - {("tone", "high")}
    only_tones = _clips(0, 50, allowed=lambda e: e.kind == "tone")
    assert all([e.kind for e in c.events] == ["tone"] for c in only_tones)
    with pytest.raises(ValueError, match="kinds"):
        sounds.sample_clip(random.Random(0), n_events=2, allowed=lambda e: e.kind == "tone")


@pytest.mark.parametrize("pitch", sounds.PITCHES)
def test_tone_peak_frequency_matches_pitch(pitch):
    clip = Clip([Event("tone", pitch, "long", 0.5)])
    exact = sounds.synthesize(clip)
    assert abs(_peak_hz(exact) / sounds.PITCH_HZ[pitch] - 1) < 0.01
    for seed in range(5):
        jittered = sounds.synthesize(clip, rng=random.Random(seed))
        assert abs(_peak_hz(jittered) / sounds.PITCH_HZ[pitch] - 1) < 0.06
        assert _nearest_pitch(_peak_hz(jittered)) == pitch


@pytest.mark.parametrize("pitch", sounds.PITCHES)
def test_noise_band_and_chirp_sweep_sit_on_their_pitch(pitch):
    centre = sounds.PITCH_HZ[pitch]
    noise = sounds.synthesize(Clip([Event("noise", pitch, "long", 0.5)]), rng=random.Random(0))
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise), 1 / sounds.SAMPLE_RATE)
    in_band = (freqs > centre / 1.6) & (freqs < centre * 1.6)
    assert power[in_band].sum() > 0.9 * power.sum()

    chirp = sounds.synthesize(Clip([Event("chirp", pitch, "long", 0.5)]))
    begin, end = int(0.5 * sounds.SAMPLE_RATE), int(0.95 * sounds.SAMPLE_RATE)
    quarter = (end - begin) // 4
    first, last = _peak_hz(chirp[begin : begin + quarter]), _peak_hz(chirp[end - quarter : end])
    assert 0.6 * centre < first < centre < last < 1.5 * centre  # sweeps upward across the centre
    assert _nearest_pitch(_peak_hz(chirp[begin:end])) == pitch


def test_synthesize_shape_range_and_silence():
    clip = Clip([Event("noise", "high", "short", 0.1), Event("chirp", "low", "long", 1.0)])
    wave = sounds.synthesize(clip)
    assert wave.dtype == np.float32 and wave.shape == (N_SAMPLES,)
    assert np.abs(wave).max() <= 1.0
    labels = sounds.frame_labels(clip, N_SAMPLES // 160)  # 10 ms frames
    frames = wave.reshape(len(labels["kind"]), -1)
    energy = (frames**2).mean(1)
    assert (energy[labels["kind"] == 0] == 0).all()  # exact rendering: silence is zero
    assert (energy[labels["kind"] > 0] > 1e-4).all()
    noisy = sounds.synthesize(clip, sample_rate=8000, rng=random.Random(0))
    assert noisy.shape == (16000,) and np.abs(noisy).max() <= 1.0


def test_frame_labels_follow_event_times():
    clip = Clip([Event("tone", "low", "short", 0.5), Event("noise", "high", "long", 1.2)])
    labels = sounds.frame_labels(clip, 100)  # 20 ms frames, centres at 10, 30, ... ms
    assert labels["kind"].dtype == np.int64 and labels["kind"].shape == (100,)
    expected_kind = np.zeros(100, dtype=np.int64)
    expected_pitch = np.zeros(100, dtype=np.int64)
    expected_kind[25:35], expected_pitch[25:35] = 1, 1  # tone, low: 0.50-0.70 s
    expected_kind[60:82], expected_pitch[60:82] = 3, 3  # noise, high: 1.20-1.64 s
    np.testing.assert_array_equal(labels["kind"], expected_kind)
    np.testing.assert_array_equal(labels["pitch"], expected_pitch)
    np.testing.assert_array_equal(labels["duration"], (expected_kind == 1) * 1 + (expected_kind == 3) * 2)  # short, long
    for clip in _clips(5, 50):
        labels = sounds.frame_labels(clip, 200)
        order = [k for i, k in enumerate(labels["kind"]) if k and (i == 0 or labels["kind"][i - 1] != k)]
        assert order == [1 + sounds.KINDS.index(e.kind) for e in clip.events]


def test_caption_lists_events_in_order():
    clip = Clip([Event("tone", "low", "short", 0.2), Event("chirp", "high", "long", 1.0)])
    assert sounds.caption(clip) == "a short low tone, then a long high chirp."
    assert sounds.caption(Clip([Event("noise", "medium", "long", 0.3)])) == "a long medium noise."


def test_questions_are_consistent_with_the_clip():
    rng = random.Random(0)
    seen = set()
    for clip in _clips(2, 300):
        qs = sounds.questions(clip, rng)
        expected = {"count", "kind", "pitch", "duration"} | ({"order"} if len(clip.events) > 1 else set())
        assert [k for k, _, _ in qs] == [k for k in ("count", "kind", "pitch", "duration", "order") if k in expected]
        by_kind = {e.kind: e for e in clip.events}
        kinds = [e.kind for e in clip.events]
        for kind, question, answer in qs:
            seen.add(question)
            assert answer == answer.lower() and not answer.endswith(".")
            words = question.rstrip("?").split()
            if kind == "count":
                assert answer == ("one", "two", "three")[len(clip.events) - 1]
            elif kind == "kind":
                assert answer == kinds[("first", "second", "third").index(words[-2])]
            elif kind == "pitch":
                assert answer == by_kind[words[-1]].pitch
            elif kind == "duration":
                assert answer == by_kind[words[2]].duration
            else:
                i = kinds.index(words[-1])
                assert answer == (kinds[i + 1] if words[2] == "after" else kinds[i - 1])
    assert "How many sounds are there?" in seen and "What comes after the tone?" in seen


def test_combined_question_asks_two_kinds_in_order_and_is_seeded():
    clip = Clip([Event("tone", "low", "short", 0.2), Event("chirp", "high", "long", 1.0)])
    qs = sounds.questions(clip, random.Random(0))
    combined = [sounds.combined_question(qs, random.Random(s)) for s in range(40)]
    assert combined == [sounds.combined_question(qs, random.Random(s)) for s in range(40)]
    by_kind = {k: (q, a) for k, q, a in qs}
    for kind, question, answer in combined:
        first, second = kind.split("+")
        order = [k for k, _, _ in qs]
        assert order.index(first) < order.index(second)
        assert question == f"{by_kind[first][0]} {by_kind[second][0]} Answer both."
        assert answer == f"{by_kind[first][1]}, {by_kind[second][1]}"
    assert len({k for k, _, _ in combined}) > 5  # the pairs vary with the rng
    with pytest.raises(ValueError, match="needs two questions"):
        sounds.combined_question(qs[:1], random.Random(0))


def test_wav_round_trip(tmp_path):
    clip = _clips(9, 1, n_events=3)[0]
    wave = sounds.synthesize(clip, rng=random.Random(1))
    path = tmp_path / "clip.wav"
    sounds.write_wav(path, wave)
    back, sample_rate = sounds.read_wav(path)
    assert sample_rate == sounds.SAMPLE_RATE
    assert back.dtype == np.float32 and back.shape == wave.shape
    assert np.abs(back - wave).max() <= 1.0 / 32768 + 1e-6
    with pytest.raises(ValueError, match="mono"):
        sounds.write_wav(tmp_path / "stereo.wav", np.zeros((10, 2)))
