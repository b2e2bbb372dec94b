"""Type-B adapter prompts (LLaMA-Adapter V1) on tiny Llama, Qwen2 and GPT-2 configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLMS, tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig

from mmfuse.config import FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.adapter import AdapterPromptFusion, adapted_layers
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage


def _model(tokenizer_dir, llm="llama", **options) -> MultimodalLM:
    fusion = FusionConfig(type="B", options={"mechanism": "adapter_prompts", "prompt_length": 3, **options})
    return MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, fusion=fusion)).eval()


def _text_batch(model):
    return model.collator()([model.processor(Sample("t", [Message("user", "what colour is it?"), Message("assistant", "red")]))])


def _image_sample(media_dir, image="a.png"):
    return Sample("i", [Message("user", "<image>\nwhat colour is the circle?"), Message("assistant", "red")],
                  {"image": [media_dir / image]})


def _open_gates(model, value=1.0):
    with torch.no_grad():
        model.fusion.gates.fill_(value)


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_closed_gates_give_the_bare_llms_logits_and_open_gates_do_not(llm, tokenizer_dir):
    model = _model(tokenizer_dir, llm)
    batch = _text_batch(model)
    bare = AutoModelForCausalLM.from_config(copy.deepcopy(model.llm.config)).eval()  # its own config: the attention setting is per config
    bare.load_state_dict(model.llm.state_dict())
    bare.set_attn_implementation(model.fusion.base_attention)
    with torch.no_grad():
        reference = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(model(**batch).logits, reference)  # the term is 0 * finite; float32 tolerance, as two models may take different kernels
        _open_gates(model)
        assert (model(**batch).logits - reference).abs().max() > 1e-2  # far outside the tolerance above


def test_prompt_term_matches_a_separate_softmax_over_prompt_keys(tokenizer_dir):
    model = _model(tokenizer_dir, layers=1)
    fusion, attention = model.fusion, model.llm.model.layers[1].self_attn
    _open_gates(model, 0.5)
    query = torch.randn(2, 4, 5, attention.head_dim)  # 4 query heads, 2 key/value heads
    got = fusion.prompt_attention(attention, 0, query, attention.head_dim**-0.5, None)
    keys = attention.k_proj(fusion.prompts[0]).view(3, 2, -1).transpose(0, 1)  # (kv_heads, K, head_dim): no rotary
    values = attention.v_proj(fusion.prompts[0]).view(3, 2, -1).transpose(0, 1)
    for head in range(4):
        kv = head // 2  # grouped-query attention: query heads 0-1 share key/value head 0
        weights = torch.softmax(query[:, head] @ keys[kv].T / attention.head_dim**0.5, dim=-1)
        torch.testing.assert_close(got[:, :, head], torch.tanh(torch.tensor(0.5)) * weights @ values[kv])


def test_only_the_top_layers_are_adapted(tokenizer_dir):
    assert adapted_layers(32, 30) == list(range(2, 32)) and adapted_layers(4, None) == [0, 1, 2, 3]
    assert adapted_layers(4, [3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="top L layers"):
        adapted_layers(4, 5)
    model = _model(tokenizer_dir, layers=1)
    batch = _text_batch(model)
    hidden = {}
    for index, layer in enumerate(model.llm.model.layers):
        layer.register_forward_hook(lambda mod, args, out, index=index: hidden.__setitem__(index, (out[0] if isinstance(out, tuple) else out).clone()))
    with torch.no_grad():
        model(**batch)
        closed = dict(hidden)
        _open_gates(model)
        model(**batch)
    torch.testing.assert_close(hidden[0], closed[0])  # layer 0 has no prompts
    assert (hidden[1] - closed[1]).abs().max() > 1e-3


def test_image_feature_is_added_to_every_prompt(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    _open_gates(model)
    collate = model.collator()
    logits = []
    for image in ("a.png", "b.png"):
        with torch.no_grad():
            logits.append(model(**collate([model.processor(_image_sample(media_dir, image))])).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    with torch.no_grad():  # the text before the image sees the image too: prompts are visible to every token
        batch = collate([model.processor(_image_sample(media_dir))])
        inputs = model.llm_inputs(batch["input_ids"], batch["media"])
        assert inputs["adapter_context"].shape == (1, model.llm.config.hidden_size)


def test_cached_and_uncached_generation_agree(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    _open_gates(model, 0.7)
    batch = model.collator("left")([model.processor(_image_sample(media_dir, image), for_generation=True)
                                    for image in ("a.png", "b.png")])
    kw = dict(max_new_tokens=6, do_sample=False)
    cached = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], use_cache=True, **kw)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert model.fusion._generation_context is None


def test_frozen_llm_is_bit_identical_after_a_step_and_the_gates_move(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir).train()
    params = apply_stage(model, StageConfig(name="x", train=["fusion", "connectors"], data=["d"], steps=1, lr=1e-2))
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(**model.collator()([model.processor(_image_sample(media_dir))])).loss.backward()
    assert model.fusion.gates.grad.abs().sum() > 0  # zero gates still get a gradient
    optimizer.step()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in before.items())
    assert model.fusion.gates.abs().sum() > 0


def test_linear_gate_and_save_load(tokenizer_dir, media_dir, tmp_path):
    model = _model(tokenizer_dir, gate="linear")
    _open_gates(model, 0.3)
    batch = model.collator()([model.processor(_image_sample(media_dir))])
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="gate must be one of"):
        AdapterPromptFusion(gate="sigmoid")


def test_llama_adapter_parameter_count_at_llama_7b():
    """LLaMA-Adapter on LLaMA-7B: 10 prompts x 30 layers x 4096 = 1,228,800 (+ 30 x 32 gates), ~1.2M."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    fusion = AdapterPromptFusion(prompt_length=10, layers=30)
    fusion.attach(llm, {})
    assert sum(p.numel() for p in fusion.parameters()) == 10 * 30 * 4096 + 30 * 32


def test_v1_global_feature_changes_every_querys_prompt_term_by_the_same_vector(tokenizer_dir):
    """V1's structural limit: the global feature moves every prompt key by one vector, which the separate
    softmax cancels, so what the image adds is ``gate * W_v g`` at every position, whatever the text
    asks (a frozen LLM must read "the colour of the square" from a constant shift). V2's per-prompt
    visual tokens do not have this limit."""
    model = _model(tokenizer_dir, layers=1)
    _open_gates(model)
    attention = model.llm.model.layers[1].self_attn
    query = torch.randn(1, 4, 6, attention.head_dim)  # 6 positions asking different things
    feature = torch.randn(1, model.llm.config.hidden_size)
    with torch.no_grad():
        term = lambda media: model.fusion.prompt_attention(attention, 0, query, 0.5, media)  # noqa: E731
        added = term(feature) - term(None)  # (1, positions, heads, head_dim)
        shift = attention.v_proj(feature).view(1, 2, attention.head_dim).repeat_interleave(2, dim=1)
        torch.testing.assert_close(added, torch.tanh(torch.tensor(1.0)) * shift.unsqueeze(1).expand_as(added))
        per_prompt = term(torch.randn(1, 3, model.llm.config.hidden_size)) - term(None)  # V2: one token per prompt
        assert (per_prompt - per_prompt[:, :1]).abs().amax() > 1e-4  # depends on the query


def test_v2_visual_query_tokens_are_added_to_the_prompts(tokenizer_dir, media_dir):
    fusion = FusionConfig(type="B", options={"mechanism": "adapter_prompts", "prompt_length": 4, "media": "tokens"})
    config = tiny_config(tokenizer_dir, image="qformer", fusion=fusion)  # the tiny qformer has 4 queries
    model = MultimodalLM.from_config(config).eval()
    batch = model.collator()([model.processor(_image_sample(media_dir))])
    inputs = model.llm_inputs(batch["input_ids"], batch["media"])
    assert inputs["adapter_context"].shape == (1, 4, model.llm.config.hidden_size)  # one vector per prompt
    _open_gates(model)
    with torch.no_grad():
        attention = model.llm.model.layers[0].self_attn
        query = torch.randn(1, 4, 3, attention.head_dim)
        with_media = model.fusion.prompt_attention(attention, 0, query, 0.5, inputs["adapter_context"])
        shifted = inputs["adapter_context"].clone()
        shifted[:, 0] += 1.0  # only prompt 0's visual token changes
        assert not torch.allclose(model.fusion.prompt_attention(attention, 0, query, 0.5, shifted), with_media)
    config.fusion.options["prompt_length"] = 3
    with pytest.raises(ValueError, match="yields 4 tokens per item but the prompts are 3 long"):
        MultimodalLM.from_config(config).processor(_image_sample(media_dir))


def test_v2_early_fusion_splices_the_media_and_keeps_the_prompts_static(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir, media="early")
    batch = model.collator()([model.processor(_image_sample(media_dir))])
    assert (batch["input_ids"] == -200).sum() == 4  # the image's 4 tokens are in the sequence
    inputs = model.llm_inputs(batch["input_ids"], batch["media"])
    assert inputs["adapter_context"] is None and len(model.fusion.markers.embeddings) == 0


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_v2_bias_scale_starts_as_identity_and_is_applied(llm, tokenizer_dir):
    model = _model(tokenizer_dir, llm, bias_scale=True)
    batch = _text_batch(model)
    with torch.no_grad():
        closed = model(**batch).logits
        bare = AutoModelForCausalLM.from_config(copy.deepcopy(model.llm.config)).eval()
        bare.load_state_dict(model.llm.state_dict())
        bare.set_attn_implementation(model.fusion.base_attention)
        torch.testing.assert_close(closed, bare(input_ids=batch["input_ids"]).logits)
        part = next(iter(model.fusion.bias_scale.values()))
        part.scale.fill_(2.0)
        assert (model(**batch).logits - closed).abs().max() > 1e-3
    per_layer = 4 if llm == "gpt2" else 7  # GPT-2: c_attn, c_proj, c_fc, c_proj; else q/k/v/o, gate/up/down
    assert len(model.fusion.bias_scale) == model.llm.config.num_hidden_layers * per_layer
    groups = model.parameter_groups()
    assert "fusion.bias_scale" in groups and "llm.norms" in groups


def test_llama_adapter_v2_bias_scale_is_about_0_04_percent_of_llama_7b():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    fusion = AdapterPromptFusion(bias_scale=True)
    fusion.attach(llm, {})
    tuned = sum(p.numel() for p in fusion.bias_scale.parameters())
    assert tuned == 32 * 2 * (4 * 4096 + 2 * 11008 + 4096)  # bias + scale per output of q/k/v/o, gate/up, down
    share = tuned / sum(p.numel() for p in llm.parameters())
    assert 0.00035 < share < 0.00045  # ~0.04%


def test_padding_is_masked_and_eager_llms_keep_their_mask(tokenizer_dir, media_dir):
    """transformers builds no attention mask for an implementation without a mask function, which would
    let left padding be attended (and leave an eager LLM without its causal mask)."""
    model = _model(tokenizer_dir)
    _open_gates(model, 0.7)
    samples = [Sample(f"g{i}", [Message("user", f"{'look ' * (3 * i)}<image>\nwhat colour?")], {"image": [media_dir / "a.png"]})
               for i in range(2)]
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    assert (batch["attention_mask"] == 0).any()  # the first prompt is left-padded
    alone = model.collator("left")([model.processor(samples[0], for_generation=True)])
    together = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], **kw)
    assert torch.equal(model.generate(alone["input_ids"], alone["attention_mask"], alone["media"], **kw)[0], together[0])
    config = tiny_config(tokenizer_dir, fusion=FusionConfig(type="B", options={"mechanism": "adapter_prompts"}))
    config.llm.hf_config["_attn_implementation"] = "eager"
    eager = MultimodalLM.from_config(config).eval()
    assert eager.fusion.base_attention == "eager"
    bare = AutoModelForCausalLM.from_config(copy.deepcopy(eager.llm.config)).eval()
    bare.load_state_dict(eager.llm.state_dict())
    bare.set_attn_implementation("eager")
    text = _text_batch(eager)
    with torch.no_grad():
        torch.testing.assert_close(eager(**text).logits, bare(input_ids=text["input_ids"]).logits)
