"""write_world: determinism, file integrity, marker/media agreement and the held-out split."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from mmfuse.data.schema import Message, Sample
from mmfuse.data.synth import digits, documents, heldout, scenes, sounds
from mmfuse.data.synth.text import text_corpus, text_question
from mmfuse.data.synth.world import SPLITS, TASKS, SplitSizes, WorldSizes, write_world

ROLES = {"human": "user", "gpt": "assistant"}
HELDOUT_PHRASES = [f"{c} {s}" for c, s in heldout.HELDOUT_SHAPES] + [f"{p} {k}" for k, p in heldout.HELDOUT_SOUNDS]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path, manifest: dict) -> list[dict]:
    return [r for task, splits in manifest["files"].items() if task != "text_corpus" for name in splits.values() for r in json.loads((root / name).read_text())]


def _sample(record: dict) -> Sample:
    media = {m: record[m] if isinstance(record[m], list) else [record[m]] for m in ("image", "audio", "video") if m in record}
    if "text" in record:  # an interleaved document in OpenFlamingo's form
        return Sample(record["id"], [Message("document", record["text"])], media, record["meta"])
    messages = [Message(ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]
    return Sample(record["id"], messages, media, record["meta"])


def _contains_heldout(text: str) -> bool:
    return any(phrase in text for phrase in HELDOUT_PHRASES)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    root = write_world(tmp_path_factory.mktemp("world") / "w", seed=0, sizes=WorldSizes.tiny())
    return root, json.loads((root / "world.json").read_text())


def test_same_seed_is_byte_identical_and_another_seed_differs(world, tmp_path):
    root, _ = world
    calls = []
    again = write_world(tmp_path / "again", seed=0, sizes=WorldSizes.tiny(), progress=lambda d, t, s: calls.append((d, t)))
    assert _digest(again) == _digest(root)
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == list(range(1, len(calls) + 1))
    other = _digest(write_world(tmp_path / "other", seed=1, sizes=WorldSizes.tiny()))
    with pytest.raises(FileExistsError, match="not empty"):
        write_world(root, seed=0, sizes=WorldSizes.tiny())
    reference = _digest(root)
    assert {k for k in other if "/" not in k} == {k for k in reference if "/" not in k}
    assert other["image_qa_train.json"] != reference["image_qa_train.json"]
    assert other["audio/audio-train-00000.wav"] != reference["audio/audio-train-00000.wav"]


def test_manifest_lists_every_file_and_count(world):
    root, manifest = world
    listed = {name for splits in manifest["files"].values() for name in splits.values()}
    on_disk = {p.name for p in root.iterdir() if p.is_file()} - {"world.json"}
    assert listed == on_disk
    assert set(manifest["files"]) == set(TASKS) - {"binding", "binding_qa"} | {"text_corpus"}  # too few tiny drawings to bind: test_synth_binding
    for task, splits in manifest["records"].items():
        for split, n in splits.items():
            assert len(json.loads((root / manifest["files"][task][split]).read_text())) == n
    assert manifest["media"] == {d.name: len(list(d.iterdir())) for d in root.iterdir() if d.is_dir()}
    assert manifest["sizes"] == WorldSizes.tiny().to_dict()
    assert WorldSizes.from_dict(manifest["sizes"]) == WorldSizes.tiny()
    assert sorted(manifest["files"]["digits_qa"]) == ["test", "train", "val"]
    test_digits = json.loads((root / manifest["files"]["digits_qa"]["test"]).read_text())
    assert sorted(r["conversations"][1]["value"] for r in test_digits) == sorted(digits.DIGIT_WORDS)  # stratified


def test_records_are_valid_samples_with_existing_media(world):
    root, manifest = world
    records = _records(root, manifest)
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        sample = _sample(record)
        sample.validate()
        turns = ["document"] if "text" in record else ["user", "assistant"] * (2 if record["meta"]["task"] == "chain_qa" else 1)
        assert [m.role for m in sample.messages] == turns
        assert sample.messages[-1].content
        for files in sample.media.values():
            assert all((root / f).is_file() for f in files)
        meta = record["meta"]
        assert meta["task"] in TASKS and meta["split"] in SPLITS and meta["kind"]
        assert {m: len(c) for m, c in meta.get("captions", {}).items()} == {m: len(f) for m, f in sample.media.items()}
    both = [r for r in records if r["meta"]["task"] == "image_audio_qa"]
    assert both and all(_sample(r).marker_counts() == {"image": 1, "audio": 1, "video": 0} for r in both)
    multi = [r for r in records if r["meta"]["task"] == "audio_multi_qa"]  # two questions about one clip, one reply
    answers = {(r["audio"], r["conversations"][0]["value"]): r["conversations"][1]["value"]
               for r in records if r["meta"]["task"] == "audio_qa"}
    assert len(multi) == sum(WorldSizes.tiny().sounds[s] for s in SPLITS)
    for r in multi:
        first, second = r["conversations"][0]["value"].removesuffix(" Answer both.").split("? ")  # "<audio>\nQ1", "Q2?"
        expected = [answers[(r["audio"], first + "?")], answers[(r["audio"], "<audio>\n" + second)]]
        assert r["conversations"][1]["value"] == ", ".join(expected) and "+" in r["meta"]["kind"]
    docs = [r for r in records if r["meta"]["task"] == "interleaved"]
    assert all(documents.MIN_IMAGES <= len(r["image"]) <= documents.MAX_IMAGES for r in docs)
    # a scene's records say how many objects it holds: its count question's answer
    scene_records = [r for r in records if r["meta"]["task"] in ("image_qa", "image_caption")]
    objects = {r["image"]: r["meta"]["objects"] for r in scene_records}
    counted = {r["image"]: r["conversations"][1]["value"] for r in scene_records if r["meta"]["kind"] == "count"}
    assert counted and {f: scenes.COUNT_WORDS[objects[f]] for f in counted} == counted
    assert set(objects.values()) == {1, 2, 3}
    assert not any("objects" in r["meta"] for r in records if r["meta"]["task"] in ("audio_qa", "digits_qa"))


def test_heldout_combinations_only_in_heldout_split(world):
    root, manifest = world
    for record in _records(root, manifest):
        meta = record["meta"]
        texts = [m.content for m in _sample(record).messages]
        captions = [c for caps in meta.get("captions", {}).values() for c in caps]
        if meta["split"] == "heldout":
            per_item = [c for c in captions if _contains_heldout(c)]
            # every media item of a held-out record contains a held-out combination
            assert len(per_item) == len(captions) > 0, record["id"]
        else:
            assert not any(_contains_heldout(t) for t in texts + captions), record["id"]
    for split in manifest["files"]["text_corpus"]:
        assert not _contains_heldout((root / f"text_corpus_{split}.txt").read_text())


def test_text_corpus_and_questions_are_seeded():
    assert text_corpus(random.Random(3), 50) == text_corpus(random.Random(3), 50)
    lines = text_corpus(random.Random(0), 2000)
    assert not any(_contains_heldout(line) for line in lines)
    assert any(line.endswith(" is two.") for line in lines) and any("? " in line for line in lines)
    kinds = {text_question(random.Random(i))[0] for i in range(200)}
    assert kinds == {"opposite", "plus", "minus", "after", "before", "count"}


def test_few_shot_prompt_interleaves_markers():
    doc = documents.sample_document(random.Random(0), lambda r: scenes.sample_scene(r, allowed=heldout.shape_allowed))
    shots = documents.caption_document(doc)
    prompt = documents.few_shot_prompt(shots[:-1])
    assert prompt.count("<image>") == len(doc) and prompt.endswith("<image>")
    assert shots[-1] == ("", scenes.caption(doc[-1]))
    text = documents.document_text(shots)
    assert text.count("<image>") == text.count("<|endofchunk|>") == len(doc)
    assert text.startswith(f"<image>{scenes.caption(doc[0])}<|endofchunk|>")
    bursty = [documents.sample_document(random.Random(i)) for i in range(200)]
    repeats = sum(d[-1] in d[:-1] for d in bursty)
    assert 60 < repeats < 140  # about half the documents repeat a scene in their last position
    assert documents.few_shot_prompt([("What colour is the circle?", "red")], "What colour is the square?") == (
        "<image>\nWhat colour is the circle? red.\n<image>\nWhat colour is the square?"
    )


def test_heldout_sampling_and_size_validation():
    rng = random.Random(0)
    for _ in range(20):
        assert heldout.clip_is_heldout(heldout.sample_heldout(sounds.sample_clip, heldout.clip_is_heldout, rng))
    with pytest.raises(RuntimeError, match="no held-out item"):
        heldout.sample_heldout(lambda r: scenes.sample_scene(r, allowed=heldout.shape_allowed), heldout.scene_is_heldout, rng)
    with pytest.raises(ValueError, match="text.heldout"):
        WorldSizes(text=SplitSizes(1, 1, 1, 1))
    with pytest.raises(ValueError, match="sizes.binding.train is 4000 but sizes.generations.train is 0"):
        WorldSizes(generations=SplitSizes(0, 0, 0, 0))


def test_synth_cli_takes_sizes_and_other_splits_keep_their_items(world, tmp_path):
    from typer.testing import CliRunner

    from mmfuse.cli import app

    root, _ = world
    sizes = WorldSizes.tiny().to_dict()
    sizes["videos"]["train"] = 7  # more training videos; everything else as the tiny world
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "w"), "--sizes", str(tmp_path / "sizes.json")])
    assert result.exit_code == 0, result.output
    videos = json.loads((tmp_path / "w" / "video_caption_train.json").read_text())
    assert len(videos) == 7
    for name in ("video_qa_test.json", "image_qa_train.json"):  # other splits and modalities: the same items
        assert (tmp_path / "w" / name).read_bytes() == (root / name).read_bytes()
    both = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--tiny", "--sizes", str(tmp_path / "sizes.json")])
    assert both.exit_code != 0 and "not both" in both.output
