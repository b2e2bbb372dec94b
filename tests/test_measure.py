"""Measured costs: FLOPs, media-token cost, parameters, adding a modality, budgets; report verdicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from conftest import TINY_WHISPER, tiny_config

from mmfuse.compare import budget_stages
from mmfuse.config import CodecConfig, ConnectorConfig, EncoderConfig, FusionConfig
from mmfuse.data.schema import Message, Sample
from mmfuse.measure import adds_modality, media_token_cost, parameter_summary, train_flops, trainable_parameters
from mmfuse.model import MultimodalLM
from mmfuse.recipe import load_recipe
from mmfuse.report import AXES, _slope, binding_accuracy, metric_rows, write_markdown
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage

CONNECTOR_ONLY = StageConfig(name="align", train=["connectors"], data=["x"], steps=1, lr=1e-3)
FULL = StageConfig(name="full", train=["connectors", "llm"], data=["x"], steps=1, lr=1e-3)


def _batch(model, media_dir):
    sample = Sample("s", [Message("user", "<image>\nwhat is it?"), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    return model.collator()([model.processor(sample)])


def test_train_flops_count_the_backward_of_what_trains_and_change_nothing(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    batch = _batch(model, media_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_stage(model, CONNECTOR_ONLY)
    connector_only = train_flops(model, batch)
    apply_stage(model, FULL)
    full = train_flops(model, batch)
    with torch.no_grad():
        with FlopCounterMode(display=False) as forward:
            model(**batch)
    # backward costs about twice the forward for trained weights, and less when the LLM's weights are frozen
    assert forward.get_total_flops() < connector_only < full <= 3.2 * forward.get_total_flops()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_media_token_cost_grows_with_the_connector_tokens(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    model.processor.max_length = 12  # the probe samples are measured whatever the training length limit
    cost = media_token_cost(model, FULL, media_dir / "a.png", "image", (1, 2, 4))
    assert model.processor.max_length == 12
    per_item = model.media_token_count("image", (3, 16, 16))
    assert [c["media_tokens"] for c in cost] == [per_item, 2 * per_item, 4 * per_item]
    flops = [c["train_flops"] for c in cost]
    assert flops[0] < flops[1] < flops[2]


def test_adds_modality_counts_the_new_encoder_and_connector(tokenizer_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    encoder = EncoderConfig(modality="audio", hf_config=dict(TINY_WHISPER))
    added = adds_modality(model, {"encoders": encoder, "connectors": ConnectorConfig(kind="linear", pool_stride=2)})
    both = MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear"))
    expected = parameter_summary(both)["params_total"] - parameter_summary(model)["params_total"]
    assert added["new_params"] == expected > 0
    assert added["new_params_by_component"]["llm"] == 0 and not added["llm_params_changed"]
    assert added["new_params_by_component"]["fusion"] == 0
    assert "pool_stride: 2" in added["config_added"] and added["config_lines"] == len(added["config_added"].splitlines())
    with pytest.raises(ValueError, match="already reads"):
        adds_modality(model, {"encoders": EncoderConfig(modality="image"), "connectors": ConnectorConfig()})


def test_adding_a_codec_to_a_shared_vocabulary_needs_room_among_the_text_ids(tokenizer_dir):
    image = CodecConfig(modality="image", settings={"kind": "image", "quantizer": "vq", "image_size": 16, "downsample": 4,
                                                    "widths": [16, 16], "latent_dim": 8, "codebook_size": 16, "codebook_dim": 4})
    config = tiny_config(tokenizer_dir, image=None, fusion=FusionConfig(type="D", options={"vocabulary": "shared"}), codecs={"image": image})
    model = MultimodalLM.from_config(config)
    audio = {"kind": "audio", "n_fft": 256, "hop": 128, "stride": 2, "width": 16, "dim": 8, "griffin_lim_iterations": 4}
    fits = adds_modality(model, {"codecs": CodecConfig(modality="audio", settings={**audio, "num_quantizers": 2, "codebook_size": 16})})
    width = model.llm.get_input_embeddings().embedding_dim
    rows = 2 if model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight else 4
    assert fits["new_params_by_component"]["llm"] == rows * width  # its begin and end rows; the codes are text ids
    too_many = adds_modality(model, {"codecs": CodecConfig(modality="audio", settings={**audio, "num_quantizers": 4, "codebook_size": 256})})
    assert too_many["modality"] == "audio" and "no block of 1024 text ids" in too_many["error"]


def test_trainable_parameters_is_the_union_over_stages(tokenizer_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    counts = parameter_summary(model)
    assert trainable_parameters(model, [CONNECTOR_ONLY]) == counts["params_connectors"]
    assert trainable_parameters(model, [CONNECTOR_ONLY, FULL]) == counts["params_connectors"] + counts["params_llm"]
    config = tiny_config(tokenizer_dir)
    config.llm.add_tokens = ["<|endofchunk|>"]
    model = MultimodalLM.from_config(config)
    rows = dataclasses.replace(CONNECTOR_ONLY, train_added_tokens=True)
    width = model.llm.get_input_embeddings().embedding_dim
    # one added row, not the table, in the embedding and in the untied LM head
    assert model.llm.get_output_embeddings().weight is not model.llm.get_input_embeddings().weight
    assert trainable_parameters(model, [rows]) == counts["params_connectors"] + 2 * width


def test_budget_is_shared_over_stages_in_the_recipes_proportions():
    recipe = load_recipe("llava")  # 150 x 16 captions, then 3000 x 16 instructions
    scaled = budget_stages(recipe, 6400)
    steps = [s.steps for s in scaled.train.stages]
    assert steps == [round(6400 * 150 / 3150 / 16), round(6400 * 3000 / 3150 / 16)]
    assert budget_stages(recipe, 16).train.stages[0].steps == 1  # every stage keeps at least one step
    with pytest.raises(ValueError, match="budget"):
        budget_stages(recipe, 0)


def _record(name, survey_type, flops, slope, accuracy):
    cost = [{"items": n, "media_tokens": 10 * n, "train_flops": 1000 + slope * 10 * n} for n in (1, 2, 4)]
    return {
        "recipe": name, "survey_type": survey_type, "train_flops_per_sample": flops, "train_samples_per_s": 10.0,
        "peak_memory_mb": 100.0, "curve_task": "image_qa/val", "curve": [{"samples": 0, "accuracy": 0.1}, {"samples": 64, "accuracy": accuracy}],
        "budget": {"samples": 64, "stages": []}, "params_connectors": 10, "params_fusion": 5 if survey_type == "A" else 0,
        "params_trainable": 20, "params_total": 100, "media_token_cost": cost,
        "adds_modality": {"modality": "audio", "new_params": 50, "llm_params_changed": False, "config_lines": 5,
                          "new_params_by_component": {"fusion": 7 if survey_type == "A" else 0}},
        "generates": {"text": None}, "text_ppl_before": 5.0, "text_ppl_after": 6.0, "metrics": {}, "wall_seconds": 1.0,
        "train_seconds": 1.0,
    }


def test_report_verdicts_follow_the_measurements(tmp_path):
    assert _slope(_record("x", "C", 1, 3.5, 0.5)["media_token_cost"]) == pytest.approx(3.5)
    verdicts = {axis: verdict for axis, _, _, verdict in AXES}
    agree = [_record("flamingo", "A", 9e9, 1.0, 0.4), _record("llava", "C", 1e9, 5.0, 0.8)]
    disagree = [_record("flamingo", "A", 1e9, 9.0, 0.9), _record("llava", "C", 9e9, 5.0, 0.2)]
    assert verdicts["Training compute"](agree)[0] == "agrees"
    assert verdicts["Training compute"](disagree)[0] == "disagrees"
    assert verdicts["Training data"](agree)[0] == "agrees" and verdicts["Training data"](disagree)[0] == "disagrees"
    assert verdicts["Cost per media token"](agree)[0] == "agrees"
    assert verdicts["Cost per media token"](disagree)[0] == "disagrees"
    assert verdicts["Adding a modality"](agree)[0] == "agrees"
    assert verdicts["Training compute"](agree[1:])[0] == "not testable"
    failed = {"recipe": "broken", "survey_type": "C", "error": "boom", "wall_seconds": 0.5}
    text = write_markdown({"recipes": [*agree, failed], "settings": {"budget": 64, "seed": 0, "eval_limit": 8}, "data": "w"},
                          tmp_path / "report.md")
    assert "| Training compute |" in text and "**agrees**" in text and "broken** failed" in text and "boom" in text
    every = dict(_record("palm-e", "C", 1e9, 5.0, 0.8), adds_modality=None)  # it has every world modality
    assert verdicts["Adding a modality"]([*agree, every])[0] == "agrees"  # measured on the others
    text = write_markdown({"recipes": [*agree, every], "settings": {"budget": 64, "seed": 0, "eval_limit": 8}, "data": "w"},
                          tmp_path / "report2.md")
    assert "has every world modality" in text


def test_report_rows_show_binding_on_scenes_of_several_objects():
    def qa(split):  # colour 1 object 4/4, 2 objects 1/2; shape 3 objects 1/4; count questions are not binding
        return {"accuracy": 0.5, "by_kind": {}, "by_objects": {
            "colour": {"1": {"accuracy": 1.0, "count": 4}, "2": {"accuracy": 0.5, "count": 2}},
            "shape": {"3": {"accuracy": 0.25, "count": 4}}, "count": {"2": {"accuracy": 1.0, "count": 10}}}} if split else {"accuracy": 0.5}
    assert binding_accuracy(qa(True)) == pytest.approx((1 + 1) / 6) and binding_accuracy(qa(False)) is None
    records = [dict(_record("a", "A", 1, 1, 0.5), metrics={"image_qa/test": qa(True)}),
               dict(_record("b", "C", 1, 1, 0.5), metrics={"image_qa/test": qa(False)}),
               dict(_record("c", "C", 1, 1, 0.5), metrics={"audio_qa/test": {"accuracy": 0.5}})]
    rows = dict(metric_rows(records))
    assert rows["image_qa/test colour and shape, 2-3 objects"] == ["33.3%", "-", "-"]
    assert rows["image_qa/test accuracy"] == ["50.0%", "50.0%", "-"] and len(rows) == 3
