"""Pengi: transformer mapping networks and a text prompt read by a frozen text tower, never by the LLM."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLMS, TINY_WHISPER, processor_with_policy

from mmfuse.config import ConnectorConfig, EncoderConfig, FusionConfig, LLMConfig, MultimodalConfig
from mmfuse.connectors import Connector, MappingNetwork
from mmfuse.data.badsamples import BadSample
from mmfuse.data.processor import IGNORE_INDEX
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM
from mmfuse.recipe import load_recipe
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage

AUDIO_PREFIX, PROMPT_PREFIX = 3, 4
PITCH, COLOUR = "what is the pitch of the tone?", "what colour is the circle?"


def pengi_config(tokenizer_dir, llm: str = "gpt2", **kwargs) -> MultimodalConfig:
    """A tiny LLM, a tiny Whisper and a tiny Llama body as the text tower, each mapped by a mapper."""
    tower = dict(TINY_LLMS["llama"], vocab_size=320)
    return MultimodalConfig(
        llm=LLMConfig(hf_config=dict(TINY_LLMS[llm], vocab_size=320), tokenizer=str(tokenizer_dir)),
        encoders={"audio": EncoderConfig(modality="audio", hf_config=dict(TINY_WHISPER)),
                  "text_prompt": EncoderConfig(modality="text_prompt", hf_config=tower, tokenizer=str(tokenizer_dir), max_tokens=48)},
        connectors={"audio": ConnectorConfig(kind="mapper", prefix_length=AUDIO_PREFIX, depth=2, num_heads=4),
                    "text_prompt": ConnectorConfig(kind="mapper", prefix_length=PROMPT_PREFIX, depth=2, num_heads=4)},
        **kwargs,
    )


def _sample(media_dir, sid="s0", prompt=PITCH, answer="high") -> Sample:
    return Sample(sid, [Message("user", f"<audio>\n{prompt}"), Message("assistant", answer)], {"audio": [media_dir / "a.wav"]})


# -- the mapping network ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 7, 50])
def test_mapper_prefix_length_is_the_configured_one_whatever_the_input_length(tokens):
    mapper = MappingNetwork(6, 8, prefix_length=5, depth=2, num_heads=2).eval()
    out = mapper(torch.randn(3, tokens, 6))
    assert out.shape == (3, 5, 8) and torch.isfinite(out).all()
    connector = Connector(ConnectorConfig(kind="mapper", prefix_length=5, depth=2, num_heads=2, pool_stride=1), 6, 8)
    assert connector(torch.randn(3, tokens, 6)).shape == (3, 5, 8)


def test_mapper_prefix_is_the_transformer_output_at_the_learned_constants():
    """torch's TransformerEncoder runs over [projected features; constants]; the prefix is its output
    at the constants' positions, and it depends on both the features and the constants."""
    mapper = MappingNetwork(6, 8, prefix_length=5, depth=2, num_heads=2).eval()
    assert isinstance(mapper.transformer, torch.nn.TransformerEncoder) and len(mapper.transformer.layers) == 2
    seen = {}
    mapper.transformer.register_forward_hook(lambda mod, args, out: seen.update(inputs=args[0], out=out))
    features = torch.randn(2, 3, 6)
    with torch.no_grad():
        out = mapper(features)
        expected = torch.cat([mapper.proj(features), mapper.prefix.expand(2, -1, -1)], dim=1)
        torch.testing.assert_close(seen["inputs"], expected)
        torch.testing.assert_close(out, seen["out"][:, 3:])
        assert not torch.allclose(mapper(features + 1.0), out, atol=1e-4)
        mapper.prefix.add_(1.0)
        assert not torch.allclose(mapper(features), out, atol=1e-4)


def test_mapper_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="width 8 is not divisible by num_heads 3"):
        MappingNetwork(6, 8, prefix_length=2, depth=1, num_heads=3)


# -- the text tower ---------------------------------------------------------------------------------------
def test_text_tower_feature_is_the_frozen_towers_state_at_each_prompts_last_token(tokenizer_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir)).eval()
    process, encoder = model.media_processors["text_prompt"], model.encoders["text_prompt"]
    prompts = [PITCH, "how many?"]
    ids = torch.stack([process(p) for p in prompts])  # (2, 48), -1 after each prompt
    with torch.no_grad():
        features = encoder(ids)
        assert features.shape == (2, 1, encoder.hidden_size)
        for row, prompt in enumerate(prompts):
            alone = torch.tensor([model.media_processors["text_prompt"].hf_processor(prompt)["input_ids"]])
            assert (ids[row] >= 0).sum() == alone.shape[1]
            expected = encoder.model(input_ids=alone).last_hidden_state[0, -1]
            torch.testing.assert_close(features[row, 0], expected)


# -- the prompt reaches the LLM only through its prefix ---------------------------------------------------
@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_prompt_reaches_the_llm_only_through_the_prefix(llm, tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir, llm)).eval()
    pitch, colour = model.processor(_sample(media_dir)), model.processor(_sample(media_dir, prompt=COLOUR))
    # the LLM's token ids and labels do not depend on the prompt: it is not among them
    assert pitch.input_ids == colour.input_ids and pitch.labels == colour.labels
    assert not torch.equal(pitch.media["text_prompt"], colour.media["text_prompt"])
    ids = pitch.input_ids
    audio, prompt = PLACEHOLDER_IDS["audio"], PLACEHOLDER_IDS["text_prompt"]
    start = ids.index(audio)
    assert ids[start:start + AUDIO_PREFIX + PROMPT_PREFIX] == [audio] * AUDIO_PREFIX + [prompt] * PROMPT_PREFIX  # [audio; prompt]
    assert ids.count(audio) == AUDIO_PREFIX and ids.count(prompt) == PROMPT_PREFIX
    question = model.tokenizer(PITCH, add_special_tokens=False)["input_ids"]
    assert not any(ids[i:i + 4] == question[:4] for i in range(len(ids)))
    # labels only on the answer (and the token that ends the turn)
    answer = model.tokenizer("high<|end|>", add_special_tokens=False)["input_ids"]
    assert [label for label in pitch.labels if label != IGNORE_INDEX] == answer
    # ... yet changing the prompt changes the logits at the answer
    with torch.no_grad():
        logits = [model(**model.collator()([enc])).logits[0] for enc in (pitch, colour)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-5)


def test_every_user_turn_gets_its_own_prompt_prefix_and_system_turns_stay_text(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir))
    sample = Sample("two", [Message("system", "be brief"), Message("user", f"<audio>\n{PITCH}"), Message("assistant", "high"),
                            Message("user", COLOUR), Message("assistant", "red")], {"audio": [media_dir / "a.wav"]})
    enc = model.processor(sample)
    assert enc.input_ids.count(PLACEHOLDER_IDS["text_prompt"]) == 2 * PROMPT_PREFIX
    assert enc.media["text_prompt"].shape == (2, 48)
    system = model.tokenizer("be brief", add_special_tokens=False)["input_ids"]
    assert any(enc.input_ids[i:i + len(system)] == system for i in range(len(enc.input_ids)))


# -- training: the text tower and the LLM stay frozen, the mappers move ------------------------------------
def test_a_training_step_moves_the_mappers_and_leaves_the_text_tower_and_llm_bit_identical(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir))
    recipe_stage = load_recipe("pengi").train.stages[0]
    params = apply_stage(model, StageConfig(name="mapping", train=recipe_stage.train, data=["x"], steps=1, lr=1e-2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = model.collator()([model.processor(_sample(media_dir)), model.processor(_sample(media_dir, "s1", COLOUR, "red"))])
    model.train()
    model(**batch).loss.backward()
    for name in ("connectors.audio", "connectors.text_prompt"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if name.startswith(("llm.", "encoders.")):
            assert not moved and not p.requires_grad, name
    for name in ("connectors.audio.core.prefix", "connectors.text_prompt.core.prefix",
                 "connectors.text_prompt.core.proj.weight", "connectors.audio.core.proj.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


# -- save / load and generation -----------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_logits_and_the_text_tokenizer(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir, "llama")).eval()
    batch = model.collator()([model.processor(_sample(media_dir))])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "processors" / "text_prompt" / "tokenizer.json").is_file()
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.encoders["text_prompt"].max_tokens == 48
    assert loaded.config.connectors["text_prompt"].prefix_length == PROMPT_PREFIX
    batch2 = loaded.collator()([loaded.processor(_sample(media_dir))])
    assert torch.equal(batch["media"]["text_prompt"], batch2["media"]["text_prompt"])
    with torch.no_grad():
        after = loaded(**batch2).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_cached_and_uncached_generation_agree(llm, tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir, llm)).eval()
    samples = [_sample(media_dir), _sample(media_dir, "s1", "how many?")]
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(**batch, use_cache=True, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    alone = model.collator("left")([model.processor(samples[1], for_generation=True)])
    assert torch.equal(model.generate(**alone, **kw)[0], cached[1])
    assert len(model.answer(samples, max_new_tokens=3)) == 2


# -- bad samples ------------------------------------------------------------------------------------------
def test_bad_samples_name_the_sample_and_the_field(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(pengi_config(tokenizer_dir))
    cases = {
        "no-prompt": (Sample("no-prompt", [Message("user", "<audio>\n "), Message("assistant", "high")], {"audio": [media_dir / "a.wav"]}),
                      r"sample 'no-prompt': conversations\[0\]: the user turn has no text for the text_prompt encoder"),
        "no-audio": (Sample("no-audio", [Message("user", f"<audio>\n{PITCH}"), Message("assistant", "high")], {}),
                     r"sample 'no-audio': audio: lists 0 item\(s\) but the text has 1 <audio> marker"),
        "gone": (Sample("gone", [Message("user", f"<audio>\n{PITCH}"), Message("assistant", "high")], {"audio": [media_dir / "gone.wav"]}),
                 r"sample 'gone': audio\[0\]: .*gone.wav"),
        "long": (_sample(media_dir, "long", prompt=PITCH * 3), r"sample 'long': text_prompt\[0\]: the prompt .* is \d+ tokens; .* 1 to 48"),
        "marker": (_sample(media_dir, "marker", prompt="<text_prompt> hi"), r"sample 'marker': conversations\[0\]: contains <text_prompt>"),
    }
    for sample, message in cases.values():
        with pytest.raises(BadSample, match=message):
            model.processor(sample)
    skipping = processor_with_policy(model, "skip")
    for sample, _ in cases.values():
        skipping(sample)
    assert len(skipping.bad_samples) == len(cases)


def test_a_text_prompt_encoder_needs_type_c(tokenizer_dir):
    with pytest.raises(ValueError, match="text_prompt puts the prompt in the input embeddings.*fusion.type 'C', got 'A'"):
        pengi_config(tokenizer_dir, fusion=FusionConfig(type="A"))


# -- the recipe -----------------------------------------------------------------------------------------
def test_pengi_recipe():
    recipe = load_recipe("pengi")
    assert recipe.survey_type == "C" and recipe.eval["data"] == ["audio_qa"]
    assert list(recipe.model.encoders) == ["audio", "text_prompt"]
    assert recipe.model.encoders["text_prompt"].name_or_path == "world:llm"
    assert {c.kind for c in recipe.model.connectors.values()} == {"mapper"}
    [stage] = recipe.train.stages
    assert stage.train == ["connectors"] and stage.data == ["audio_caption", "audio_qa"]  # text tower, audio encoder, LLM frozen
