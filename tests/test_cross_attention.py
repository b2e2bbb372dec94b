"""Type-A gated cross-attention fusion on tiny Llama, Qwen2 and GPT-2 configs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mmfuse.config import ConnectorConfig, FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.eval.adapter import EvalAdapter
from mmfuse.eval.metrics import perplexity
from mmfuse.fusion.cross_attention import cross_attention_layers
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.lora import has_lora, lora_parameters, merge_lora
from mmfuse.train.stage import apply_stage


def _model(tokenizer_dir, llm="llama", media_attention="immediate", **options) -> MultimodalLM:
    config = tiny_config(tokenizer_dir, llm, fusion=FusionConfig(type="A", options={"media_attention": media_attention, **options}))
    config.connectors["image"] = ConnectorConfig(kind="perceiver", num_latents=4, depth=1, num_heads=4)
    return MultimodalLM.from_config(config).eval()


def _open_gates(model, attn=1.0, ff=1.0):
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)


def _two_images(media_dir, first="a.png"):
    return Sample("s", [Message("user", "look <image> a red one, and now <image> what colour?"), Message("assistant", "red")],
                  {"image": [media_dir / first, media_dir / "b.png"]})


def _logits(model, samples):
    batch = model.collator()([model.processor(s) for s in samples])
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], media=batch["media"]).logits, batch


@pytest.mark.parametrize("llm", ["llama", "qwen2", "gpt2"])
def test_closed_gates_give_the_bare_llms_logits(llm, tokenizer_dir, media_dir):
    model = _model(tokenizer_dir, llm)
    assert len(model.fusion.blocks) == 2
    logits, batch = _logits(model, [_two_images(media_dir)])
    with torch.no_grad():
        embeds = model.fusion.llm_inputs(model.llm, batch["input_ids"], model.encode_media(batch["media"]))["inputs_embeds"]
        bare = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits  # no media context: no blocks run
    torch.testing.assert_close(logits, bare)
    text = Sample("t", [Message("user", "what is two plus two?"), Message("assistant", "four")])
    logits, batch = _logits(model, [text])
    with torch.no_grad():
        torch.testing.assert_close(logits, model.llm(batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    _open_gates(model)
    assert not torch.equal(_logits(model, [_two_images(media_dir)])[0], bare)  # open gates: the media reach the LLM


def test_swiglu_blocks_have_llamas_mlp_and_start_closed(tokenizer_dir, media_dir, tmp_path):
    """``ffn="swiglu"``: the cross layers' MLP of IDEFICS and mllama (Llama's), in place of OpenFlamingo's GELU FFN."""
    model = _model(tokenizer_dir, ffn="swiglu", ff_mult=4)
    block = model.fusion.blocks[0]
    d = block.to_q.in_features
    mlp = block.ff[1]
    assert [tuple(m.weight.shape) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [(4 * d, d), (4 * d, d), (d, 4 * d)]
    reference = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=4 * d, hidden_act="silu", mlp_bias=False))
    reference.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        torch.testing.assert_close(block.ff(x), reference(block.ff[0](x)))
    logits, batch = _logits(model, [_two_images(media_dir)])
    with torch.no_grad():
        embeds = model.fusion.llm_inputs(model.llm, batch["input_ids"], model.encode_media(batch["media"]))["inputs_embeds"]
        torch.testing.assert_close(logits, model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits)
    _open_gates(model, 0.5, 0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(model, [_two_images(media_dir)])[0], _logits(loaded, [_two_images(media_dir)])[0])
    with pytest.raises(ValueError, match=r"ffn must be one of \('gelu', 'swiglu'\), got 'relu'"):
        _model(tokenizer_dir, ffn="relu")


@pytest.mark.parametrize("media_attention", ["immediate", "all_previous"])
def test_media_masks(media_attention, tokenizer_dir, media_dir):
    """The first block runs on the input embeddings, which do not depend on the images: its output shows
    which images each token attended to (later layers mix them through self-attention, as in Flamingo)."""
    model = _model(tokenizer_dir, media_attention=media_attention)
    _open_gates(model)
    seen = []
    model.fusion.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out))
    _logits(model, [_two_images(media_dir, "a.png"), _two_images(media_dir, "b.png")])
    a, b = seen[0]
    ids = model.processor(_two_images(media_dir)).input_ids
    first, second = [i for i, t in enumerate(ids) if t < 0]
    torch.testing.assert_close(a[:first], b[:first])  # nothing seen yet
    assert not torch.allclose(a[first:second], b[first:second])  # text after image 1 sees image 1
    if media_attention == "immediate":
        torch.testing.assert_close(a[second:], b[second:])
    else:
        assert not torch.allclose(a[second:], b[second:])


def test_items_of_different_modalities_are_ordered_by_their_markers(tokenizer_dir, media_dir):
    config = tiny_config(tokenizer_dir, audio="linear", fusion=FusionConfig(type="A", options={"media_attention": "immediate"}))
    model = MultimodalLM.from_config(config).eval()
    _open_gates(model)
    seen = []
    model.fusion.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out))

    def sample(image, quiet):
        wave = media_dir / "a.wav" if not quiet else torch.zeros(8000).numpy()
        return Sample("m", [Message("user", "hear <audio> then see <image> say"), Message("assistant", "x")],
                      {"audio": [wave], "image": [media_dir / image]})

    _logits(model, [sample("a.png", False), sample("b.png", False), sample("a.png", True)])
    base, other_image, other_audio = seen[0]
    first, second = [i for i, t in enumerate(model.processor(sample("a.png", False)).input_ids) if t < 0]
    torch.testing.assert_close(base[first:second], other_image[first:second])  # audio span: no image
    assert not torch.allclose(base[first:second], other_audio[first:second])
    torch.testing.assert_close(base[second:], other_audio[second:])  # image span: no audio
    assert not torch.allclose(base[second:], other_image[second:])


def test_each_block_projects_each_modality_from_its_own_width(tokenizer_dir):
    config = tiny_config(tokenizer_dir, audio="linear", fusion=FusionConfig(type="A"))
    model = MultimodalLM.from_config(config)
    for modality, encoder in model.encoders.items():  # connectors keep the encoder width (OpenFlamingo)
        width = encoder.hidden_size
        assert all(block.media[modality].to_k.in_features == width for block in model.fusion.blocks)
    image_only = MultimodalLM.from_config(tiny_config(tokenizer_dir, fusion=FusionConfig(type="A")))
    assert sorted(image_only.fusion.blocks[0].media) == ["image"] and sorted(image_only.fusion.markers.embeddings) == ["image"]


def test_text_before_any_media_gets_exactly_zero_cross_attention(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    _open_gates(model, attn=1.0, ff=0.0)
    calls = []
    for block in model.fusion.blocks:
        block.register_forward_hook(lambda module, args, out: calls.append((args[0], out)))
    logits, batch = _logits(model, [_two_images(media_dir)])
    first = [i for i, t in enumerate(batch["input_ids"][0].tolist()) if t < 0][0]
    assert torch.isfinite(logits).all() and len(calls) == 2
    for before, after in calls:
        torch.testing.assert_close(after[:, :first], before[:, :first])
        assert not torch.allclose(after[:, first:], before[:, first:])


def test_cached_and_uncached_generation_agree(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir, "qwen2")
    _open_gates(model, 0.7, 0.3)
    samples = [_two_images(media_dir), Sample("q", [Message("user", "<image> colour?")], {"image": [media_dir / "b.png"]})]
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    cached = model.generate(**batch, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    alone = model.collator("left")([model.processor(samples[1], for_generation=True)])
    assert torch.equal(model.generate(**alone, **kw)[0], cached[1])  # left padding changes nothing
    assert model.fusion._generation_context is None  # the generation context does not outlive the call


def test_frozen_llm_is_bit_identical_after_a_step(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir).train()
    params = apply_stage(model, StageConfig(name="x", train=["fusion", "connectors"], data=["d"], steps=1, lr=1e-2))
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    gates_before = [b.attn_gate.item() for b in model.fusion.blocks]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = model.collator()([model.processor(_two_images(media_dir))])
    model(**batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())
    assert [b.attn_gate.item() for b in model.fusion.blocks] != gates_before  # the zero gates get a gradient


def test_text_perplexity_goes_through_the_blocks(tokenizer_dir):
    model = _model(tokenizer_dir)
    adapter, texts = EvalAdapter(model), ["a red circle at the top.", "two plus two is four."]
    bare = perplexity(model.llm, model.tokenizer, texts)
    assert adapter.text_perplexity(texts) == pytest.approx(bare, rel=1e-6)  # closed gates
    _open_gates(model, attn=1.0, ff=1.0)
    assert adapter.text_perplexity(texts) != pytest.approx(bare, rel=1e-5)  # the gated FFN runs on text too


def test_lora_on_self_and_cross_attention_merges_back(tokenizer_dir, media_dir):
    """MultiModal-GPT: LoRA on the LLM's attention and on the cross-attention blocks; base weights frozen."""
    model = _model(tokenizer_dir).train()
    _open_gates(model, 0.5, 0.5)
    stage = StageConfig(name="lora", lora=["llm", "fusion"], data=["d"], steps=1, lr=1e-2,
                        lora_target_modules=["q_proj", "v_proj", "to_q", "to_k", "to_v", "to_out", "ff.1", "ff.3"])
    params = apply_stage(model, stage)
    names = [n for n, _ in lora_parameters(model)]
    assert any(n.startswith("fusion.blocks.0.media.image.to_k") for n in names) and any(n.startswith("llm.") for n in names)
    assert any(n.startswith("fusion.blocks.0.ff.1") for n in names)
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD(params, lr=1.0)
    batch = model.collator()([model.processor(_two_images(media_dir))])
    model(**batch).loss.backward()
    optimizer.step()
    with torch.no_grad():
        for module in model.modules():  # make the update visible: lora_B starts at zero
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(std=0.1)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    merge_lora(model.llm)
    merge_lora(model.fusion)
    assert not has_lora(model.llm) and not has_lora(model.fusion)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-4, atol=1e-5)


def test_placements():
    assert cross_attention_layers(8, 4, "openflamingo") == [3, 7]
    assert cross_attention_layers(8, 4, "idefics") == [0, 4]
    assert cross_attention_layers(8, 1, [5, 2]) == [2, 5]
    with pytest.raises(ValueError, match="placement"):
        cross_attention_layers(8, 2, "every")
    with pytest.raises(ValueError, match="indices"):
        cross_attention_layers(8, 2, [9])


def test_marker_count_mismatch_is_an_error(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    batch = model.collator()([model.processor(_two_images(media_dir))])
    with pytest.raises(ValueError, match="2 media markers but 1"):
        model(**{**batch, "media": {"image": batch["media"]["image"][:1]}})


def test_save_and_load_round_trip(tokenizer_dir, media_dir, tmp_path):
    model = _model(tokenizer_dir)
    _open_gates(model, 0.5, 0.5)
    model.save_pretrained(tmp_path / "m")
    assert MultimodalLM.is_checkpoint(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").to("cpu", torch.float32)  # nn.Module methods still work
    torch.testing.assert_close(_logits(model, [_two_images(media_dir)])[0], _logits(loaded, [_two_images(media_dir)])[0])
