"""Probe classifiers that judge generated world media (mmfuse.eval.probes)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfuse.data.synth import scenes, sounds
from mmfuse.data.synth.scenes import Scene, Shape
from mmfuse.data.synth.sounds import Clip, Event
from mmfuse.eval import probes

IMAGE_TEST_STEPS = 150  # large shapes are right by then; small ones are still being learned
AUDIO_TEST_STEPS = 40


@pytest.fixture(scope="module")
def image_probe():
    return probes.train_image_probe(seed=0, steps=IMAGE_TEST_STEPS, eval_items=64)


@pytest.fixture(scope="module")
def audio_probe():
    return probes.train_audio_probe(seed=0, steps=AUDIO_TEST_STEPS, eval_items=32)


def _images(scene_list: list[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([scenes.render_array(s) for s in scene_list])).permute(0, 3, 1, 2).float() / 255


def _accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """An empty cache under tmp_path and a small steps scale; counts the training calls per modality."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    monkeypatch.setenv("MMFUSE_WORLD_STEPS_SCALE", "0.01")
    calls = []
    for modality, (cls, train, steps) in list(probes._PROBES.items()):
        def counted(*args, _train=train, _modality=modality, **kwargs):
            calls.append(_modality)
            return _train(*args, **kwargs)
        monkeypatch.setitem(probes._PROBES, modality, (cls, counted, steps))
    return tmp_path, calls


# ------------------------------------------------------------------------------------------------ image


def test_image_probe_is_far_above_chance_on_fresh_scenes(image_probe):
    probe, metrics = image_probe
    rng = random.Random("fresh-test-scenes")
    scene_list = [scenes.sample_scene(rng, n_shapes=1) for _ in range(160)]
    predicted = probe.predict(_images(scene_list))
    truth = {
        "colour": [s.shapes[0].colour for s in scene_list], "shape": [s.shapes[0].shape for s in scene_list],
        "size": [s.shapes[0].size for s in scene_list], "cell": [scenes.CELL_NAMES[s.shapes[0].cell] for s in scene_list],
    }
    accuracy = {k: _accuracy(predicted[k], truth[k]) for k in truth}
    assert accuracy["colour"] > 0.95 and accuracy["cell"] > 0.95 and accuracy["size"] > 0.9, accuracy  # chance 0.2, 0.11, 0.5
    assert accuracy["shape"] > 0.7, accuracy  # chance 0.33
    large = [i for i, s in enumerate(scene_list) if s.shapes[0].size == "large"]
    assert _accuracy([predicted["shape"][i] for i in large], [truth["shape"][i] for i in large]) > 0.9
    # the saved metrics report the same kind of figures
    assert set(metrics["accuracy"]) == {"colour", "shape", "size", "cell"}
    assert metrics["accuracy"]["colour"] > 0.9 and metrics["heldout_accuracy"]["colour"] > 0.9
    assert metrics["empty_predicted_none"] == 1.0 and metrics["steps"] == IMAGE_TEST_STEPS


def test_image_probe_names_specific_objects_also_when_blurred(image_probe):
    probe, _ = image_probe
    objects = [Shape("circle", "red", "large", 0, 0), Shape("square", "blue", "large", 1, 1),
               Shape("circle", "purple", "large", 2, 2)]  # purple circle: a held-out pair
    clean = _images([Scene([s]) for s in objects])
    side = scenes.IMAGE_SIZE
    blurred = probes._blur(clean, torch.full((3,), 1.5), torch.full((3,), 1.5), radius=4)
    coarse = F.interpolate(F.interpolate(clean, size=side // 4, mode="area"), size=side, mode="bilinear")
    for images in (clean, blurred, coarse):
        predicted = probe.predict(images)
        assert predicted["colour"] == ["red", "blue", "purple"]
        assert predicted["shape"] == ["circle", "square", "circle"]
        assert predicted["size"] == ["large"] * 3
        assert predicted["cell"] == ["top left", "middle", "bottom right"]


def test_empty_image_is_no_object(image_probe):
    probe, _ = image_probe
    background = torch.tensor(scenes.BACKGROUND_RGB, dtype=torch.float32).view(1, 3, 1, 1).expand(2, 3, 48, 48) / 255
    noisy = (background + 0.02 * torch.randn(background.shape)).clamp(0, 1)
    images = torch.cat([background, noisy])
    assert probe.predict(images) == {name: [probes.NONE] * 4 for name in probes.IMAGE_ATTRIBUTES}
    probs = probe.probabilities(images)
    for name, p in probs.items():
        assert p.shape == (4, len(probe.classes[name])) and probe.classes[name][-1] == probes.NONE
        assert (p[:, -1] > 0.8).all(), (name, p)  # confidently "none", not confidently a specific object


def test_image_probe_rejects_wrong_input():
    probe = probes.ImageProbe()
    good = torch.rand(2, 3, 48, 48)
    assert set(probe.predict(good)) == {"colour", "shape", "size", "cell"}
    assert probe.predict(good.numpy())["colour"].__len__() == 2  # numpy arrays are accepted too
    for bad in (torch.rand(3, 48, 48), torch.rand(2, 48, 48, 3), torch.rand(2, 3, 32, 32), torch.rand(2, 1, 48, 48)):
        with pytest.raises(ValueError, match=r"ImageProbe: expected images of shape \(n, 3, 48, 48\)"):
            probe.predict(bad)
    with pytest.raises(ValueError, match="expected float values"):
        probe.predict((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        probe.predict(torch.full((1, 3, 48, 48), float("nan")))


# ------------------------------------------------------------------------------------------------ audio


def test_audio_probe_is_far_above_chance_on_fresh_clips(audio_probe):
    probe, metrics = audio_probe
    rng = random.Random("fresh-test-clips")
    clips = [sounds.sample_clip(rng, n_events=1) for _ in range(96)]
    waves = torch.from_numpy(np.stack([sounds.synthesize(c, rng=rng) for c in clips]))
    predicted = probe.predict(waves)
    for name in ("kind", "pitch", "duration"):
        truth = [getattr(c.events[0], name) for c in clips]
        assert _accuracy(predicted[name], truth) > 0.9, name  # chance 0.33 / 0.5
    assert set(metrics["accuracy"]) == {"kind", "pitch", "duration"}
    assert metrics["accuracy"]["pitch"] > 0.9 and metrics["griffin_lim_accuracy"]["pitch"] > 0.9


def test_audio_probe_names_specific_sounds_and_silence(audio_probe):
    probe, _ = audio_probe
    rng = random.Random(3)
    events = [Event("tone", "high", "long", 0.5), Event("noise", "low", "short", 1.2), Event("chirp", "medium", "long", 0.1)]
    waves = torch.from_numpy(np.stack([sounds.synthesize(Clip([e]), rng=rng) for e in events]))
    predicted = probe.predict(waves)
    assert predicted == {"kind": ["tone", "noise", "chirp"], "pitch": ["high", "low", "medium"],
                         "duration": ["long", "short", "long"]}
    # the same sounds re-synthesised from their magnitude alone (a Griffin-Lim codec's output)
    redone = probes.griffin_lim(waves, torch.Generator().manual_seed(0), n_fft=512, hop=128, iterations=16)
    assert probe.predict(redone) == predicted
    silence = torch.stack([torch.zeros(sounds.SAMPLE_RATE * 2), torch.from_numpy(sounds.synthesize(Clip([]), rng=rng))])
    assert probe.predict(silence) == {name: [probes.NONE] * 2 for name in probes.AUDIO_ATTRIBUTES}


def test_audio_probe_rejects_wrong_input():
    probe = probes.AudioProbe()
    n = probes.CLIP_SAMPLES
    assert len(probe.predict(torch.zeros(2, n))["pitch"]) == 2
    assert len(probe.predict(torch.zeros(1, n - 256))["pitch"]) == 1  # a codec's slightly short output is padded
    for bad in (torch.zeros(n), torch.zeros(1, 1, n)):
        with pytest.raises(ValueError, match=r"expected mono waveforms of shape \(n, samples\)"):
            probe.predict(bad)
    for length in (n // 2, 2 * n):
        with pytest.raises(ValueError, match=f"expected {n} samples per clip"):
            probe.predict(torch.zeros(1, length))
    with pytest.raises(ValueError, match="expected float values"):
        probe.predict(torch.zeros(1, n, dtype=torch.int16))


# ------------------------------------------------------------------------------------------ training/cache


def test_training_is_deterministic_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, metrics_a = probes.train_image_probe(seed=5, steps=3, eval_items=8)
    assert torch.equal(torch.rand(3), expected)
    b, metrics_b = probes.train_image_probe(seed=5, steps=3, eval_items=8)
    c, _ = probes.train_image_probe(seed=6, steps=3, eval_items=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    metrics_a.pop("train_seconds"), metrics_b.pop("train_seconds")
    assert metrics_a == metrics_b
    with pytest.raises(ValueError, match="steps and batch_size must be positive"):
        probes.train_audio_probe(steps=0)


def test_load_probe_trains_once_and_caches(tiny_cache):
    root, calls = tiny_cache
    target = root / "world" / "probes" / "image-steps0.01"
    assert probes.probe_dir("image") == target
    first = probes.load_probe("image")
    assert calls == ["image"] and isinstance(first, probes.ImageProbe) and not first.training
    assert sorted(p.name for p in target.parent.iterdir()) == ["image-steps0.01"]  # no temporary directory left
    files = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert set(files) == {probes.WEIGHTS_NAME, probes.INFO_NAME}
    info = json.loads((target / probes.INFO_NAME).read_text())
    assert info["version"] == probes.PROBE_VERSION and info["metrics"]["steps"] == round(probes.IMAGE_STEPS * 0.01)
    assert info["metrics"]["eval_items"] == 16  # a quick build is checked on fewer items

    second = probes.load_probe("image")
    metrics = probes.probe_metrics("image")
    assert calls == ["image"]  # neither retrained
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == files
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert metrics == info["metrics"] and set(metrics["accuracy"]) == {"colour", "shape", "size", "cell"}
    x = torch.rand(2, 3, 48, 48)
    assert all(torch.equal(first.logits(x)[k], second.logits(x)[k]) for k in first.classes)


def test_stale_or_broken_cache_is_retrained(tiny_cache):
    root, calls = tiny_cache
    target = probes.build_probe("audio")
    assert calls == ["audio"] and target == root / "world" / "probes" / "audio-steps0.01"
    info = json.loads((target / probes.INFO_NAME).read_text())
    (target / probes.INFO_NAME).write_text(json.dumps(dict(info, version=probes.PROBE_VERSION - 1)))
    assert isinstance(probes.load_probe("audio"), probes.AudioProbe)
    assert calls == ["audio", "audio"]
    (target / probes.WEIGHTS_NAME).unlink()
    probes.probe_metrics("audio")
    assert calls == ["audio"] * 3 and (target / probes.WEIGHTS_NAME).is_file()


def test_probe_paths_and_modalities(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path))
    monkeypatch.delenv("MMFUSE_WORLD_STEPS_SCALE", raising=False)
    assert probes.probe_dir("image") == tmp_path / "world" / "probes" / "image"
    assert probes.probe_dir("audio") == tmp_path / "world" / "probes" / "audio"
    with pytest.raises(ValueError, match="unknown probe modality 'video'"):
        probes.load_probe("video")
