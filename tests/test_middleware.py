"""InternVL's QLLaMA language middleware (connector kind ``qllama``) on tiny Llama, Qwen2 and GPT-2 configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLMS, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from mmfuse.config import ConnectorConfig
from mmfuse.connectors.connector import Connector
from mmfuse.connectors.middleware import LanguageMiddleware
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.layers import decoder_layers
from mmfuse.model import MultimodalLM


def _llm(name: str):
    cfg = dict(TINY_LLMS[name])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=320, **cfg)).eval()


def _open_gates(middleware: LanguageMiddleware) -> None:
    with torch.no_grad():
        for block in middleware.cross.blocks:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)


@pytest.mark.parametrize("name", sorted(TINY_LLMS))
def test_closed_gates_run_the_queries_through_the_llms_own_first_layers(name):
    llm = _llm(name)
    middleware = LanguageMiddleware(24, 32, llm, num_queries=5, depth=1, cross_attention_every=1).eval()
    first_layer = copy.deepcopy(llm)  # the LLM cut to its first layer, by hand
    del decoder_layers(first_layer)[1:]
    first_layer.config.num_hidden_layers = 1
    queries = middleware.queries.unsqueeze(0)
    with torch.no_grad():
        reference = first_layer.get_decoder()(inputs_embeds=queries).last_hidden_state
        got = middleware.middle(inputs_embeds=queries).last_hidden_state
        torch.testing.assert_close(got, reference)
        torch.testing.assert_close(middleware(torch.randn(1, 7, 24)), middleware.proj(reference))  # the features are not read
        _open_gates(middleware)
        assert (middleware(torch.randn(1, 7, 24)) - middleware.proj(reference)).abs().max() > 1e-3


def test_each_item_reads_only_its_own_features():
    middleware = LanguageMiddleware(24, 32, _llm("llama"), num_queries=5, depth=2, cross_attention_every=2).eval()
    _open_gates(middleware)
    features = torch.randn(2, 7, 24)
    changed = features.clone()
    changed[1] = torch.randn(7, 24)
    with torch.no_grad():
        before, after = middleware(features), middleware(changed)
    torch.testing.assert_close(after[0], before[0])
    assert (after[1] - before[1]).abs().max() > 1e-3
    assert len(middleware.cross.blocks) == 1 and middleware.cross.layer_indices == [0]  # before the first copied layer


def test_the_copy_is_separate_from_the_llm_and_bad_settings_are_named():
    llm = _llm("qwen2")
    middleware = LanguageMiddleware(24, 32, llm, num_queries=3, depth=2)
    source = dict(llm.named_parameters())
    for name, param in middleware.middle.named_parameters():
        torch.testing.assert_close(param, source[f"model.{name}"], rtol=0, atol=0)  # initialised from the LLM...
        assert param.data_ptr() != source[f"model.{name}"].data_ptr()  # ...as a copy that trains on its own
    assert middleware.middle.embed_tokens is None  # the queries come as embeddings: no unused token table
    with pytest.raises(ValueError, match="depth must be 1..2"):
        LanguageMiddleware(24, 32, llm, depth=3)
    with pytest.raises(ValueError, match="build it with the LLM"):
        Connector(ConnectorConfig(kind="qllama"), 24, 32)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_model_with_the_middleware_trains_saves_and_loads(name, tokenizer_dir, media_dir, tmp_path):
    config = tiny_config(tokenizer_dir, name, image="qllama")
    config.connectors["image"].depth = 1
    model = MultimodalLM.from_config(config)
    sample = Sample("s", [Message("user", "<image>\nwhat colour?"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    assert model.media_token_count("image", (3, 16, 16)) == 4  # num_queries
    batch = model.collator()([model.processor(sample)])
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    model.requires_grad_(False)
    model.connectors.requires_grad_(True)
    loss = model(**batch).loss
    loss.backward()
    middleware = model.connectors["image"].core
    assert middleware.queries.grad.abs().sum() > 0 and middleware.cross.blocks[0].attn_gate.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.connectors.parameters():
            p -= 0.1 * p.grad if p.grad is not None else 0
    for key, value in model.llm.state_dict().items():
        torch.testing.assert_close(value, llm_before[key], rtol=0, atol=0)  # the copy trained, not the LLM
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model.eval()(**batch).logits)
