"""The feature probe: it reads what an averaged feature carries, uses the question, and runs on a run's
encoder and connector features of a written world."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_config

from mmfuse.data.formats import load_samples
from mmfuse.data.schema import Message, Sample
from mmfuse.data.synth.world import WorldSizes, write_world
from mmfuse.eval.feature_probe import FeatureProbe, media_features, probe_features, train_probe
from mmfuse.model import MultimodalLM

COLOURS, SHAPES = 5, 3


def _scenes(n: int, conjunctive: bool, seed: int):
    """Two-object scenes as 4 tokens (2 per object) and "what colour is shape s?" questions. Conjunctive
    tokens are one-hots of the (colour, shape) pair; additive ones are a colour one-hot and a shape
    one-hot, whose average cannot tell red square + blue circle from red circle + blue square."""
    rng = random.Random(seed)
    features, questions, targets = torch.zeros(n, 4, COLOURS * SHAPES + COLOURS + SHAPES), [], []
    for i in range(n):
        colours, shapes = rng.sample(range(COLOURS), 2), rng.sample(range(SHAPES), 2)
        for j, (c, s) in enumerate(zip(colours, shapes)):
            if conjunctive:
                features[i, 2 * j, c * SHAPES + s] = features[i, 2 * j + 1, c * SHAPES + s] = 1
            else:
                features[i, 2 * j, COLOURS * SHAPES + c] = features[i, 2 * j + 1, COLOURS * SHAPES + COLOURS + s] = 1
        asked = rng.randrange(2)
        questions.append([7, 8, shapes[asked]])  # "what colour is" + the shape's token id
        targets.append(colours[asked])
    return features, torch.tensor(questions), torch.tensor(targets)


def _accuracy(probe, features, questions, targets) -> float:
    with torch.no_grad():
        return (probe(features, questions).argmax(-1) == targets).float().mean().item()


def test_the_probe_binds_when_the_average_holds_the_binding_and_only_then():
    vocab = 10
    bound = _scenes(1500, conjunctive=True, seed=0)
    probe = train_probe(*bound, vocab, COLOURS, steps=600, seed=0)
    assert _accuracy(probe, *_scenes(400, conjunctive=True, seed=1)) > 0.95  # it reads the question
    features, questions, targets = bound
    blind = train_probe(features, torch.full_like(questions, 7), targets, vocab, COLOURS, steps=600, seed=0)
    assert _accuracy(blind, features, torch.full_like(questions, 7), targets) < 0.65  # without it: one object of two
    additive = _scenes(1500, conjunctive=False, seed=0)
    probe = train_probe(*additive, vocab, COLOURS, steps=600, seed=0)
    assert _accuracy(probe, *_scenes(400, conjunctive=False, seed=1)) < 0.65  # the average lost the binding
    assert torch.equal(train_probe(*bound, vocab, COLOURS, steps=5, seed=3).head[0].weight,
                       train_probe(*bound, vocab, COLOURS, steps=5, seed=3).head[0].weight)  # seeded
    padded = torch.tensor([[7, 8, 1, vocab, vocab]])
    probe = FeatureProbe(features.shape[-1], vocab, COLOURS)
    assert torch.equal(probe(features[:1], padded), probe(features[:1], torch.tensor([[7, 8, 1]])))  # padding is ignored


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("probe") / "w", seed=1, sizes=WorldSizes.tiny())


def test_probe_features_of_a_run_on_a_written_world(tokenizer_dir, world):
    config = tiny_config(tokenizer_dir)
    config.encoders["image"].hf_config["image_size"] = 48
    model = MultimodalLM.from_config(config)
    train, test = load_samples(world / "image_qa_train.json"), load_samples(world / "image_qa_test.json")
    connector = media_features(model, train, "connector")
    encoder = media_features(model, train, "encoder")
    assert connector.shape[:2] == encoder.shape[:2] and connector.shape[0] == len(train)
    assert connector.shape[-1] == model.llm.config.hidden_size != encoder.shape[-1]
    same_image = [i for i, s in enumerate(train) if s.media == train[0].media]
    assert len(same_image) > 1 and all(torch.equal(connector[i], connector[0]) for i in same_image)  # once per file
    with torch.no_grad():  # the rows are what the model computes for the item
        alone = model.encode_media({"image": model.media_processors["image"](train[0].media["image"][0]).unsqueeze(0)})
    assert torch.allclose(connector[0], alone["image"][0], atol=1e-6)

    result = probe_features(model, train, test, source="encoder", steps=30)
    assert result["count"] == len(test) and 0 <= result["accuracy"] <= 1 and 0 <= result["train_accuracy"] <= 1
    assert result["answers"] == sorted({s.messages[-1].content for s in train})
    assert sum(row["count"] for row in result["by_objects"]["colour"].values()) == result["by_kind"]["colour"]["count"]
    assert json.loads(json.dumps(result)) == result

    two = Sample("two", [Message("user", "<image><image>\nsame?"), Message("assistant", "no")],
                 {"image": train[0].media["image"] * 2})
    with pytest.raises(ValueError, match="'two'.*exactly one media item"):
        media_features(model, [two])
    with pytest.raises(ValueError, match="source"):
        media_features(model, train, "pixels")
    with pytest.raises(ValueError, match="train and test"):
        probe_features(model, train, [])
