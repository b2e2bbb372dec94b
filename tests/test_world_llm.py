"""The world tokenizer, chat template, LLM pretraining and the world backbone cache."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmfuse.backbones import world
from mmfuse.backbones.world_llm import CHAT_TEMPLATE, DEFAULT_STEPS, chat_examples, pretrain_llm, train_tokenizer
from mmfuse.data.synth.text import text_corpus

SAVED_SUFFIXES = {".safetensors", ".json", ".jinja"}


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = text_corpus(rng, 1000) + [m["content"] for _, chat in chat_examples(rng, 500) for m in chat]
    return train_tokenizer(texts, vocab_size=512)


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_tokenizer_round_trips_text(tokenizer):
    for line in text_corpus(random.Random(1), 200) + ["<image>\nWhat colour is the circle?", "naïve café ☃ 42"]:
        assert tokenizer.decode(tokenizer(line)["input_ids"]) == line
    assert len(tokenizer) <= 512 and tokenizer.padding_side == "right"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    for marker in ("<image>", "<audio>", "<video>"):
        assert marker not in tokenizer.all_special_tokens and len(tokenizer.tokenize(marker)) > 1
    assert tokenizer("a red circle")["input_ids"][0] != tokenizer.bos_token_id  # BOS comes from the chat template


def test_chat_template_and_assistant_mask(tokenizer):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|system|>\nAnswer in one word.<|end|>\n<|user|>\n<image>\nWhat colour is the circle?<|end|>\n"
        "<|assistant|>\nred<|end|>\n<|user|>\nWhat is two plus two?<|end|>\n<|assistant|>\nfour<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id
    assert [tokenizer.decode(ids[a:b]) for a, b in _spans(mask)] == ["red<|end|>", "four<|end|>"]


def test_pretrain_saves_an_offline_loadable_llm(tmp_path, monkeypatch):
    steps = max(1, round(DEFAULT_STEPS * 0.01))
    out = pretrain_llm(tmp_path / "llm", seed=0, steps=steps)
    assert {p.suffix for p in out.iterdir()} <= SAVED_SUFFIXES
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["heldout_perplexity"] > 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok) and model.config.bos_token_id == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "What is one plus one?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()

    # resolve() builds world:llm once with the scaled steps (the same run, byte for byte) and then reuses it
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMFUSE_WORLD_STEPS_SCALE", "0.01")
    calls = []
    builder = world.WORLD_BACKBONES["llm"]

    @functools.wraps(builder)
    def counting(*args, **kwargs):
        calls.append(kwargs["steps"])
        return builder(*args, **kwargs)

    monkeypatch.setitem(world.WORLD_BACKBONES, "llm", counting)
    rng_before = torch.get_rng_state()
    first = world.resolve("world:llm")
    assert torch.equal(torch.get_rng_state(), rng_before)  # a first-use build leaves the caller's RNG as it was
    assert world.resolve("world:llm") == first and calls == [steps]
    assert first.startswith(str(tmp_path / "cache")) and first.endswith("llm-steps0.01")
    assert [p.name for p in world.backbone_dir("llm").parent.iterdir()] == ["llm-steps0.01"]  # no temp dirs left
    assert (world.backbone_dir("llm") / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_resolve_passes_other_names_through_and_rejects_unknown_world_names(monkeypatch):
    assert world.resolve("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="world:llm"):
        world.resolve("world:nope")
    monkeypatch.setenv("MMFUSE_WORLD_STEPS_SCALE", "fast")
    with pytest.raises(ValueError, match="MMFUSE_WORLD_STEPS_SCALE"):
        world.backbone_dir("llm")


@pytest.mark.full
def test_full_pretraining_reaches_low_perplexity(tmp_path):
    metrics = json.loads((pretrain_llm(tmp_path / "llm") / "pretrain_metrics.json").read_text())
    assert metrics["heldout_perplexity"] < 3.0
    assert min(metrics["answer_accuracy"].values()) > 0.25
