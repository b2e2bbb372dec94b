"""Every fusion strategy survives ``copy.deepcopy`` of the model: the copy's hooks drive the copy."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from mmfuse.config import FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.model import MultimodalLM

FUSIONS = {
    "A": ("perceiver", FusionConfig(type="A")),
    "adapter_prompts": ("linear", FusionConfig(type="B", options={"mechanism": "adapter_prompts", "bias_scale": True})),
    "visual_expert": ("glu", FusionConfig(type="B", options={"mechanism": "visual_expert"})),
    "modality_adaptive": ("linear", FusionConfig(type="B", options={"mechanism": "modality_adaptive"})),
    "moe": ("linear", FusionConfig(type="B", options={"mechanism": "moe"})),
    "adapter_mixture": ("linear", FusionConfig(type="B", options={"mechanism": "adapter_mixture"})),
}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_deep_copy_runs_its_own_fusion(name, tokenizer_dir, media_dir):
    connector, fusion = FUSIONS[name]
    config = tiny_config(tokenizer_dir, image=connector, fusion=fusion)
    if connector == "perceiver":
        config.connectors["image"].num_latents = 4
    model = MultimodalLM.from_config(config).eval()
    with torch.no_grad():  # open every zero-initialised gate/projection so the fusion modules matter
        for p in model.fusion.parameters():
            p.add_(0.5 * torch.randn_like(p))
    sample = Sample("s", [Message("user", "look <image> what colour?"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    batch = model.collator()([model.processor(sample)])
    with torch.no_grad():
        original = model(**batch).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(**batch).logits, original)
        for p in twin.fusion.parameters():
            p.add_(torch.randn_like(p))
        changed = twin(**batch).logits
        assert (changed - original).abs().max() > 1e-3
        fresh = MultimodalLM.from_config(config).eval()  # what the copy's weights give when nothing is shared
        fresh.load_state_dict(twin.state_dict())
        torch.testing.assert_close(changed, fresh(**batch).logits)  # the copy's hooks read the copy's modules
        torch.testing.assert_close(model(**batch).logits, original)  # and leave the original alone
