import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoModel

from mmfuse.backbones import world_audio
from mmfuse.data.synth import sounds


@pytest.fixture
def few_eval_clips(monkeypatch):
    monkeypatch.setattr(world_audio, "EVAL_CLIPS", 8)


def _weights(out_dir):
    return load_file(str(out_dir / "model.safetensors"))


def test_features_and_encoder_shapes():
    clip = sounds.sample_clip(random.Random(0))
    wave = sounds.synthesize(clip, rng=random.Random(0))
    features = world_audio.feature_extractor()(wave, sampling_rate=sounds.SAMPLE_RATE, return_tensors="pt")
    assert features["input_features"].shape == (1, 40, 200)
    config = world_audio.audio_config()
    assert (config.num_mel_bins, config.d_model, config.encoder_layers, config.max_source_positions) == (40, 128, 3, 100)
    encoder = world_audio.transformers.WhisperModel(config).get_encoder().eval()
    with torch.no_grad():
        assert encoder(features["input_features"]).last_hidden_state.shape == (1, 100, 128)


def test_short_pretraining_saves_an_offline_loadable_encoder(tmp_path, few_eval_clips):
    calls = []
    out = world_audio.pretrain_audio_encoder(
        tmp_path / "audio", steps=10, batch_size=4, progress=lambda s, n, d: calls.append((s, n, d["loss"]))
    )
    assert out == tmp_path / "audio"
    assert [(s, n) for s, n, _ in calls] == [(s, 10) for s in range(1, 11)]
    assert all(math.isfinite(loss) for _, _, loss in calls)
    assert {p.suffix for p in out.iterdir()} == {".safetensors", ".json"}
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert 0.0 <= metrics["kind_accuracy"] <= 1.0 and 0.0 <= metrics["pitch_accuracy"] <= 1.0
    assert metrics["steps"] == 10 and metrics["batch_size"] == 4

    encoder = AutoModel.from_pretrained(out, local_files_only=True).get_encoder().eval()
    extractor = AutoFeatureExtractor.from_pretrained(out, local_files_only=True)
    assert (extractor.feature_size, extractor.sampling_rate, extractor.nb_max_frames) == (40, 16000, 200)
    wave = sounds.synthesize(sounds.sample_clip(random.Random(1)))
    features = extractor(wave, sampling_rate=sounds.SAMPLE_RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        assert encoder(features).last_hidden_state.shape == (1, 100, 128)
    saved = _weights(out)
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, saved[f"encoder.{name}"])


def test_pretraining_is_deterministic_and_trains_the_encoder(tmp_path, few_eval_clips):
    def run(name, seed):
        return _weights(world_audio.pretrain_audio_encoder(tmp_path / name, seed=seed, steps=3, batch_size=2))

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    torch.manual_seed(0)
    untrained = world_audio.transformers.WhisperModel(world_audio.audio_config()).state_dict()
    key = "encoder.layers.0.fc1.weight"
    assert not torch.equal(a[key], untrained[key])  # the encoder moved away from its seeded init
    assert not torch.equal(a[key], c[key])


def test_allowed_restricts_training_and_reports_unrestricted_accuracy(tmp_path, few_eval_clips):
    asked = []

    def allowed(event):
        asked.append((event.kind, event.pitch))
        return (event.kind, event.pitch) != ("tone", "high")

    out = world_audio.pretrain_audio_encoder(tmp_path / "held_out", steps=2, batch_size=2, allowed=allowed)
    assert ("tone", "high") in asked
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert "all_events_kind_accuracy" in metrics and "all_events_pitch_accuracy" in metrics


@pytest.mark.full
def test_default_pretraining_reaches_target_accuracy(tmp_path):
    out = world_audio.pretrain_audio_encoder(tmp_path / "audio")
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["kind_accuracy"] >= 0.95
    assert metrics["pitch_accuracy"] >= 0.95
