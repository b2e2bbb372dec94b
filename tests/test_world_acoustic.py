"""world:acoustic: the tiny WavLM on the raw waveform, pretrained on the world's sounds with dense heads."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoModel

from mmfuse.backbones import world, world_acoustic
from mmfuse.data.synth import sounds
from mmfuse.data.synth.heldout import event_allowed


@pytest.fixture
def few_eval_clips(monkeypatch):
    monkeypatch.setattr(world_acoustic, "EVAL_CLIPS", 8)


def _weights(out_dir):
    return load_file(str(out_dir / "model.safetensors"))


def test_waveform_in_99_frames_out_and_loudness_targets():
    wave = sounds.synthesize(sounds.sample_clip(random.Random(0)), rng=random.Random(0))
    values = world_acoustic.feature_extractor()(wave, sampling_rate=sounds.SAMPLE_RATE, return_tensors="pt")["input_values"]
    assert values.shape == (1, 32000)
    torch.testing.assert_close(values[0], torch.from_numpy(wave), rtol=0, atol=0)  # not normalised: loudness stays
    config = world_acoustic.acoustic_config()
    assert (config.hidden_size, config.num_hidden_layers, math.prod(config.conv_stride)) == (128, 3, 320)
    assert config.layerdrop == 0 and not config.apply_spec_augment and config.hidden_dropout == 0
    model = world_acoustic.transformers.WavLMModel(config).eval()
    with torch.no_grad():
        assert model(input_values=values).last_hidden_state.shape == (1, world_acoustic.N_FRAMES, 128)
    clip = sounds.Clip([sounds.Event("tone", "low", "long", 0.5)])
    quiet, loud = (world_acoustic.loudness(sounds.synthesize(clip) * g) for g in (0.1, 1.0))
    labels = sounds.frame_labels(clip, world_acoustic.N_FRAMES)
    on = labels["kind"] > 0
    assert (labels["duration"][on] == 2).all() and (labels["duration"][~on] == 0).all()
    np.testing.assert_allclose(loud[on][2:-2] - quiet[on][2:-2], 1.0, atol=0.01)  # log10: ten times louder is +1
    np.testing.assert_allclose(loud[:20], np.log10(world_acoustic.LOUDNESS_FLOOR), rtol=1e-6)  # silence: the floor


def test_short_pretraining_saves_an_offline_loadable_encoder(tmp_path, few_eval_clips):
    calls = []
    out = world_acoustic.pretrain_acoustic_encoder(
        tmp_path / "acoustic", steps=4, batch_size=4, progress=lambda s, n, d: calls.append((s, n, d["loss"]))
    )
    assert [(s, n) for s, n, _ in calls] == [(s, 4) for s in range(1, 5)]
    assert all(math.isfinite(loss) for _, _, loss in calls)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                "pretrain_metrics.json"}
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert {"kind_accuracy", "pitch_accuracy", "duration_accuracy", "silence_accuracy", "loudness_mae"} <= set(metrics)
    model = AutoModel.from_pretrained(out, local_files_only=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "WavLMModel" and not extractor.do_normalize
    wave = sounds.synthesize(sounds.sample_clip(random.Random(1)))
    with torch.no_grad():
        hidden = model(**extractor(wave, sampling_rate=sounds.SAMPLE_RATE, return_tensors="pt")).last_hidden_state
    assert hidden.shape == (1, 99, 128)
    saved = _weights(out)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_pretraining_is_deterministic_trains_the_encoder_and_respects_allowed(tmp_path, few_eval_clips):
    asked = []

    def allowed(event):
        asked.append((event.kind, event.pitch))
        return event_allowed(event)

    def run(name, seed, allowed=None):
        return world_acoustic.pretrain_acoustic_encoder(tmp_path / name, seed=seed, steps=2, batch_size=2, allowed=allowed)

    a, b, c = (_weights(run(name, seed)) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    torch.manual_seed(0)
    untrained = world_acoustic.transformers.WavLMModel(world_acoustic.acoustic_config()).state_dict()
    key = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    assert not torch.equal(a[key], untrained[key]) and not torch.equal(a[key], c[key])
    metrics = json.loads((run("held_out", 0, allowed) / "pretrain_metrics.json").read_text())
    assert ("chirp", "high") in asked and "all_events_kind_accuracy" in metrics  # held-out pairs are filtered out


def test_world_acoustic_is_built_once_cached_and_registered(tmp_path, monkeypatch, few_eval_clips):
    assert world.WORLD_BACKBONES["acoustic"].func is world_acoustic.pretrain_acoustic_encoder
    assert world.WORLD_BACKBONES["acoustic"].keywords["allowed"] is event_allowed
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMFUSE_WORLD_STEPS_SCALE", "0.01")
    first = Path(world.resolve("world:acoustic"))
    assert first == tmp_path / "cache" / "world" / f"v{world.WORLD_VERSION}" / "acoustic-steps0.01"
    assert json.loads((first / "pretrain_metrics.json").read_text())["steps"] == max(1, round(world_acoustic.DEFAULT_STEPS * 0.01))
    assert [p.name for p in first.parent.iterdir()] == ["acoustic-steps0.01"]  # built in a temporary directory, renamed
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert world.resolve("world:acoustic") == str(first) and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert type(AutoModel.from_pretrained(first, local_files_only=True)).__name__ == "WavLMModel"


@pytest.mark.full
def test_default_pretraining_reaches_target_accuracy(tmp_path):
    out = world_acoustic.pretrain_acoustic_encoder(tmp_path / "acoustic", allowed=event_allowed)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["pitch_accuracy"] >= 0.95 and metrics["duration_accuracy"] >= 0.9 and metrics["kind_accuracy"] >= 0.9
    assert metrics["silence_accuracy"] >= 0.95 and metrics["loudness_mae"] <= 0.25
