"""Type-B mixture of experts (MoE-LLaVA) on tiny Llama, Qwen2 and GPT-2 configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLMS, tiny_config
from transformers import AutoModelForCausalLM

from mmfuse.config import FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.moe import MoEFeedForward
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage


def _model(tokenizer_dir, llm="llama", **options) -> MultimodalLM:
    fusion = FusionConfig(type="B", options={"mechanism": "moe", **options})
    return MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, fusion=fusion)).eval()


def _batch(model, media_dir):
    sample = Sample("i", [Message("user", "<image>\nwhat colour is the circle?"), Message("assistant", "red")],
                    {"image": [media_dir / "a.png"]})
    return model.collator()([model.processor(sample)])


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_experts_start_as_copies_so_the_model_starts_dense(llm, tokenizer_dir, media_dir):
    reference = MultimodalLM.from_config(tiny_config(tokenizer_dir, llm)).eval()  # Type-C, same seed: same weights
    torch.manual_seed(0)
    model = _model(tokenizer_dir, llm)
    assert model.fusion.layer_indices == [0]  # every other layer of 2
    moe = model.fusion.moe[0]
    first = moe.experts[0].state_dict()
    assert all(torch.equal(first[k], v) for e in moe.experts[1:] for k, v in e.state_dict().items())
    batch = _batch(model, media_dir)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(reference.llm.config)).eval()
    dense.load_state_dict(reference.llm.state_dict())
    with torch.no_grad():
        inputs = model.llm_inputs(batch["input_ids"], batch["media"])
        out = model(**batch)
        torch.testing.assert_close(out.logits, dense(inputs_embeds=inputs["inputs_embeds"]).logits, rtol=1e-5, atol=1e-6)
    aux = model.fusion.auxiliary_loss()
    assert aux is not None and aux > 0  # E * sum f_e P_e >= 1 for any routing, times 0.01


def test_routing_sends_each_token_to_its_top_k_experts():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    moe = MoEFeedForward(dense, 8, num_experts=4, top_k=2)
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):  # make the experts distinguishable
            expert[2].bias.add_(10.0 * e)
    hidden = torch.randn(2, 5, 8)
    out, balance = moe(hidden)
    probs = torch.softmax(moe.router(hidden.reshape(-1, 8)), dim=-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    tokens = hidden.reshape(-1, 8)
    expected = torch.stack([sum(w * moe.experts[int(e)](t) for w, e in zip(weights[i], chosen[i])) for i, t in enumerate(tokens)])
    torch.testing.assert_close(out.reshape(-1, 8), expected)
    fraction = torch.nn.functional.one_hot(chosen, 4).sum(1).float().mean(0) / 2
    torch.testing.assert_close(balance, 4 * (fraction * probs.mean(0)).sum())


def test_aux_loss_is_added_to_the_lm_loss_and_only_experts_and_router_train(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir).train()
    batch = _batch(model, media_dir)
    params = apply_stage(model, StageConfig(name="moe", train=["fusion"], data=["d"], steps=1, lr=1e-2))
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    out = model(**batch)
    lm_loss = model.llm(inputs_embeds=model.llm_inputs(batch["input_ids"], batch["media"])["inputs_embeds"],
                        attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(out.loss, lm_loss + model.fusion.auxiliary_loss())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out.loss.backward()
    assert model.fusion.moe[0].router.weight.grad.abs().sum() > 0
    optimizer.step()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in before.items())
    assert not any(n.startswith("llm.") and "experts" in n for n, _ in model.named_parameters())  # experts live in fusion
    with pytest.raises(ValueError, match="top_k"):
        _model(tokenizer_dir, top_k=5)


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_adapter_mixture_starts_as_the_bare_llm_and_mixes_by_the_router(llm, tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, llm, fusion=FusionConfig(
        type="B", options={"mechanism": "adapter_mixture", "num_adapters": 2, "rank": 4}))).eval()
    batch = _batch(model, media_dir)
    bare = AutoModelForCausalLM.from_config(copy.deepcopy(model.llm.config)).eval()
    bare.load_state_dict(model.llm.state_dict())
    with torch.no_grad():
        embeds = model.llm_inputs(batch["input_ids"], batch["media"])["inputs_embeds"]
        torch.testing.assert_close(model(**batch).logits, bare(inputs_embeds=embeds).logits)  # up = 0
        mixture = model.fusion.mixtures[0]
        mixture.up.normal_()
        x = torch.randn(3, model.llm.config.get_text_config().hidden_size)
        weights = torch.softmax(mixture.router(x), dim=-1)
        expected = sum(weights[:, k : k + 1] * (torch.nn.functional.gelu(x @ mixture.down[k]) @ mixture.up[k]) for k in range(2))
        torch.testing.assert_close(mixture(x), expected)
        assert (model(**batch).logits - bare(inputs_embeds=embeds).logits).abs().max() > 1e-3
