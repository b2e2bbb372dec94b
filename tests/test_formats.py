"""Dataset formats (LLaVA JSON, JSON lines, caption pairs), recipes and QA scoring."""

from __future__ import annotations

import json

import pytest

from mmfuse.data.formats import load_samples, resolve_dataset
from mmfuse.eval.metrics import exact_match, normalize_answer
from mmfuse.recipe import list_recipes, load_recipe


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_llava_json_with_several_media_anywhere(tmp_path):
    path = _write(tmp_path / "d.json", [{
        "id": "x1", "image": ["a.png", "b.png"], "audio": "c.wav",
        "conversations": [{"from": "human", "value": "compare <image> and <image>, then hear <audio>"},
                          {"from": "gpt", "value": "same"}],
        "meta": {"kind": "compare"},
    }])
    (sample,) = load_samples(path)
    assert sample.id == "x1" and [m.role for m in sample.messages] == ["user", "assistant"]
    assert sample.media["image"] == [tmp_path / "a.png", tmp_path / "b.png"]
    assert sample.media["audio"] == [tmp_path / "c.wav"] and sample.meta["kind"] == "compare"


def test_jsonl_and_caption_pairs(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": "c1", "image": "a.png", "caption": "a red circle."}\n\n'
                                      '{"audio": "s.wav", "caption": "a low tone."}\n')
    first, second = load_samples(tmp_path / "c.jsonl")
    assert first.messages[0].content.startswith("<image>") and first.messages[1].content == "a red circle."
    assert second.id == "c.jsonl#1" and second.media == {"audio": [tmp_path / "s.wav"]}


def test_interleaved_documents(tmp_path):
    path = _write(tmp_path / "docs.json", [{"id": "d1", "image": ["a.png", "b.png"],
                                            "text": "<image>a cat.<|endofchunk|><image>a dog.<|endofchunk|>"}])
    (sample,) = load_samples(path)
    assert sample.is_document and sample.messages[0].content.count("<image>") == 2
    assert sample.media["image"] == [tmp_path / "a.png", tmp_path / "b.png"]
    with pytest.raises(ValueError, match="bad.json#0: sample 'd2': text: must be a non-empty string"):
        load_samples(_write(tmp_path / "bad.json", [{"id": "d2", "text": ""}]))
    with pytest.raises(ValueError, match="sample 'd3': image: lists 1 item"):
        load_samples(_write(tmp_path / "bad2.json", [{"id": "d3", "image": ["a.png"], "text": "<image>a<image>b"}]))


@pytest.mark.parametrize("record,pattern", [
    ({"id": "r", "conversations": []}, r"bad.json#0: sample 'r': conversations: must be a non-empty list"),
    ({"id": "r", "conversations": [{"from": "robot", "value": "x"}]}, r"sample 'r': conversations\[0\].from: is 'robot'"),
    ({"id": "r", "conversations": [{"from": "human", "value": 3}]}, r"sample 'r': conversations\[0\].value: must be a string"),
    ({"id": "r", "image": "a.png", "conversations": [{"from": "human", "value": "no marker"}]}, r"sample 'r': image: lists 1 item"),
    ({"id": "r", "image": 5, "conversations": [{"from": "human", "value": "<image>"}]}, r"sample 'r': image\[0\]: must be a path"),
])
def test_bad_records_name_sample_and_field(tmp_path, record, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_samples(_write(tmp_path / "bad.json", [record]))


def test_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_samples(tmp_path / "broken.json")
    (tmp_path / "latin.json").write_bytes(b"\xff\xfe[]")
    with pytest.raises(ValueError, match="latin.json: not valid UTF-8 at byte 0"):
        load_samples(tmp_path / "latin.json")
    dup = [{"id": "d", "conversations": [{"from": "human", "value": "x"}]}] * 2
    with pytest.raises(ValueError, match="dup.json#1: sample 'd': id: appears more than once"):
        load_samples(_write(tmp_path / "dup.json", dup))


def test_resolve_dataset(tmp_path):
    (tmp_path / "image_qa_test.json").write_text("[]")
    assert resolve_dataset(tmp_path, "image_qa", "test") == tmp_path / "image_qa_test.json"
    with pytest.raises(FileNotFoundError, match=r"no dataset 'audio_qa' for split 'test'.*image_qa_test.json"):
        resolve_dataset(tmp_path, "audio_qa", "test")


def test_builtin_recipes_load_with_their_survey_type():
    names = list_recipes()
    assert {"llava", "llava-1.5", "blip2", "qwen-audio"} <= set(names)
    llava = load_recipe("llava")
    assert llava.survey_type == "C" and llava.model.connectors["image"].kind == "linear"
    assert llava.model.encoders["image"].feature_layer == -2
    assert [s.train for s in llava.train.stages] == [["connectors"], ["connectors", "llm"]]
    assert load_recipe("llava-1.5").model.connectors["image"].kind == "mlp2x_gelu"
    blip2 = load_recipe("blip2")
    assert blip2.model.connectors["image"].num_queries == 32 and all("llm" not in s.train for s in blip2.train.stages)
    audio = load_recipe("qwen-audio").model.connectors["audio"]
    assert audio.pool_stride == 2 and audio.boundary_tokens
    type_a = ["flamingo", "openflamingo", "idefics", "multimodal-gpt", "dolphins", "audio-flamingo", "otter"]
    assert all(load_recipe(n).survey_type == "A" and load_recipe(n).model.fusion.type == "A" for n in type_a)
    assert load_recipe("idefics").model.fusion.options["placement"] == "idefics"
    assert load_recipe("audio-flamingo").model.fusion.options["media_attention"] == "all_previous"
    assert load_recipe("multimodal-gpt").train.stages[1].lora == ["llm", "fusion"]
    dolphins = load_recipe("dolphins")
    assert dolphins.model.connectors["video"].max_frames == 8 and dolphins.model.connectors["video"].positions_2d
    assert dolphins.train.stages[1].kinds == ["direction", "speed"]  # the motion stage
    assert load_recipe("otter").model.llm.add_tokens == ["<answer>", "<|endofchunk|>"]
    mechanisms = {"llama-adapter": "adapter_prompts", "llama-adapter-v2": "adapter_prompts", "cogvlm": "visual_expert",
                  "mplug-owl2": "modality_adaptive", "moe-llava": "moe", "lion": "adapter_mixture"}
    for name, mechanism in mechanisms.items():
        recipe = load_recipe(name)
        assert recipe.survey_type == "B" and recipe.model.fusion.options["mechanism"] == mechanism
    assert load_recipe("cogvlm").model.connectors["image"].kind == "glu"
    cogagent = load_recipe("cogagent")  # CogVLM plus a cross-attention branch over every patch
    assert cogagent.model.fusion.options["mechanism"] == "visual_expert" and cogagent.model.fusion.cross_attention["every"] == 1
    assert cogagent.model.connectors["image"].pool_stride == 4
    interleaved = load_recipe("mm-interleaved")
    assert interleaved.model.fusion.type == "C" and interleaved.model.fusion.cross_attention["placement"] == "idefics"
    assert load_recipe("moe-llava").train.stages[-1].train == ["fusion"]  # experts and routers only
    internvl = load_recipe("internvl")  # QLLaMA: the LLM's first layers, copied, as the connector
    assert internvl.model.fusion.type == "C" and internvl.model.connectors["image"].kind == "qllama"
    assert all("llm" not in s.train for s in internvl.train.stages)
    idefics2 = load_recipe("idefics2")
    assert idefics2.model.fusion.type == "C" and idefics2.model.connectors["image"].num_latents == 64
    assert sorted(load_recipe("palm-e").model.encoders) == ["audio", "image"]
    assert load_recipe("video-llama").model.connectors["video"].max_frames == 8  # temporal positions
    qwen_vl = load_recipe("qwen-vl")
    assert qwen_vl.model.connectors["image"].positions_2d and "encoders" not in qwen_vl.train.stages[-1].train
    assert load_recipe("minigpt4").train.stages[-1].train == ["connectors.image.core.proj"]  # one linear layer
    tokenized = {"chameleon": ["image"], "teal": ["image"], "anygpt": ["image", "audio"], "audiopalm": ["audio"], "seed": ["image"],
                 "lavit": ["image"], "cm3leon": ["image"], "unicode": ["image"], "vl-gpt": ["image"]}
    for name, modalities in tokenized.items():
        recipe = load_recipe(name)
        assert recipe.survey_type == "D" and list(recipe.model.codecs) == modalities and not recipe.model.encoders
    assert load_recipe("seed").model.codecs["image"].name_or_path == "world:query_image_codec"  # learned-query codes
    assert load_recipe("lavit").model.fusion.options["read"] == "features"  # understands from features, writes codes
    assert load_recipe("vl-gpt").model.fusion.options["write"] == "features"  # regresses the embeddings it writes
    assert load_recipe("cm3leon").train.stages[-1].retrieved == 2  # retrieval-augmented training
    unicode = load_recipe("unicode")  # image codes are text ids of the LLM's own vocabulary
    assert unicode.model.fusion.options["vocabulary"] == "shared"
    assert unicode.model.codecs["image"].name_or_path == "world:unified_image_codec"
    assert load_recipe("teal").train.stages[0].train == [] and load_recipe("teal").train.stages[0].train_added_tokens
    assert load_recipe("audiopalm").model.task_prefixes["audio_caption"] == "[ASR] "
    assert load_recipe("audiopalm").model.codecs["audio"].name_or_path == "world:semantic_audio"
    slm = load_recipe("slm")
    assert [s.train for s in slm.train.stages] == [["connectors"]] and slm.model.connectors["audio"].pool_stride == 4


def test_unknown_recipe_lists_the_builtins():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*llava"):
        load_recipe("nope")


def test_answer_normalisation():
    assert normalize_answer("The  Red, circle.") == "red circle"
    assert exact_match("Top left.", "top left") and not exact_match("top", "top left")
