"""A Type-B or Type-C strategy with a Type-A branch (CogAgent, MM-Interleaved) on tiny configs."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_and_uncached, tiny_config, two_image_prompts

from mmfuse.config import ConnectorConfig, FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.expert import BOI_IDS
from mmfuse.fusion.embedding import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage

MAINS = {"visual_expert": ("B", {"mechanism": "visual_expert"}), "embedding": ("C", {})}


def _config(tokenizer_dir, main="visual_expert", llm="llama", cross_attention=None):
    kind, options = MAINS[main]
    fusion = FusionConfig(type=kind, options=dict(options), cross_attention=cross_attention or {"every": 1})
    config = tiny_config(tokenizer_dir, llm, image="glu", fusion=fusion)
    config.connectors["image"] = ConnectorConfig(kind="linear", pool_stride=2)  # the sequence gets half the patches
    return config


def _model(tokenizer_dir, main="visual_expert", llm="llama", **cross_attention) -> MultimodalLM:
    return MultimodalLM.from_config(_config(tokenizer_dir, main, llm, cross_attention or None)).eval()


def _without_branch(model: MultimodalLM) -> MultimodalLM:
    """The main strategy's model alone, with ``model``'s weights."""
    config = _config(model.tokenizer.name_or_path, "visual_expert" if model.fusion.survey_type == "B" else "embedding")
    config.fusion.cross_attention = None
    config.llm.hf_config = model.config.llm.hf_config
    plain = MultimodalLM.from_config(config).eval()
    state = {k.replace("fusion.main.", "fusion."): v for k, v in model.state_dict().items() if "cross_attention" not in k}
    plain.load_state_dict(state)
    return plain


def _sample(media_dir, image="a.png"):
    return Sample("s", [Message("user", "first look <image> what colour?"), Message("assistant", "red")], {"image": [media_dir / image]})


def _logits(model, sample):
    batch = model.collator()([model.processor(sample)])
    with torch.no_grad():
        return model(**batch).logits, batch


def _open(model, attn=1.0, ff=0.0):
    with torch.no_grad():
        for block in model.fusion.cross_attention.blocks:
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)


@pytest.mark.parametrize("main", sorted(MAINS))
@pytest.mark.parametrize("llm", ["llama", "gpt2"])
def test_closed_gates_give_the_main_strategys_logits_and_open_ones_read_every_patch(main, llm, tokenizer_dir, media_dir):
    model = _model(tokenizer_dir, main, llm)
    assert len(model.fusion.cross_attention.blocks) == 2 and not model.fusion.cross_attention.markers.embeddings
    logits, batch = _logits(model, _sample(media_dir))
    torch.testing.assert_close(logits, _logits(_without_branch(model), _sample(media_dir))[0])
    # the blocks read the encoder's patches (4), the sequence carries the pooled connector output (2)
    context = model.llm_inputs(batch["input_ids"], batch["media"])["media_context"]
    assert context.keys[0].shape[2] == 4 and int((batch["input_ids"] == PLACEHOLDER_IDS["image"]).sum()) == 2
    _open(model)
    opened = _logits(model, _sample(media_dir))[0]
    ids = batch["input_ids"][0].tolist()
    start = ids.index(BOI_IDS["image"] if main == "visual_expert" else PLACEHOLDER_IDS["image"])
    changed = (opened - logits).abs().amax(dim=-1)[0] > 0
    assert not changed[:start].any() and changed[start:].all()  # from the item's first position on
    other = _logits(model, _sample(media_dir, "b.png"))[0]
    assert not torch.equal(other, opened)


def test_cached_and_uncached_generation_agree_and_save_load(tokenizer_dir, media_dir, tmp_path):
    model = _model(tokenizer_dir, media_attention="all_previous")
    _open(model, 0.5, 0.5)
    cached, uncached = cached_and_uncached(model, two_image_prompts(media_dir))
    assert torch.equal(cached, uncached)
    assert model.fusion.main._generation_context is None and model.fusion.cross_attention._generation_context is None
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion.cross_attention == {"media_attention": "all_previous"}
    torch.testing.assert_close(_logits(loaded, _sample(media_dir))[0], _logits(model, _sample(media_dir))[0])


def test_a_stage_trains_the_branch_alone_and_the_frozen_rest_stays_bit_identical(tokenizer_dir, media_dir):
    model = _model(tokenizer_dir).train()
    groups = model.parameter_groups()
    assert {"fusion.main", "fusion.cross_attention"} <= set(groups)
    apply_stage(model, StageConfig(name="branch", steps=1, lr=1e-2, train=["fusion.cross_attention"], data=["image_qa"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("fusion.main.") for n in frozen) and any(n.startswith("llm.") for n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.collator()([model.processor(_sample(media_dir))])
    model(**batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(float(b.attn_gate.detach()) != 0 for b in model.fusion.cross_attention.blocks)  # the gates get a gradient


def test_only_a_type_b_or_c_strategy_takes_a_branch(tokenizer_dir):
    config = tiny_config(tokenizer_dir, fusion=FusionConfig(type="A", cross_attention={"every": 1}))
    with pytest.raises(ValueError, match="must be Type-B or Type-C, got Type-A"):
        MultimodalLM.from_config(config)
