"""The evaluation adapter, tasks (QA, captions, choice accuracy, few-shot) on tiny random models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY_LLMS, tiny_config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mmfuse.data.schema import Message, Sample
from mmfuse.eval import tasks
from mmfuse.eval.adapter import EvalAdapter
from mmfuse.eval.metrics import perplexity
from mmfuse.model import MultimodalLM


def _qa(media_dir, sid, answer, image="a.png", kind="colour"):
    return Sample(sid, [Message("user", "<image>\nwhat colour is it?"), Message("assistant", answer)],
                  {"image": [media_dir / image]}, {"kind": kind})


def test_qa_scores_split_each_kind_by_the_objects_in_the_scene(media_dir):
    samples = [_qa(media_dir, "s0", "red"), _qa(media_dir, "s1", "blue"), _qa(media_dir, "s2", "green"),
               _qa(media_dir, "s3", "square", kind="shape")]
    for sample, objects in zip(samples, (1, 2, 2, 3)):
        sample.meta["objects"] = objects
    scores = tasks.qa_scores(samples, ["red", "blue", "red", "circle"])
    assert scores["by_objects"] == {"colour": {"1": {"accuracy": 1.0, "count": 1}, "2": {"accuracy": 0.5, "count": 2}},
                                    "shape": {"3": {"accuracy": 0.0, "count": 1}}}
    assert scores["by_kind"]["colour"] == {"accuracy": 2 / 3, "count": 3}
    assert "by_objects" not in tasks.qa_scores([_qa(media_dir, "s4", "red")], ["red"])  # media without a scene count


def test_score_is_the_summed_log_likelihood_of_the_answer(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    adapter = EvalAdapter(model, batch_size=3)
    samples = [_qa(media_dir, "s0", "red"), _qa(media_dir, "s1", "blue", "b.png")]
    candidates = ["red", "a large blue one", "no"]
    scores = adapter.score(samples, candidates)
    assert scores.shape == (2, 3)
    for i, sample in enumerate(samples):
        for j, candidate in enumerate(candidates):
            filled = Sample(sample.id, [sample.messages[0], Message("assistant", candidate)], sample.media)
            batch = model.collator()([model.processor(filled)])
            with torch.no_grad():
                loss = model(**batch).loss  # mean NLL over the labelled tokens
            n_labels = (batch["labels"] != -100).sum()
            torch.testing.assert_close(scores[i, j], -loss * n_labels, rtol=1e-4, atol=1e-4)


class _FixedScores:
    """An adapter stand-in whose likelihoods favour a fixed answer per sample id."""

    batch_size = 8

    def __init__(self, favourite: dict[str, str]):
        self.favourite = favourite

    def score(self, samples, candidates):
        return torch.tensor([[1.0 if c == self.favourite[s.id] else 0.0 for c in candidates] for s in samples])


def test_choice_accuracy_ranks_the_answers_of_each_kind(media_dir):
    samples = [_qa(media_dir, "a", "red"), _qa(media_dir, "b", "blue"), _qa(media_dir, "c", "two", kind="count"),
               _qa(media_dir, "d", "three", kind="count")]
    # "a" right, "b" wrong (red is a colour candidate), "c" right, "d" wrong (two is a count candidate)
    adapter = _FixedScores({"a": "red", "b": "red", "c": "two", "d": "two"})
    assert tasks.choice_accuracy(adapter, samples) == pytest.approx(2 / 4)


class _FixedEmbeddings:
    batch_size = 8

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def embed(self, modality, items):
        return torch.tensor([self.vectors[str(item)] for item in items])


def test_few_shot_retrieval_prepends_the_nearest_examples(media_dir):
    pool = [Sample(f"p{i}", [Message("user", "<image>\nq"), Message("assistant", f"a{i}")], {"image": [f"img{i}"]})
            for i in range(4)]
    query = Sample("q", [Message("user", "<image>\nwhat?"), Message("assistant", "x")], {"image": ["query"]})
    vectors = {"img0": [1, 0], "img1": [0, 1], "img2": [0.9, 0.1], "img3": [-1, 0], "query": [1, 0.05]}
    out = tasks.few_shot(_FixedEmbeddings(vectors), [query], pool, 2, "retrieval", seed=0)[0]
    assert [m.content for m in out.messages] == ["<image>\nq", "a0", "<image>\nq", "a2", "<image>\nwhat?", "x"]
    assert out.media["image"] == ["img0", "img2", "query"]
    random_shots = tasks.few_shot(_FixedEmbeddings(vectors), [query], pool, 3, "random", seed=0)[0]
    assert len(random_shots.messages) == 8 and random_shots.media["image"][-1] == "query"
    with pytest.raises(ValueError, match="shot_selection"):
        tasks.few_shot(_FixedEmbeddings(vectors), [query], pool, 1, "nearest", seed=0)


def test_few_shot_as_an_openflamingo_document(media_dir):
    pool = [Sample(f"p{i}", [Message("user", "<image>\nDescribe the image."), Message("assistant", f"cap {i}.")],
                   {"image": [f"img{i}"]}) for i in range(2)]
    query = Sample("q", [Message("user", "<image>\nDescribe the image."), Message("assistant", "cap q.")], {"image": ["query"]})
    vectors = {"img0": [0, 1], "img1": [1, 0], "query": [1, 0.1]}
    (out,) = tasks.few_shot(_FixedEmbeddings(vectors), [query], pool, 2, "retrieval", seed=0, shot_format="document")
    assert out.is_document and out.prompt_and_answer()[1] == "cap q."
    # nearest shot first (as in the turns format), the caption request dropped, each shot's chunk
    # closed; the query left open
    assert out.messages[0].content == "<image>cap 1.<|endofchunk|><image>cap 0.<|endofchunk|><image>"
    assert out.media["image"] == ["img1", "img0", "query"]
    qa = Sample("v", [Message("user", "<image>\nwhat colour?"), Message("assistant", "red")], {"image": ["query"]})
    (doc,) = tasks.few_shot(_FixedEmbeddings(vectors), [qa], pool[:1], 1, "random", seed=0, shot_format="document")
    assert doc.messages[0].content == "<image>cap 0.<|endofchunk|><image>what colour?"
    with pytest.raises(ValueError, match="shot_format"):
        tasks.few_shot(_FixedEmbeddings(vectors), [query], pool, 1, "random", seed=0, shot_format="chat")


def test_evaluate_task_on_a_written_world(tokenizer_dir, tmp_path):
    from mmfuse.data.synth.world import WorldSizes, write_world

    write_world(tmp_path / "w", seed=1, sizes=WorldSizes.tiny())
    config = tiny_config(tokenizer_dir)
    config.encoders["image"].hf_config["image_size"] = 48
    adapter = EvalAdapter(MultimodalLM.from_config(config), batch_size=4)
    qa = tasks.evaluate_task(adapter, tmp_path / "w", "image_qa", "test", choices=True)
    records = json.loads((tmp_path / "w" / "image_qa_test.json").read_text())
    assert qa["count"] == len(records)
    assert sum(k["count"] for k in qa["by_kind"].values()) == len(records)
    assert 0.0 <= qa["choice_accuracy"] <= 1.0
    assert qa["accuracy"] == sum(p["correct"] for p in qa["predictions"]) / len(records)
    caption = tasks.evaluate_task(adapter, tmp_path / "w", "image_caption", "test", limit=3, max_new_tokens=4)
    assert caption["count"] == 3 and caption["cider_d"] >= 0.0
    shots = tasks.evaluate_task(adapter, tmp_path / "w", "image_qa", "test", limit=2, shots=2, shot_selection="retrieval")
    assert shots["count"] == 2 and all(p["id"].endswith("+2shot") for p in shots["predictions"])
    document = tasks.evaluate_task(adapter, tmp_path / "w", "digits_caption", "test", limit=2, shots=2, shot_format="document",
                                   max_new_tokens=4)
    assert document["count"] == 2 and document["shot_format"] == "document"
    with pytest.raises(ValueError, match="no metric"):
        tasks.evaluate_task(adapter, tmp_path / "w", "text", "test")
    outside = tmp_path / "elsewhere"  # the test split in its own directory, its images left where they were
    outside.mkdir()
    moved = [dict(r, image=f"../w/{r['image']}") for r in records[:2]]
    (outside / "image_qa_test.json").write_text(json.dumps(moved))
    with pytest.raises(ValueError, match="image"):
        tasks.evaluate_task(adapter, outside, "image_qa", "test")
    assert tasks.evaluate_task(adapter, outside, "image_qa", "test", allow_outside_root=True)["count"] == 2


def test_any_hf_causal_lm_loads_as_a_text_only_model(plain_tokenizer_dir, tmp_path):
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLMS["llama"].items() if k != "model_type"}, vocab_size=320))
    llm.save_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    tokenizer.save_pretrained(tmp_path / "hf")
    assert not MultimodalLM.is_checkpoint(tmp_path / "hf")  # config.json + model.safetensors, but not ours
    adapter = EvalAdapter.load(tmp_path / "hf")
    assert not adapter.model.encoders
    texts = ["a red circle at the top.", "two plus two is four."]
    adapter.model.train()
    assert adapter.text_perplexity(texts) == pytest.approx(perplexity(llm.eval(), tokenizer, texts), rel=1e-5)
    assert adapter.model.training  # the evaluation mode does not outlive the call
    sample = Sample("t", [Message("user", "What is two plus two?"), Message("assistant", "four")])
    assert len(adapter.generate([sample], max_new_tokens=3)) == 1
    assert adapter.score([sample], ["four", "five"]).shape == (1, 2)
    random.seed(0)
