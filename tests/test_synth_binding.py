"""Fast-binding episodes: labels follow the episode's classes, and only the context tells them."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mmfuse.data.formats import load_samples
from mmfuse.data.synth import binding
from mmfuse.data.synth.scenes import COLOURS, SHAPES
from mmfuse.data.synth.world import SplitSizes, WorldSizes, write_world


def _drawings():
    return [(f"d{i}.png", {"colour": COLOURS[i % 5], "shape": SHAPES[i % 3]}) for i in range(120)]


def test_labels_name_the_episodes_classes():
    drawings, rng = _drawings(), random.Random(0)
    target, grouped = dict(drawings), binding.group_by_class(drawings)
    kinds, labels_seen = set(), set()
    for _ in range(300):
        files, labels, kind = binding.episode(rng, grouped, ["wug", "dax", "blue", "seven"])
        ways, attribute = kind.split("-way ")
        kinds.add(kind)
        labels_seen.update(labels)
        assert len(files) == len(set(files)) == binding.SHOTS + 1  # five different drawings
        keys = [tuple(target[f][a] for a in (("colour", "shape") if attribute == "both" else (attribute,))) for f in files]
        assert {(k, label) for k, label in zip(keys, labels)} == set(dict(zip(keys, labels)).items())  # one label per class
        assert len(set(labels)) == len(set(keys)) == int(ways)  # and different classes, different labels
        assert keys[-1] in keys[:-1]  # the query's class is among the shots
    assert kinds == {f"{w}-way {a}" for w in (1, 2) for a in binding.ATTRIBUTES}
    assert len(labels_seen) == 4 + 4 * 3  # every one- and two-word label: drawn per episode, not fixed per class


def test_label_words_are_the_words_of_the_text():
    assert binding.label_words(["a handwritten seven.", "What colour is it? red."]) == [
        "colour", "handwritten", "is", "it", "red", "seven", "what"]


def test_the_world_writes_binding_documents(tmp_path):
    sizes = dataclasses.replace(WorldSizes.tiny(), generations=SplitSizes(40, 2, 2, 2), binding=SplitSizes(6, 0, 0, 0))
    root = write_world(tmp_path / "w", sizes=sizes)
    samples = load_samples(root / "binding_train.json")
    assert len(samples) == 6 and all(len(s.media["image"]) == 5 for s in samples)
    (message,) = samples[0].messages
    assert message.role == "document" and message.content.count("<|endofchunk|>") == 5
    assert message.content.endswith(f"{samples[0].meta['answer']}<|endofchunk|>")
    assert not (root / "binding_val.json").exists()  # no episodes asked for: no file
    prompts = load_samples(root / "binding_qa_train.json")  # the same episodes, scored as QA
    for document, prompt in zip(samples, prompts, strict=True):
        messages, answer = prompt.prompt_and_answer()
        assert answer == document.meta["answer"] and prompt.media == document.media
        assert messages[0].content + answer + "<|endofchunk|>" == document.messages[0].content  # stops at the query's image


def test_too_few_drawings_of_a_class_fall_back_to_another_attribute_or_are_named():
    drawings = [(f"d{i}.png", {"colour": ("red", "blue")[i % 2], "shape": ("circle", "square")[i // 2 % 2]}) for i in range(12)]
    rng = random.Random(0)  # 3 drawings of each colour-and-shape class, 6 of each colour and of each shape
    kinds = {binding.episode(rng, binding.group_by_class(drawings), ["wug", "dax"])[2].split("-way ")[1] for _ in range(60)}
    assert kinds == {"colour", "shape"}
    with pytest.raises(ValueError, match="classes of 5\\+ drawings among 4 drawings"):
        binding.episode(rng, binding.group_by_class(drawings[:4]), ["wug", "dax"])
