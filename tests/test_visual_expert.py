"""Type-B visual expert (CogVLM) on tiny Llama, Qwen2 and GPT-2 configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLMS, cached_and_uncached, tiny_config, two_image_prompts
from transformers import AutoModelForCausalLM

from mmfuse.config import FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.expert import BOI_IDS, EOI_IDS
from mmfuse.fusion.layers import decoder_layers
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage


def _model(tokenizer_dir, llm="llama") -> MultimodalLM:
    fusion = FusionConfig(type="B", options={"mechanism": "visual_expert"})
    return MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, image="glu", fusion=fusion)).eval()


def _bare(model):
    bare = AutoModelForCausalLM.from_config(copy.deepcopy(model.llm.config)).eval()
    bare.load_state_dict(model.llm.state_dict())
    return bare


def _image_batch(model, media_dir, image="a.png"):
    sample = Sample("i", [Message("user", "look <image> what colour?"), Message("assistant", "red")], {"image": [media_dir / image]})
    return model.collator()([model.processor(sample)])


def _layer_outputs(model, batch) -> list[torch.Tensor]:
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).clone()))
               for layer in decoder_layers(model.llm)]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_text_only_gives_the_bare_llms_logits_and_fresh_experts_change_nothing(llm, tokenizer_dir, media_dir):
    model = _model(tokenizer_dir, llm)
    bare = _bare(model)
    text = model.collator()([model.processor(Sample("t", [Message("user", "what colour?"), Message("assistant", "red")]))])
    with torch.no_grad():
        torch.testing.assert_close(model(**text).logits, bare(input_ids=text["input_ids"]).logits)
        # with an image: the experts start as copies, so the bare LLM on the same embeddings and positions agrees
        batch = _image_batch(model, media_dir)
        inputs = model.llm_inputs(batch["input_ids"], batch["media"])
        positions = []
        model.llm.get_decoder().register_forward_pre_hook(lambda m, a, k: positions.append(k["position_ids"]), with_kwargs=True)
        fused = model(**batch).logits
        reference = bare(inputs_embeds=inputs["inputs_embeds"], position_ids=positions[-1]).logits
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_image_positions_share_one_position_id(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    batch = _image_batch(model, media_dir)
    seen = []
    model.llm.get_decoder().register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    ids, positions = batch["input_ids"][0].tolist(), seen[-1][0].tolist()
    boi, eoi = ids.index(BOI_IDS["image"]), ids.index(EOI_IDS["image"])
    assert boi > 0 and eoi - boi - 1 == 4  # 4 image tokens from the tiny ViT
    assert positions[: boi + 1] == list(range(boi + 1))
    assert positions[boi + 1 : eoi] == [boi + 1] * 4  # one id for the whole image
    assert positions[eoi:] == list(range(boi + 2, boi + 2 + len(ids) - eoi))  # EOI, then text, consecutive


def test_routing_follows_the_token_type_mask(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    batch = _image_batch(model, media_dir)
    before = _layer_outputs(model, batch)[-1]
    with torch.no_grad():  # perturb the last layer's expert MLP only
        for p in model.fusion.experts["image"][-1]["mlp"].parameters():
            p.add_(torch.randn_like(p))
    after = _layer_outputs(model, batch)[-1]
    changed = (after - before).abs().amax(dim=-1)[0] > 0
    ids = batch["input_ids"][0]
    expected = (ids == BOI_IDS["image"]) | (ids < 0) & (ids != EOI_IDS["image"])  # BOI and the image, not EOI
    assert torch.equal(changed, expected)


def test_frozen_llm_is_bit_identical_after_a_step_and_the_expert_moves(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir).train()
    params = apply_stage(model, StageConfig(name="x", train=["fusion", "connectors"], data=["d"], steps=1, lr=1e-2))
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    expert_before = model.fusion.experts["image"][0]["mlp"].state_dict()
    expert_before = {k: v.clone() for k, v in expert_before.items()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(**_image_batch(model, media_dir)).loss.backward()
    optimizer.step()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, model.fusion.experts["image"][0]["mlp"].state_dict()[k]) for k, v in expert_before.items())


def test_cached_and_uncached_generation_agree_and_save_load(tokenizer_dir, media_dir, tmp_path):
    model = _model(tokenizer_dir)
    with torch.no_grad():
        for p in model.fusion.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = two_image_prompts(media_dir)
    cached, uncached = cached_and_uncached(model, samples)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached_and_uncached(model, samples[:1])[0][0], cached[0])  # left padding changes nothing
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    batch = _image_batch(model, media_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def _adaptive(tokenizer_dir, llm="llama") -> MultimodalLM:
    fusion = FusionConfig(type="B", options={"mechanism": "modality_adaptive"})
    config = tiny_config(tokenizer_dir, llm, image="qformer", fusion=fusion)
    return MultimodalLM.from_config(config).eval()


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_modality_adaptive_starts_as_the_bare_llm_with_ordinary_positions(llm, tokenizer_dir, media_dir):
    model = _adaptive(tokenizer_dir, llm)
    bare = _bare(model)
    batch = _image_batch(model, media_dir)
    assert not (batch["input_ids"] == BOI_IDS["image"]).any()  # no boundary vectors
    with torch.no_grad():
        inputs = model.llm_inputs(batch["input_ids"], batch["media"])
        torch.testing.assert_close(model(**batch).logits, bare(inputs_embeds=inputs["inputs_embeds"]).logits, rtol=1e-5, atol=1e-5)
    copies = model.fusion.experts["image"][0]
    assert "mlp" not in copies and len(copies) == (3 if llm == "gpt2" else 4)  # two norms + k/v (GPT-2: fused c_attn)


def test_modality_adaptive_routes_the_post_attention_norm(tokenizer_dir, media_dir):
    model = _adaptive(tokenizer_dir)
    batch = _image_batch(model, media_dir)
    before = _layer_outputs(model, batch)[-1]
    with torch.no_grad():
        model.fusion.experts["image"][-1]["post_attention_layernorm"].weight.mul_(3.0)
    changed = (_layer_outputs(model, batch)[-1] - before).abs().amax(dim=-1)[0] > 0
    assert torch.equal(changed, batch["input_ids"][0] < 0)  # exactly the media positions


def test_gpt2_key_value_copy_replaces_only_the_key_and_value_columns(tokenizer_dir, media_dir):
    model = _adaptive(tokenizer_dir, "gpt2")
    batch = _image_batch(model, media_dir)
    with torch.no_grad():
        base = model(**batch).logits
        weight = model.fusion.experts["image"][0]["c_attn"].weight  # Conv1D: (in, 3 * d), q columns first
        d = weight.shape[1] // 3
        weight[:, :d].add_(torch.randn_like(weight[:, :d]))  # the query columns stay the shared ones
        torch.testing.assert_close(model(**batch).logits, base)
        weight[:, d:].add_(torch.randn_like(weight[:, d:]))
        assert (model(**batch).logits - base).abs().max() > 1e-3


def test_bidirectional_media_attention_lets_image_tokens_see_later_ones(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir)
    batch = _image_batch(model, media_dir)
    causal = _layer_outputs(model, batch)[0]
    model.fusion.media_attention = "bidirectional"
    both = _layer_outputs(model, batch)[0]
    ids = batch["input_ids"][0]
    image = (ids == -200).nonzero().flatten().tolist()
    changed = ((both - causal).abs().amax(dim=-1)[0] > 1e-6).nonzero().flatten().tolist()
    assert changed == image[:-1]  # the last image token already saw the whole image; text is untouched
    prompt = model.collator("left")([model.processor(Sample("g", [Message("user", "<image> what?")], {"image": [media_dir / "a.png"]}),
                                                     for_generation=True)])
    with torch.no_grad():
        for p in model.fusion.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
        generated = model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["media"], max_new_tokens=4,
                                   min_new_tokens=4, do_sample=False)
        for t in range(4):  # each cached step picks what a full forward over prompt + tokens so far picks
            ids = torch.cat([prompt["input_ids"], generated[:, :t]], dim=1)
            logits = model(ids, torch.ones_like(ids), media=prompt["media"]).logits
            assert int(logits[0, -1].argmax()) == int(generated[0, t])
