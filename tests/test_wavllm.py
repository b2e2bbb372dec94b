"""WavLLM: two audio encoders for one modality (Whisper on log-mel features, WavLM on the waveform), their
frames aligned, combined by the connector; frozen encoders and LLM base, LoRA; the two-stage curriculum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_WHISPER, tiny_config

from mmfuse.backbones.multi import MultiEncoder, align_frames
from mmfuse.config import ConnectorConfig, EncoderConfig, MultimodalConfig
from mmfuse.data.badsamples import BadSample
from mmfuse.data.dataset import ProcessedDataset
from mmfuse.data.formats import load_samples, resolve_dataset
from mmfuse.data.schema import Message, Sample
from mmfuse.data.synth import sounds
from mmfuse.data.synth.world import SplitSizes, WorldSizes, write_world
from mmfuse.fusion import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM
from mmfuse.recipe import list_recipes, load_recipe
from mmfuse.train import Trainer
from mmfuse.train.config import TrainConfig

WHISPER_2S = dict(TINY_WHISPER, max_source_positions=100)  # 2 s window: 200 mel frames -> 100 encoder frames
TINY_WAVLM = {"model_type": "wavlm", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "conv_dim": [8, 16], "conv_kernel": [10, 8], "conv_stride": [5, 16],
              "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "layerdrop": 0.0,
              "hidden_dropout": 0.0, "apply_spec_augment": False}  # 400 frames per 2 s
NO_SIZES = SplitSizes(0, 0, 0, 0)


def wavllm_config(tokenizer_dir, **connector) -> MultimodalConfig:
    """The wavllm recipe's model with tiny random backbones."""
    cfg = tiny_config(tokenizer_dir, image=None, audio="linear")
    cfg.encoders["audio"] = EncoderConfig(modality="audio", hf_config=dict(WHISPER_2S),
                                          extra=[EncoderConfig(modality="audio", hf_config=dict(TINY_WAVLM))])
    recipe = load_recipe("wavllm").model.connectors["audio"]
    cfg.connectors["audio"] = ConnectorConfig(**{**recipe.to_dict(), **connector})
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world of sound clips only."""
    sizes = WorldSizes(images=NO_SIZES, sounds=SplitSizes(6, 2, 2, 2), videos=NO_SIZES, documents=NO_SIZES,
                       generations=NO_SIZES, binding=NO_SIZES, text=SplitSizes(0, 0, 0, 0), digits=0)
    return write_world(tmp_path_factory.mktemp("world") / "w", seed=0, sizes=sizes)


def _sample(world, index=0, sid="s"):
    clip = f"audio/audio-train-{index:05d}.wav"
    return Sample(sid, [Message("user", "<audio>\nWhat is the pitch of the tone?"), Message("assistant", "high")],
                  {"audio": [world / clip]})


def test_recipe_is_listed_type_c_with_two_frozen_encoders_lora_and_a_two_stage_curriculum():
    assert "wavllm" in list_recipes()
    recipe = load_recipe("wavllm")
    assert recipe.survey_type == "C" and "prompt-aware LoRA" in recipe.description
    audio = recipe.model.encoders["audio"]
    assert (audio.name_or_path, [e.name_or_path for e in audio.extra]) == ("world:audio", ["world:acoustic"])
    single, multi = recipe.train.stages
    assert single.data == ["audio_caption", "audio_qa"] and "audio_multi_qa" not in single.data
    assert multi.data[0] == "audio_multi_qa"
    for stage in (single, multi):  # encoders and LLM base frozen: only the connector trains, the LLM through LoRA
        assert stage.train == ["connectors"] and stage.lora == ["llm"]


def test_processor_feeds_each_encoder_its_own_features_and_both_reach_the_output(tokenizer_dir, world):
    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir)).eval()
    processor, encoder = model.media_processors["audio"], model.encoders["audio"]
    assert isinstance(encoder, MultiEncoder)
    assert processor.shapes == [(16, 200), (32000,)]  # log-mel for Whisper, the raw waveform for WavLM
    a, b = (model.processor(_sample(world, i)).media["audio"] for i in (0, 1))
    assert a.shape == (1, 16 * 200 + 32000)
    wave = sounds.read_wav(world / "audio/audio-train-00000.wav")[0]
    mel, values = a[0].split([3200, 32000])
    whisper_features, wavlm_values = (p.hf_processor(wave, sampling_rate=16000, return_tensors="pt") for p in processor.processors)
    assert torch.equal(mel, whisper_features["input_features"][0].flatten())  # Whisper: its log-mel features
    assert torch.equal(values, wavlm_values["input_values"][0])  # WavLM: the (normalised) waveform
    with torch.no_grad():  # the packed features are each encoder's own, on its own part of the input
        features = encoder(a)
        whisper, wavlm = encoder.encoders
        assert torch.equal(features[..., :24], whisper(mel.reshape(1, 16, 200)))
        assert torch.equal(features[..., 24:], align_frames(wavlm(values[None]), 100))

    batch = model.collator()([model.processor(_sample(world, 0))])

    def logits(media):
        with torch.no_grad():
            return model(**{**batch, "media": {"audio": media}}).logits

    whisper_from_b = torch.cat([b[:, :3200], a[:, 3200:]], dim=1)  # only Whisper's input changes
    wavlm_from_b = torch.cat([a[:, :3200], b[:, 3200:]], dim=1)  # only WavLM's input changes
    reference = logits(a)
    assert not torch.allclose(logits(whisper_from_b), reference)
    assert not torch.allclose(logits(wavlm_from_b), reference)


def test_frames_are_aligned_to_the_first_encoder(tokenizer_dir, world):
    x = torch.arange(2 * 400 * 3, dtype=torch.float32).reshape(2, 400, 3)
    pooled = align_frames(x, 100)
    assert pooled.shape == (2, 100, 3)
    torch.testing.assert_close(pooled, x.reshape(2, 100, 4, 3).mean(2))  # each frame: the 4 it spans
    assert align_frames(x, 400) is x
    repeated = align_frames(x[:, :50], 100)
    assert torch.equal(repeated, x[:, :50].repeat_interleave(2, dim=1))
    assert align_frames(x[:, :99], 100).shape == (2, 100, 3)  # WavLM's 99 frames to Whisper's 100

    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir)).eval()
    enc = model.processor(_sample(world))
    with torch.no_grad():
        whisper, wavlm = model.encoders["audio"].encoders
        assert whisper(torch.zeros(1, 16, 200)).shape[1] == 100 and wavlm(torch.zeros(1, 32000)).shape[1] == 400
        assert model.encoders["audio"](enc.media["audio"]).shape == (1, 100, 24 + 16)
        tokens = model.encode_media(enc.media)["audio"]
    assert tokens.shape == (1, 50, 32)  # pool_stride 2
    assert int((torch.tensor(enc.input_ids) == PLACEHOLDER_IDS["audio"]).sum()) == 50


def test_connector_projects_each_encoder_then_their_concatenation(tokenizer_dir):
    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir))
    connector = model.connectors["audio"]
    assert connector.combine.widths == [24, 16] and connector.input_norm is None
    assert [p[0].in_features for p in connector.combine.projectors] == [24, 16]
    assert [p[-1].out_features for p in connector.combine.projectors] == [16, 16]  # half the LLM width each
    assert (connector.core.in_features, connector.core.out_features) == (32, 32)
    plain = MultimodalLM.from_config(wavllm_config(tokenizer_dir, encoder_projector=None, input_norm=False))
    assert plain.connectors["audio"].core.in_features == 24 + 16  # the concatenation goes straight to the core


def test_curriculum_trains_lora_and_connector_on_each_stages_data_and_leaves_encoders_frozen(tokenizer_dir, world, tmp_path):
    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir))
    stages = [s.to_dict() | {"steps": 3, "batch_size": 8} for s in load_recipe("wavllm").train.stages]
    config = TrainConfig.from_dict({"stages": stages, "output_dir": str(tmp_path / "run"), "save_every": 100})
    names = {name for s in config.stages for name in s.data}

    class Recorded(ProcessedDataset):
        def __init__(self, name):
            super().__init__(load_samples(resolve_dataset(world, name, "train")), model.processor)
            self.name = name

        def __getitem__(self, index):
            read.append(self.name)
            return super().__getitem__(index)

    read: list[str] = []
    datasets = {name: Recorded(name) for name in names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: dict[int, set[str]] = {}
    mid_stage = {}

    def on_step(m, position):
        seen.setdefault(position.stage_index, set()).update(read)
        read.clear()
        if position.global_step == 2:  # inside stage 1, after a step at a learning rate > 0 (the first warms up from 0)
            mid_stage.update({n: p.detach().clone() for n, p in m.named_parameters()})

    Trainer(model, config, datasets, model.collator(), progress=False, on_step=on_step).train()
    assert seen[0] and seen[0] <= {"audio_caption", "audio_qa"}  # single tasks first
    assert "audio_multi_qa" in seen[1] and seen[1] <= {"audio_multi_qa", "audio_qa"}  # then complex instructions

    lora = {n for n in mid_stage if "lora_" in n}
    assert lora and all(".self_attn." in n for n in lora)
    assert any(not torch.equal(mid_stage[n], torch.zeros_like(mid_stage[n])) for n in lora if "lora_B" in n)
    for name, value in mid_stage.items():
        if name in lora:
            continue
        old = before[name.replace(".base_layer", "")]
        if name.startswith("connectors."):
            assert not torch.equal(value, old), name  # both encoders' projectors and the final layer move
        else:  # both encoders and every LLM base weight stay bit-identical
            assert torch.equal(value, old), name
    final = dict(model.named_parameters())
    assert not any("lora_" in n for n in final)  # merged at each stage's end
    assert all(torch.equal(final[n], before[n]) for n in before if n.startswith("encoders.audio.encoders."))
    assert not torch.equal(final["llm.model.layers.0.self_attn.q_proj.weight"], before["llm.model.layers.0.self_attn.q_proj.weight"])


def test_save_load_round_trip_identical_logits(tokenizer_dir, world, tmp_path):
    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir)).eval()
    batch = model.collator()([model.processor(_sample(world))])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]["encoders"]["audio"]
    assert saved["extra"][0]["hf_config"]["model_type"] == "wavlm"
    extractor = json.loads((tmp_path / "ckpt" / "processors" / "audio" / "extra-0" / "preprocessor_config.json").read_text())
    assert extractor["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.encoders["audio"], MultiEncoder)
    batch2 = loaded.collator()([loaded.processor(_sample(world))])
    assert torch.equal(batch2["media"]["audio"], batch["media"]["audio"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch2).logits, before)


def test_bad_configs_and_inputs_raise_clear_errors(tokenizer_dir, world):
    with pytest.raises(ValueError, match=r"encoders\.image\.extra: .*audio only"):
        MultimodalConfig.from_dict({"encoders": {"image": {"modality": "image", "extra": [{"modality": "image"}]}},
                                    "connectors": {"image": {}}})
    with pytest.raises(ValueError, match=r"encoders\.audio\.extra\[0\]: needs modality 'audio' \(got 'image'\)"):
        MultimodalConfig.from_dict({"encoders": {"audio": {"modality": "audio", "extra": [{"name_or_path": "x"}]}},
                                    "connectors": {"audio": {}}})
    single = tiny_config(tokenizer_dir, image=None, audio="linear")
    single.connectors["audio"].encoder_projector = "mlp2x_gelu"
    with pytest.raises(ValueError, match="encoder_projector 'mlp2x_gelu' maps each of several encoders"):
        MultimodalLM.from_config(single)
    waveform_first = wavllm_config(tokenizer_dir)
    waveform_first.encoders["audio"] = EncoderConfig(modality="audio", hf_config=dict(TINY_WAVLM),
                                                     extra=[EncoderConfig(modality="audio", hf_config=dict(WHISPER_2S))])
    with pytest.raises(ValueError, match="no fixed window .* list a fixed-window encoder first"):
        MultimodalLM.from_config(waveform_first)
    other_rate = wavllm_config(tokenizer_dir)
    other_rate.encoders["audio"].extra[0].processor = {"type": "Wav2Vec2FeatureExtractor", "sampling_rate": 8000}
    with pytest.raises(ValueError, match=r"encoders\.audio\.extra\[0\]: .*8000 Hz"):
        MultimodalLM.from_config(other_rate)

    model = MultimodalLM.from_config(wavllm_config(tokenizer_dir))
    long_clip = np.zeros(3 * 16000, dtype=np.float32)
    with pytest.raises(BadSample, match=r"'long'.*audio\[0\].*longer than the encoder's 2\.00 s window"):
        model.processor(Sample("long", [Message("user", "<audio> hi"), Message("assistant", "x")], {"audio": [long_clip]}))
    with pytest.raises(ValueError, match=r"expected packed inputs \(items, 35200\) holding \(16, 200\) \+ \(32000,\), got \(1, 3200\)"):
        model.encoders["audio"](torch.zeros(1, 3200))
