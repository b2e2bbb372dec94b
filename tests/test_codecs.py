"""Type-D codecs: round trips, settings, save / load, short trainings, transformers wrappers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_WHISPER
from mmfuse.backbones import world
from mmfuse.backbones.loading import default_processor
from mmfuse.codecs import (
    AudioCodec, ChameleonCodec, DacCodec, EncodecCodec, ImageCodec, MimiCodec, SemanticAudioCodec,
    build_codec, load_codec, pretrain_audio_codec, pretrain_image_codec, pretrain_semantic_audio, save_codec,
)
from mmfuse.codecs import audio as audio_module
from mmfuse.codecs import image as image_module
from mmfuse.codecs import semantic as semantic_module
from mmfuse.data.synth import scenes, sounds
from mmfuse.data.synth.heldout import event_allowed, shape_allowed
from mmfuse.data.synth.scenes import render_array, sample_scene
from mmfuse.fusion.tokens import shared_code_start

TINY_IMAGE = {"widths": [8, 8, 16], "latent_dim": 8, "quantizer": "vq", "codebook_size": 32, "codebook_dim": 4}
TINY_AUDIO = {"n_fft": 256, "hop": 128, "stride": 2, "width": 16, "dim": 8, "num_quantizers": 2, "codebook_size": 16,
              "griffin_lim_iterations": 4}
TINY_SEMANTIC = {"num_clusters": 8, "n_fft": 128, "hop": 32, "width": 16, "dim": 8, "griffin_lim_iterations": 2}
TINY_CHAMELEON = {"model_type": "chameleon_vqgan", "embed_dim": 8, "num_embeddings": 64, "latent_channels": 8, "resolution": 16,
                  "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1}
TINY_ENCODEC = {"model_type": "encodec", "hidden_size": 16, "num_filters": 4, "num_lstm_layers": 1, "codebook_size": 32,
                "codebook_dim": 16, "upsampling_ratios": [4, 4], "target_bandwidths": [2.5, 5.0], "sampling_rate": 8000}
TINY_MIMI = {"model_type": "mimi", "hidden_size": 16, "num_filters": 4, "codebook_size": 32, "codebook_dim": 16, "num_quantizers": 4,
             "vector_quantization_hidden_dimension": 16, "upsample_groups": 16, "num_hidden_layers": 1, "intermediate_size": 32,
             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "upsampling_ratios": [4, 4], "sampling_rate": 8000}
TINY_DAC = {"model_type": "dac", "encoder_hidden_size": 4, "downsampling_ratios": [2, 4], "decoder_hidden_size": 16,
            "upsampling_ratios": [4, 2], "n_codebooks": 3, "codebook_size": 32, "codebook_dim": 4, "hidden_size": 32,
            "hop_length": 8, "sampling_rate": 8000}


@pytest.fixture(autouse=True)
def _small_eval(monkeypatch):
    """Tiny evaluations, offline, one torch thread (on a busy 2-core machine two threads run these tiny
    convolutions many times slower)."""
    monkeypatch.setattr(image_module, "EVAL_IMAGES", 16)
    monkeypatch.setattr(audio_module, "EVAL_CLIPS", 4)
    monkeypatch.setattr(semantic_module, "EVAL_CLIPS", 4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _world_pixels(n: int, seed: int = 1) -> torch.Tensor:
    rng = random.Random(seed)
    return image_module.pixel_values(np.stack([render_array(sample_scene(rng)) for _ in range(n)]))


def _world_waves(n: int, seed: int = 1) -> tuple[list, torch.Tensor]:
    return audio_module.world_clips(random.Random(seed), n)


def _same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> None:
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(a) == shapes(b)


def _reconstruction_mse(codec: ImageCodec, pixels: torch.Tensor) -> float:
    return torch.mean((codec.decode(codec.encode(pixels)) - (pixels + 1) / 2) ** 2).item()


# --- image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer, size", [("vq", 32), ("fsq", 4 * 4 * 3)])
def test_image_codec_round_trip_shapes(quantizer, size):
    codec = ImageCodec(**dict(TINY_IMAGE, quantizer=quantizer), levels=[4, 4, 3]).eval()
    assert codec.codebook_size == size and codec.num_codebooks == 1 and codec.can_decode
    pixels = _world_pixels(3)
    codes = codec.encode(pixels)
    assert codes.shape == (3, codec.num_frames((3, 48, 48)), 1) == (3, 36, 1) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < codec.codebook_size
    images = codec.decode(codes)
    assert images.shape == (3, 3, 48, 48) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert codec.decode(codes[:, torch.randperm(36)]).sub(images).abs().max() > 0  # codes carry position-wise content
    both = codec.encode_with_features(pixels)
    assert torch.equal(both[0], codes) and torch.equal(both[1], codec.features(pixels))


def test_query_image_codec_round_trip_shapes_and_settings():
    codec = ImageCodec(**TINY_IMAGE, num_queries=4, query_depth=1, query_heads=2).eval()
    pixels = _world_pixels(3)
    codes = codec.encode(pixels)
    assert codes.shape == (3, codec.num_frames((3, 48, 48)), 1) == (3, 4, 1)
    assert codec.decode(codes).shape == (3, 3, 48, 48)
    rebuilt = build_codec(codec.settings())
    assert rebuilt.settings()["num_queries"] == 4 and rebuilt.num_frames((3, 48, 48)) == 4
    _same_architecture(codec, rebuilt)
    with pytest.raises(ValueError, match=r"expected codes of shape \(items, 4, 1\)"):
        codec.decode(torch.zeros(1, 36, 1, dtype=torch.long))
    for bad in ({"num_queries": 4, "query_heads": 3}, {"num_queries": 5}):
        with pytest.raises(ValueError, match="num_queries must be a square number"):
            ImageCodec(**TINY_IMAGE, **bad)


def test_query_bottleneck_is_causal_over_queries_and_reads_every_cell():
    torch.manual_seed(0)
    codec = ImageCodec(**TINY_IMAGE, num_queries=9, query_depth=2, query_heads=2).eval()
    cells = torch.randn(2, 36, 8)
    with torch.no_grad():
        before = codec.bottleneck.encode(cells)
        codec.bottleneck.queries[3] += torch.randn(8)  # a later query changes ...
        after = codec.bottleneck.encode(cells)
        assert torch.equal(after[:, :3], before[:, :3])  # ... nothing before it
        assert (after[:, 3:] - before[:, 3:]).abs().amax() > 1e-4  # (and itself and what follows)
        moved = cells.clone()
        moved[:, 35] += torch.randn(8)  # the last cell (bottom right) ...
        assert (codec.bottleneck.encode(moved)[:, 0] - after[:, 0]).abs().amax() > 1e-4  # ... reaches the first query


def test_image_codec_processor_and_shape_errors():
    codec = ImageCodec(**TINY_IMAGE).eval()
    pixels = codec.processor()(images=[Image.new("RGB", (60, 30), (255, 0, 0))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48) and torch.allclose(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match=r"expected pixel_values items of shape \(3, 48, 48\), got \(3, 40, 40\)"):
        codec.encode(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"expected codes of shape \(items, 36, 1\)"):
        codec.decode(torch.zeros(1, 35, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="widths needs one width per halving"):
        ImageCodec(downsample=8, widths=[8, 8])


def test_image_codec_trains_saves_and_loads(tmp_path):
    calls = []
    out = pretrain_image_codec(tmp_path / "codec", steps=15, batch_size=8, lr=1e-2, codec_settings=TINY_IMAGE, allowed=shape_allowed,
                               progress=lambda step, steps, logs: calls.append((step, steps, logs)))
    assert [(s, t) for s, t, _ in calls] == [(i, 15) for i in range(1, 16)]
    assert {p.name for p in out.iterdir()} == {"codec.json", "model.safetensors", "preprocessor_config.json", "pretrain_metrics.json"}
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["steps"] == 15 and 0 < metrics["codebook_usage"] <= 1
    assert {"psnr_scenes_db", "psnr_video_frames_db", "psnr_blurry_baseline_db", "psnr_held_out_scenes_db"} <= set(metrics)
    assert 0 <= metrics["held_out_colour_kept"] <= 1

    trained = load_codec(out)
    assert trained.settings() == json.loads((out / "codec.json").read_text())
    untrained = build_codec(trained.settings())
    _same_architecture(trained, untrained)
    pixels = _world_pixels(16)
    assert _reconstruction_mse(trained, pixels) < 0.5 * _reconstruction_mse(untrained, pixels)

    again = load_codec(str(out))
    assert torch.equal(again.encode(pixels), trained.encode(pixels))
    assert torch.equal(again.decode(trained.encode(pixels)), trained.decode(trained.encode(pixels)))
    assert again.processor().to_dict() == trained.processor().to_dict()

    before = {k: v.clone() for k, v in again.state_dict().items()}
    again.train().encode(_world_pixels(16, seed=2))  # encoding in training mode (an LLM being trained) ...
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())  # ... leaves the EMA codebook alone


def test_world_images_recolour_objects_off_palette():
    plain = image_module.world_images(random.Random(0), 12)
    repainted = image_module.world_images(random.Random(0), 12, recolour=1.0)
    world = np.array([scenes.BACKGROUND_RGB, *scenes.COLOUR_RGB.values()])
    in_palette = lambda images: (images.reshape(-1, 1, 3) == world).all(-1).any(-1)  # noqa: E731
    assert in_palette(plain).all() and plain.dtype == np.uint8
    background = (repainted == scenes.BACKGROUND_RGB).all(-1)
    assert np.array_equal(background, (plain == scenes.BACKGROUND_RGB).all(-1))  # same shapes, same places
    assert not in_palette(repainted[~background]).any()  # every object pixel off the palette


def test_image_codec_training_is_deterministic(tmp_path):
    settings = dict(TINY_IMAGE, quantizer="fsq", levels=[4, 4])
    a = load_codec(pretrain_image_codec(tmp_path / "a", steps=3, batch_size=4, codec_settings=settings))
    b = load_codec(pretrain_image_codec(tmp_path / "b", steps=3, batch_size=4, codec_settings=settings))
    c = load_codec(pretrain_image_codec(tmp_path / "c", seed=1, steps=3, batch_size=4, codec_settings=settings))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


# --- audio -------------------------------------------------------------------------------------------


def test_audio_codec_round_trip_shapes():
    codec = AudioCodec(**TINY_AUDIO).eval()
    assert (codec.codebook_size, codec.num_codebooks) == (16, 2)
    waves = torch.randn(2, 1000) * 0.1
    codes = codec.encode(waves)
    assert codes.shape == (2, codec.num_frames((1000,)), 2) == (2, 4, 2) and codes.dtype == torch.long  # ceil(1000 / 256)
    assert 0 <= codes.min() and codes.max() < 16
    decoded = codec.decode(codes)
    assert decoded.shape == (2, 4 * 256) and -1 <= decoded.min() and decoded.max() <= 1
    processed = codec.processor()([np.zeros(700, np.float32)], sampling_rate=16000, return_tensors="pt")["input_values"]
    assert processed.shape == (1, 700)
    with pytest.raises(ValueError, match=r"expected codes of shape \(items, frames, 2\)"):
        codec.decode(codes[..., :1])
    with pytest.raises(ValueError, match=r"expected waveform items of shape \(samples,\)"):
        codec.num_frames((1, 1000))


def test_griffin_lim_keeps_a_tone_and_pitch_measure_detects_shifts():
    clip = sounds.Clip([sounds.Event("tone", "medium", "long", 0.5)])
    wave = torch.from_numpy(sounds.synthesize(clip))[None]
    spectrogram = audio_module.Spectrogram(iterations=16)
    rebuilt = audio_module.to_wave(spectrogram, audio_module.code_frame_spectra(spectrogram, wave, 4))
    assert rebuilt.shape == wave.shape
    assert audio_module.pitch_metrics(wave.numpy(), rebuilt.numpy(), [clip])["pitch_kept"] == {"all": 1.0, "tone": 1.0}
    shifted = sounds.synthesize(sounds.Clip([sounds.Event("tone", "high", "long", 0.5)]))[None]
    far = audio_module.pitch_metrics(wave.numpy(), shifted, [clip])
    assert far["pitch_kept"]["all"] == 0.0 and far["pitch_median_error"]["all"] == pytest.approx(2.0, abs=0.1)  # 2700 vs 900 Hz


def test_spectral_loss_penalises_a_faint_plateau_in_place_of_a_peak():
    target = torch.zeros(1, 20, 4)
    target[0, 10] = 8.0
    assert audio_module.spectral_loss(target, target)[0].item() == 0
    plateau = torch.zeros(1, 20, 4)
    plateau[0, 8:13] = 8.0 / 5  # the peak's log-magnitude spread over five bins, as a blurred prediction
    loss, mse = audio_module.spectral_loss(plateau, target)
    assert mse == torch.mean((plateau - target) ** 2) and loss - mse > 0.9  # nearly all the peak's energy is missing


def _log_centroid(wave: np.ndarray) -> float:
    """Power-weighted mean log-frequency (Hz) of the whole wave's spectrum, over bins within 20 dB of the peak."""
    power = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / 16000)
    keep = (power >= power.max() / 100) & (freqs > 0)
    return float(2 ** ((np.log2(freqs[keep]) * power[keep]).sum() / power[keep].sum()))


def test_shifted_clips_never_play_a_held_out_pair():
    rng = random.Random(0)
    for kind, held_out_hz in (("chirp", 2700.0), ("noise", 300.0)):  # HELDOUT_SOUNDS
        centres = []
        for _ in range(30):
            clips, wave = audio_module.world_clips(rng, 1, lambda e: e.kind == kind and event_allowed(e), n_events=1, shifted=1.0)
            centres.append(_log_centroid(wave[0].numpy()))
            assert abs(np.log(centres[-1] / held_out_hz)) > np.log(1.2), (kind, centres[-1])
        assert max(centres) > 2 * min(centres)  # the shifts spread the kind over the spectrum
    _, plain = audio_module.world_clips(random.Random(1), 4, shifted=0.0)
    assert torch.equal(plain, audio_module.world_clips(random.Random(1), 4)[1])


def test_audio_codec_trains_saves_and_loads(tmp_path):
    calls = []
    out = pretrain_audio_codec(tmp_path / "codec", steps=12, batch_size=4, lr=3e-2, codec_settings=TINY_AUDIO,
                               allowed=lambda e: e.kind != "noise", progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, 13))
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert set(metrics["pitch_kept"]) <= {"all", "tone", "chirp"} and 0 <= metrics["pitch_kept"]["all"] <= 1
    assert "noise" in metrics["held_out_events"]["pitch_kept"] and "tone" not in metrics["held_out_events"]["pitch_kept"]
    assert len(metrics["codebook_usage"]) == 2

    trained = load_codec(out)
    untrained = build_codec(trained.settings())
    _same_architecture(trained, untrained)
    _, waves = _world_waves(4)
    target = trained.target(waves)
    errors = [torch.mean((c.decode_spectrogram(c.encode(waves)) - target) ** 2).item() for c in (trained, untrained)]
    assert errors[0] < 0.6 * errors[1]
    again = load_codec(out)
    assert torch.equal(again.encode(waves), trained.encode(waves))
    assert torch.equal(again.decode(trained.encode(waves)), trained.decode(trained.encode(waves)))
    assert isinstance(again.processor(), transformers.Wav2Vec2FeatureExtractor) and not again.processor().do_normalize


# --- semantic audio ----------------------------------------------------------------------------------


def _whisper_dir(tmp_path, positions: int):
    config = dict(TINY_WHISPER, max_source_positions=positions)
    transformers.WhisperModel(transformers.WhisperConfig(**config)).save_pretrained(tmp_path / "whisper")
    default_processor("audio", transformers.WhisperConfig(**config)).save_pretrained(tmp_path / "whisper")
    return config, tmp_path / "whisper"


def test_semantic_codec_codes_are_nearest_centroids_and_decode_to_waves():
    codec = SemanticAudioCodec(encoder=TINY_WHISPER, **TINY_SEMANTIC).eval()  # 1 s window: 25 code frames of 640 samples
    waves = [np.random.default_rng(i).standard_normal(16000).astype(np.float32) * 0.1 for i in range(2)]
    features = codec.processor()(waves, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert codec.num_frames(tuple(features.shape[1:])) == 25
    pooled = codec.features(features)
    codec.centroids.copy_(pooled[0, [3, 7, 1, 0, 12, 20, 5, 9]])
    codes = codec.encode(features)
    assert codes.shape == (2, 25, 1) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 8
    assert codes[0, [3, 7, 1, 0, 12, 20, 5, 9], 0].tolist() == list(range(8))
    both = codec.encode_with_features(features)
    assert torch.equal(both[0], codes) and torch.equal(both[1], pooled)
    decoded = codec.decode(codes)
    assert decoded.shape == (2, 25 * 640) and -1 <= decoded.min() and decoded.max() <= 1
    with pytest.raises(ValueError, match=r"expected input_features items of shape \(16, 100\), got \(16, 80\)"):
        codec.encode(features[..., :80])


def test_semantic_codec_pretrains_from_an_encoder_directory(tmp_path):
    _, encoder_dir = _whisper_dir(tmp_path, 100)
    out = pretrain_semantic_audio(tmp_path / "semantic", steps=6, batch_size=4, audio_encoder=str(encoder_dir), kmeans_clips=12,
                                  codec_settings=TINY_SEMANTIC)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert 0 < metrics["cluster_usage"] <= 1 and 0 <= metrics["label_purity"] <= 1 and "all" in metrics["pitch_kept"]

    codec = load_codec(out)
    whisper = transformers.WhisperModel.from_pretrained(encoder_dir).get_encoder()
    assert all(torch.equal(v, codec.encoder.state_dict()[k]) for k, v in whisper.state_dict().items())  # the frozen encoder
    assert codec.centroids.abs().sum() > 0
    _, waves = _world_waves(2)
    features = codec.processor()(list(waves.numpy()), sampling_rate=16000, return_tensors="pt")["input_features"]
    codes = codec.encode(features)
    assert codes.shape == (2, 50, 1) and codes.max() < 8
    assert codec.decode(codes).shape == (2, 32000)
    _same_architecture(codec, build_codec(codec.settings()))
    again = load_codec(out)
    assert torch.equal(again.encode(features), codes) and torch.equal(again.decode(codes), codec.decode(codes))


# --- transformers codecs -----------------------------------------------------------------------------


def test_chameleon_codec_encodes_and_cannot_decode(tmp_path):
    codec = build_codec({"kind": "chameleon", "hf_config": TINY_CHAMELEON})
    assert isinstance(codec, ChameleonCodec) and not codec.can_decode and codec.codebook_size == 64
    pixels = codec.processor()(images=[Image.new("RGB", (20, 16), (255, 255, 255))] * 2, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 16, 16) and torch.allclose(pixels, torch.ones_like(pixels), atol=0.02)  # [-1, 1] scale
    pixels = torch.randn(2, 3, 16, 16)
    codes = codec.encode(pixels)
    assert codes.shape == (2, codec.num_frames((3, 16, 16)), 1) == (2, 64, 1) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    with pytest.raises(NotImplementedError, match="no image decoder"):
        codec.decode(codes)

    save_codec(codec, tmp_path / "saved")
    assert torch.equal(load_codec(tmp_path / "saved").encode(pixels), codes)
    codec.model.save_pretrained(tmp_path / "hf")  # a ChameleonVQVAE checkpoint (model_type chameleon_vqgan)
    assert torch.equal(load_codec(tmp_path / "hf").encode(pixels), codes)


def test_chameleon_codec_reads_the_vqvae_of_a_full_chameleon_checkpoint(tmp_path):
    image_tokens = {f"IMGIMG{chr(65 + i)}Z": 10 + i for i in range(64)}
    config = transformers.ChameleonConfig(
        vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vq_config=TINY_CHAMELEON, vocabulary_map={"<image>": 79, **image_tokens}, image_token_id=79,
    )
    model = transformers.ChameleonForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "chameleon")
    codec = load_codec(tmp_path / "chameleon")
    pixels = torch.randn(1, 3, 16, 16)
    assert torch.equal(codec.encode(pixels)[..., 0], model.model.vqmodel.encode(pixels).image_tokens.view(1, -1))


def test_encodec_codec_round_trip(tmp_path):
    codec = build_codec({"kind": "encodec", "hf_config": TINY_ENCODEC, "bandwidth": 5.0})
    assert isinstance(codec, EncodecCodec) and codec.codebook_size == 32 and codec.num_codebooks == 2  # 500 frames/s * 5 bits
    assert build_codec({"kind": "encodec", "hf_config": TINY_ENCODEC}).num_codebooks == 1  # lowest bandwidth by default
    waves = torch.randn(2, 1000) * 0.1
    codes = codec.encode(waves)
    assert codes.shape == (2, codec.num_frames((1000,)), 2) == (2, 63, 2) and 0 <= codes.min() and codes.max() < 32
    assert torch.equal(codec.encode(waves[:, None]), codes)  # EncodecFeatureExtractor items are (1, samples)
    decoded = codec.decode(codes)
    assert decoded.shape == (2, 63 * 16) and decoded.abs().max() <= 1
    save_codec(codec, tmp_path / "saved")
    again = load_codec(tmp_path / "saved")
    assert torch.equal(again.encode(waves), codes) and torch.equal(again.decode(codes), decoded)
    with pytest.raises(ValueError, match="bandwidth 3.0 is not one of"):
        EncodecCodec(hf_config=TINY_ENCODEC, bandwidth=3.0)
    with pytest.raises(ValueError, match="normalize=True"):
        EncodecCodec(hf_config=dict(TINY_ENCODEC, normalize=True))


@pytest.mark.parametrize("kind, config, cls, samples, frames, codebooks", [
    ("mimi", TINY_MIMI, MimiCodec, 4000, 125, 4),  # 8000 Hz / 32 samples per frame
    ("dac", TINY_DAC, DacCodec, 1003, 125, 3),  # floor(1003 / 8)
])
def test_mimi_and_dac_codecs_round_trip(tmp_path, kind, config, cls, samples, frames, codebooks):
    codec = build_codec({"kind": kind, "hf_config": config, "num_quantizers": 2})
    assert isinstance(codec, cls) and (codec.codebook_size, codec.num_codebooks) == (32, 2)
    waves = torch.randn(2, samples) * 0.1
    codes = codec.encode(waves)
    assert codes.shape == (2, codec.num_frames((samples,)), 2) == (2, frames, 2) and codes.max() < 32
    decoded = codec.decode(codes)
    assert decoded.dim() == 2 and decoded.shape[0] == 2 and decoded.abs().max() <= 1
    codec.model.save_pretrained(tmp_path / "hf")
    again = load_codec(tmp_path / "hf")
    assert isinstance(again, cls) and again.num_codebooks == codebooks  # a checkpoint loads with every codebook
    assert torch.equal(again.encode(waves)[..., :2], codes)  # residual codes: the first two agree


# --- registry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"kind": "image", **TINY_IMAGE},
    {"kind": "audio", **TINY_AUDIO},
    {"kind": "semantic_audio", "encoder": TINY_WHISPER, **TINY_SEMANTIC},
    {"kind": "encodec", "hf_config": TINY_ENCODEC},
])
def test_build_codec_rebuilds_the_architecture_from_json_settings(settings):
    codec = build_codec(settings)
    assert not codec.training
    saved = json.loads(json.dumps(codec.settings()))
    assert saved["kind"] == settings["kind"]
    rebuilt = build_codec(saved)
    assert type(rebuilt) is type(codec) and json.loads(json.dumps(rebuilt.settings())) == saved
    _same_architecture(rebuilt, codec)


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="need a 'kind'"):
        build_codec({"image_size": 48})
    with pytest.raises(ValueError, match="unknown codec kind 'jpeg'"):
        build_codec({"kind": "jpeg"})
    vit = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    transformers.ViTModel(vit).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'vit'"):
        load_codec(tmp_path)


def test_world_registers_the_codec_builders():
    assert world.WORLD_BACKBONES["query_image_codec"].keywords["codec_settings"]["num_queries"] > 0  # SEED's tokens
    for name, builder in (("image_codec", pretrain_image_codec), ("query_image_codec", pretrain_image_codec),
                          ("audio_codec", pretrain_audio_codec),
                          ("semantic_audio", pretrain_semantic_audio)):
        assert world.WORLD_BACKBONES[name].func is builder
        assert world.WORLD_BACKBONES[name].keywords["allowed"] is not None  # held-out combinations stay out


def test_unified_image_codec_quantises_to_the_world_llms_word_vectors(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMFUSE_WORLD_STEPS_SCALE", "0.01")
    codec = load_codec("world:unified_image_codec")  # builds world:llm first
    llm = AutoModelForCausalLM.from_pretrained(world.build("llm"))
    tokenizer = AutoTokenizer.from_pretrained(world.build("llm"))
    start = shared_code_start(len(tokenizer), tokenizer.all_special_ids, world.UNIFIED_CODES)
    assert codec.text_ids_start == start and codec.codebook_size == world.UNIFIED_CODES
    words = llm.get_input_embeddings().weight[start: start + world.UNIFIED_CODES]
    assert torch.equal(codec.quantizer.frozen_codebook, words.detach())  # the codebook is the words' rows
    codes = codec.encode(_world_pixels(4))
    assert codes.shape == (4, 36, 1) and codec.decode(codes).shape == (4, 3, 48, 48)


# --- full-budget world codecs ------------------------------------------------------------------------


def _probe_accuracy(probe, media: torch.Tensor, truth: dict[str, list[str]]) -> dict[str, float]:
    predicted = probe.predict(media)
    return {k: float(np.mean([p == t for p, t in zip(predicted[k], truth[k])])) for k in truth}


@pytest.mark.full
def test_world_image_codec_quality():
    from mmfuse.eval.probes import load_probe

    metrics = json.loads((world.build("image_codec") / "pretrain_metrics.json").read_text())
    for key in ("psnr_scenes_db", "psnr_video_frames_db", "psnr_held_out_scenes_db"):
        assert metrics[key] >= 25, (key, metrics[key])
    assert metrics["psnr_scenes_db"] > metrics["psnr_blurry_baseline_db"] + 5
    assert metrics["held_out_colour_kept"] >= 0.95

    codec, rng = load_codec("world:image_codec"), random.Random(7)
    for pick in (shape_allowed, lambda s: not shape_allowed(s)):  # seen and held-out (colour, shape) pairs
        drawn = [sample_scene(rng, n_shapes=1, allowed=pick) for _ in range(200)]
        decoded = codec.decode(codec.encode(image_module.pixel_values(np.stack([render_array(s) for s in drawn]))))
        truth = {k: [getattr(s.shapes[0], k) for s in drawn] for k in ("colour", "shape", "size")}
        accuracy = _probe_accuracy(load_probe("image"), decoded, truth)
        assert min(accuracy.values()) >= 0.95, accuracy


# Probe accuracy floors on decoded one-event clips. Held-out (kind, pitch) pairs: the audio codec keeps
# their pitch, and decodes a low noise as a low noise but a high chirp as a high tone (it resolves
# the 2-4 kHz band poorly); semantic tokens inherit the world encoder, which does not tell held-out
# kinds apart, so only seen pairs are held to a floor there.
PROBE_FLOORS = {
    ("audio_codec", "seen"): {"kind": 0.95, "pitch": 0.95},
    ("audio_codec", "held_out"): {"pitch": 0.9},
    ("semantic_audio", "seen"): {"kind": 0.9, "pitch": 0.95},
}


@pytest.mark.full
@pytest.mark.parametrize("name", ["audio_codec", "semantic_audio"])
def test_world_audio_codecs_keep_pitch_and_kind(name):
    from mmfuse.eval.probes import load_probe

    metrics = json.loads((world.build(name) / "pretrain_metrics.json").read_text())
    assert metrics["pitch_kept"]["all"] >= 0.95, metrics["pitch_kept"]

    codec, rng = load_codec(f"world:{name}"), random.Random(7)
    for split, pick in (("seen", event_allowed), ("held_out", lambda e: not event_allowed(e))):
        if (name, split) not in PROBE_FLOORS:
            continue
        clips = [sounds.sample_clip(rng, n_events=1, allowed=pick) for _ in range(100)]
        waves = torch.from_numpy(np.stack([sounds.synthesize(c, rng=rng) for c in clips]))
        inputs = codec.processor()(list(waves.numpy()), sampling_rate=16000, return_tensors="pt")
        decoded = codec.decode(codec.encode(inputs["input_features" if "input_features" in inputs else "input_values"]))
        assert decoded.shape == waves.shape
        floors = PROBE_FLOORS[(name, split)]
        accuracy = _probe_accuracy(load_probe("audio"), decoded, {k: [getattr(c.events[0], k) for c in clips] for k in floors})
        assert all(accuracy[k] >= floor for k, floor in floors.items()), (name, split, accuracy)
