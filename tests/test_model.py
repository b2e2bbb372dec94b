"""MultimodalLM (Type-C): the same code path on Llama, Qwen2 and GPT-2; save/load; generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT, tiny_config

from mmfuse.config import ConnectorConfig, EncoderConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage


def _sample(media_dir, sid="s0", answer="red", image="a.png"):
    return Sample(sid, [Message("user", f"<image>\nwhat colour is it? <audio>"), Message("assistant", answer)],
                  {"image": [media_dir / image], "audio": [media_dir / "a.wav"]})


@pytest.mark.parametrize("llm", ["llama", "qwen2", "gpt2"])
def test_same_path_on_every_llm(llm, tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, image="mlp2x_gelu", audio="linear"))
    batch = model.collator()([model.processor(_sample(media_dir)), model.processor(_sample(media_dir, "s1", "blue", "b.png"))])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    connector_grads = [p.grad for p in model.connectors.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in connector_grads)
    # The media reached the LLM: changing the image changes the logits at the answer.
    other = model.collator()([model.processor(_sample(media_dir, image="b.png")), model.processor(_sample(media_dir, "s1", "blue", "b.png"))])
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits[0], model(**other).logits[0])


def test_placeholder_positions_equal_encoder_output(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, image="linear", audio="linear"))
    enc = model.processor(_sample(media_dir))
    ids = torch.tensor(enc.input_ids)
    with torch.no_grad():
        feats = model.encode_media(enc.media)
    assert int((ids == PLACEHOLDER_IDS["image"]).sum()) == feats["image"].shape[1] == (16 // 8) ** 2  # CLS dropped
    assert int((ids == PLACEHOLDER_IDS["audio"]).sum()) == feats["audio"].shape[1] == 50 // 2  # pooled by 2


def test_siglip_has_no_cls_and_the_count_follows_the_real_output(tokenizer_dir, media_dir):
    siglip = {"model_type": "siglip_vision_model", "image_size": 16, "patch_size": 8, "hidden_size": 24,
              "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48}
    cfg = tiny_config(tokenizer_dir, image=None)
    cfg.encoders["image"] = EncoderConfig(modality="image", hf_config=siglip, feature_layer=-1)
    cfg.connectors["image"] = ConnectorConfig(kind="linear")
    model = MultimodalLM.from_config(cfg)
    sample = Sample("s", [Message("user", "<image> hi"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    ids = torch.tensor(model.processor(sample).input_ids)
    assert int((ids == PLACEHOLDER_IDS["image"]).sum()) == 4  # 2x2 patches, nothing dropped


def test_placeholder_mismatch_raises_with_ids_and_counts(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    sample = Sample("s-7", [Message("user", "<image> hi"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    batch = model.collator()([model.processor(sample)])
    batch["input_ids"][0, 1] = PLACEHOLDER_IDS["image"]  # one position too many
    with pytest.raises(ValueError, match=r"s-7.*5 placeholder positions.*4 feature vectors"):
        model(**batch)


def test_save_load_round_trip_identical_logits(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, "qwen2", image="qformer", audio="linear")).eval()
    batch = model.collator()([model.processor(_sample(media_dir))])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["survey_type"] == "C"
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    batch2 = loaded.collator()([loaded.processor(_sample(media_dir))])
    with torch.no_grad():
        after = loaded(**batch2).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("llm", ["llama", "gpt2"])
def test_cached_and_uncached_greedy_generation_agree(llm, tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, audio="linear")).eval()
    samples = [_sample(media_dir), Sample("short", [Message("user", "<image>")], {"image": [media_dir / "b.png"]})]
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    assert batch["attention_mask"][1, 0] == 0  # left padded
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = model.generate(**batch, use_cache=True, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # Left padding does not change a prompt's continuation.
    alone = model.collator("left")([model.processor(samples[1], for_generation=True)])
    assert torch.equal(model.generate(**alone, **kw)[0], cached[1])


def test_sampling_is_seeded(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir)).eval()
    sample = Sample("s", [Message("user", "<image>")], {"image": [media_dir / "a.png"]})
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(model.answer([sample], max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9))
    assert outs[0] == outs[1]


def test_parameter_groups_cover_every_parameter(tokenizer_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear"))
    groups = model.parameter_groups()
    assert set(groups) == {"llm", "llm.embeddings", "llm.head", "llm.norms", "encoders.image", "encoders.audio",
                           "connectors.image", "connectors.audio"}
    assert all("norm" in name for name, _ in groups["llm.norms"]) and len(groups["llm.norms"]) == 2 * 2 + 1
    assert groups["llm.embeddings"] == [("llm.model.embed_tokens.weight", model.llm.get_input_embeddings().weight)]
    assert groups["llm.head"] == [("llm.lm_head.weight", model.llm.get_output_embeddings().weight)]  # untied here
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    counts = model.parameter_counts()
    assert counts["all"]["total"] == sum(p.numel() for p in model.parameters())


def test_encoder_feature_layer_is_used(tokenizer_dir, media_dir):
    cfg = tiny_config(tokenizer_dir)
    model = MultimodalLM.from_config(cfg)
    pixels = model.processor(Sample("s", [Message("user", "<image>"), Message("assistant", "x")], {"image": [media_dir / "a.png"]})).media["image"]
    with torch.no_grad():
        hidden = model.encoders["image"].model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.equal(model.encoders["image"](pixels), hidden[-2][:, 1:])
    assert TINY_VIT["num_hidden_layers"] + 1 == len(hidden)


OTTER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}<|endofchunk|>"
    "{% else %}User: {{ m['content'] }} GPT:<answer>{% endif %}{% endfor %}"
)


def test_added_tokens_grow_the_vocabulary_and_survive_save_load(tokenizer_dir, media_dir, tmp_path):
    base = len(MultimodalLM.from_config(tiny_config(tokenizer_dir)).tokenizer)
    cfg = tiny_config(tokenizer_dir, audio="linear", chat_template=OTTER_TEMPLATE, vocab_size=base)  # no spare rows: must grow
    cfg.llm.add_tokens = ["<answer>", "<|endofchunk|>"]
    model = MultimodalLM.from_config(cfg)
    tok = model.tokenizer
    end = tok.convert_tokens_to_ids("<|endofchunk|>")
    assert end == base + 1 and tok.convert_tokens_to_ids("<answer>") == base
    assert len(tok) == model.llm.get_input_embeddings().num_embeddings == model.llm.config.vocab_size == base + 2
    assert end in model.processor.stop_token_ids  # the template's end of turn, found after " <reply>"
    encoded = model.processor(_sample(media_dir))
    labelled = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert labelled[-1] == end and tok.decode(labelled, skip_special_tokens=True).strip() == "red"
    # training only the embeddings (Otter's new rows) leaves the rest of the LLM as it was
    params = apply_stage(model, StageConfig(name="e", train=["llm.embeddings"], data=["d"], steps=1, lr=1.0))
    assert params == [model.llm.get_input_embeddings().weight]
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m")
    assert len(loaded.tokenizer) == base + 2
    batch = model.collator()([model.processor(_sample(media_dir))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)
