"""Webdataset shards: every sample round-trips, epochs are deterministic, resumable and split across ranks
without duplicates, the shuffle buffer mixes shards while holding only the buffer, errors name the sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.data.badsamples import BadSampleLog
from mmfuse.data.formats import load_samples
from mmfuse.data.media import load_video
from mmfuse.data.shards import ShardStream, write_shards
from mmfuse.data.synth.world import WorldSizes, write_world
from mmfuse.model import MultimodalLM

WORLD_TASKS = ["image_qa", "audio_qa", "image_audio_qa", "documents", "video_qa", "interleaved"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, sizes=WorldSizes.tiny())


@pytest.fixture(scope="module")
def dataset(world) -> Path:
    """One file mixing the world's LLaVA conversations, documents, image+audio and GIF videos with a caption
    pair and a video given as a directory of frames."""
    records = [r for task in WORLD_TASKS for r in json.loads((world / f"{task}_train.json").read_text())]
    frames = world / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for name in ["f2.png", "f0.png", "f1.jpg"]:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(frames / name)
    (frames / "notes.txt").write_text("not a frame")
    records.append({"id": "frames", "video": "frames", "conversations": [
        {"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "up"}]})
    records.append({"id": "pair", "image": records[0]["image"], "caption": "a caption"})
    path = world / "mixed_train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(dataset, out, samples_per_shard=10)
    return out


def _ids(samples) -> list[str]:
    return [s.id for s in samples]


def _shard_of(shards: Path) -> dict[str, str]:
    """Sample id -> the shard it was written to (shards keep the file's order)."""
    index = json.loads((shards / "index.json").read_text())
    names = [s["name"] for s in index["shards"] for _ in range(s["samples"])]
    return dict(zip(_ids(load_samples(index["source"])), names))


def test_every_sample_round_trips(dataset, shards):
    source = {s.id: s for s in load_samples(dataset)}
    streamed = list(ShardStream(shards, shuffle_buffer=1).epoch(seed=0))
    assert sorted(_ids(streamed)) == sorted(source)
    assert {m for s in streamed for m in s.media} == {"image", "audio", "video"}
    for sample in streamed:
        original = source[sample.id]
        assert sample.messages == original.messages
        assert sample.meta == original.meta
        assert sample.media.keys() == original.media.keys()
        for modality, items in original.media.items():
            if sample.id != "frames":
                assert sample.media[modality] == [p.read_bytes() for p in items], (sample.id, modality)
    frames = next(s for s in streamed if s.id == "frames").media["video"]
    assert frames == [[(dataset.parent / "frames" / f).read_bytes() for f in ["f0.png", "f1.jpg", "f2.png"]]]


def test_index_lists_balanced_shards(dataset, shards):
    index = json.loads((shards / "index.json").read_text())
    total = len(load_samples(dataset))
    counts = [s["samples"] for s in index["shards"]]
    assert index["format"] == "mmfuse-shards" and index["version"] == 1
    assert index["source"] == str(dataset.resolve()) and index["samples"] == total == sum(counts)
    assert len(counts) == -(-total // 10) and max(counts) <= 10 and max(counts) - min(counts) <= 1
    assert sorted(p.name for p in shards.iterdir()) == sorted([s["name"] for s in index["shards"]] + ["index.json"])
    assert len(ShardStream(shards)) == total


def test_same_input_writes_identical_shards(world, tmp_path):
    source = world / "audio_qa_train.json"
    first, second = write_shards(source, tmp_path / "a"), write_shards(source, tmp_path / "b")
    assert first == second
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()


@pytest.mark.parametrize("rank,ranks", [(0, 1), (1, 2)])
def test_resume_at_start_yields_the_rest_of_the_epoch(shards, rank, ranks):
    stream = ShardStream(shards, shuffle_buffer=25)
    full = list(stream.epoch(seed=4, rank=rank, world=ranks))
    for start in [0, 1, 17, len(full) - 1, len(full)]:
        rest = list(stream.epoch(seed=4, rank=rank, world=ranks, start=start))
        assert _ids(rest) == _ids(full[start:])
        assert [s.media for s in rest] == [s.media for s in full[start:]]
    with pytest.raises(ValueError, match="start must be in"):
        stream.epoch(seed=4, rank=rank, world=ranks, start=len(full) + 1)


def test_seed_decides_the_order(shards):
    stream = ShardStream(shards, shuffle_buffer=25)
    first = _ids(stream.epoch(seed=1))
    assert first == _ids(stream.epoch(seed=1))
    assert first != _ids(stream.epoch(seed=2))
    assert sorted(first) == sorted(_ids(stream.epoch(seed=2)))
    shard_of = _shard_of(shards)  # the seed also permutes the shards
    assert len({shard_of[next(ShardStream(shards, shuffle_buffer=1).epoch(seed)).id] for seed in range(6)}) > 1


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_read_disjoint_samples_of_equal_count(shards, ranks):
    stream = ShardStream(shards, shuffle_buffer=25)
    per_rank = [_ids(stream.epoch(seed=7, rank=r, world=ranks)) for r in range(ranks)]
    assert all(len(ids) == stream.samples_per_rank(ranks) for ids in per_rank)
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union))
    # unread: at most the shards left over after an equal split, and one sample per shard of size difference
    assert len(union) >= len(stream) - (len(stream.shards) % ranks) * 10 - len(stream.shards)


def test_fewer_shards_than_ranks_is_an_error(shards):
    stream = ShardStream(shards)
    with pytest.raises(ValueError, match=r"cannot be split over 99 ranks.*reshard with samples_per_shard at most"):
        stream.epoch(seed=0, world=99)
    with pytest.raises(ValueError, match="rank must be in"):
        stream.epoch(seed=0, rank=2, world=2)


def test_shuffle_buffer_mixes_shards(shards):
    shard_of = _shard_of(shards)
    first = min(n for _, n in ShardStream(shards).shards)  # the first `first` samples: one shard without a buffer
    for seed in range(3):
        mixed = list(ShardStream(shards, shuffle_buffer=40).epoch(seed))[:first]
        assert len({shard_of[s.id] for s in mixed}) > 1
        in_order = list(ShardStream(shards, shuffle_buffer=1).epoch(seed))[:first]
        assert len({shard_of[s.id] for s in in_order}) == 1


def test_stream_holds_only_the_buffer(shards, monkeypatch):
    read = []
    original = ShardStream._read_shard

    def counting(self, name):
        for record in original(self, name):
            read.append(record["__key__"])
            yield record

    monkeypatch.setattr(ShardStream, "_read_shard", counting)
    epoch = ShardStream(shards, shuffle_buffer=16).epoch(seed=0)
    for taken in range(1, 31):
        next(epoch)
        assert 16 <= len(read) <= 16 + taken  # the buffer filled once, then one record read per sample yielded


def test_missing_media_names_the_sample_and_leaves_no_shards(world, tmp_path):
    records = json.loads((world / "image_qa_train.json").read_text())[:25]
    records[22]["image"] = "images/missing.png"
    path = world / "broken_train.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"sample '{records[22]['id']}': field 'image'\[0\]: file .*missing.png' does not exist"):
        write_shards(path, out, samples_per_shard=10)
    assert list(out.iterdir()) == []  # two finished shards were written, then removed
    log = BadSampleLog()
    index = write_shards(path, out, samples_per_shard=10, on_bad_sample="skip", log=log)
    assert index["samples"] == 24 and [r.sample_id for r in log] == [records[22]["id"]]
    assert log.counts() == {"missing file": 1}
    assert records[22]["id"] not in _ids(ShardStream(out).epoch(seed=0))


def test_directory_for_an_image_is_refused(world, tmp_path):
    record = dict(json.loads((world / "image_qa_train.json").read_text())[0], image="images")
    path = world / "dir_train.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=rf"sample '{record['id']}': field 'image'\[0\]: .* is a directory"):
        write_shards(path, tmp_path / "out")


def test_existing_shards_are_not_overwritten(dataset, shards):
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(dataset, shards)


def test_a_shard_shorter_than_its_index_is_an_error(shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["samples"] += 1
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{index['shards'][0]['name']}: holds \d+ samples but index.json lists"):
        list(ShardStream(copy, shuffle_buffer=1).epoch(seed=0, start=0))


def test_cli_shard(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "shards"
    result = runner.invoke(app, ["data", "shard", str(world / "image_qa_train.json"), "--out", str(out),
                                 "--samples-per-shard", "20"])
    assert result.exit_code == 0, result.output
    total = len(load_samples(world / "image_qa_train.json"))
    assert f"wrote {total} samples in {-(-total // 20)} shard(s)" in " ".join(result.output.split())
    assert len(ShardStream(out)) == total
    again = runner.invoke(app, ["data", "shard", str(world / "image_qa_train.json"), "--out", str(out)])
    assert again.exit_code == 1 and "already holds shards" in " ".join(again.output.split())
    records = json.loads((world / "image_qa_train.json").read_text())[:5]
    records[1]["image"] = "images/missing.png"
    (world / "holes_train.json").write_text(json.dumps(records))
    skipping = runner.invoke(app, ["data", "shard", str(world / "holes_train.json"), "--out", str(tmp_path / "s"), "--skip-bad"])
    said = " ".join(skipping.output.split())
    assert skipping.exit_code == 0 and "wrote 4 samples" in said and "skipped 1 bad sample(s): 1 missing file" in said


def test_stream_samples_feed_the_processor(world, tokenizer_dir, tmp_path):
    source = world / "image_audio_qa_train.json"
    write_shards(source, tmp_path / "shards", samples_per_shard=5)
    config = tiny_config(tokenizer_dir, audio="linear")
    config.encoders["audio"].hf_config["max_source_positions"] = 100  # a 2 s window: the world's clips are 2 s
    processor = MultimodalLM.from_config(config).processor
    by_id = {s.id: s for s in load_samples(source)}
    for sample in ShardStream(tmp_path / "shards", shuffle_buffer=8).epoch(seed=0):
        streamed, original = processor(sample), processor(by_id[sample.id])
        assert streamed.input_ids == original.input_ids and streamed.labels == original.labels
        assert streamed.media.keys() == original.media.keys() == {"image", "audio"}
        for modality in streamed.media:
            assert torch.equal(streamed.media[modality], original.media[modality])


def test_stream_videos_load_like_their_files(dataset, shards):
    source = {s.id: s for s in load_samples(dataset)}
    videos = [s for s in ShardStream(shards, shuffle_buffer=1).epoch(seed=0) if "video" in s.media]
    assert {"frames"} < {s.id for s in videos}  # a frame directory and GIFs
    for sample in videos:
        streamed = load_video(sample.media["video"][0], 3, sample.id)
        original = load_video(source[sample.id].media["video"][0], 3, sample.id)
        assert [np.asarray(f).tolist() for f in streamed] == [np.asarray(f).tolist() for f in original], sample.id


def test_training_streams_shards_and_resumes_mid_epoch(world, tokenizer_dir, tmp_path):
    """``run_training`` streams a task from its shards (``{data}/{task}_train/``) instead of its JSON; a
    run resumed from a checkpoint inside the first epoch ends bit-identical to the uninterrupted one."""
    from safetensors.torch import load_file

    from mmfuse.recipe import Recipe
    from mmfuse.train import StageConfig, TrainConfig
    from mmfuse.training import run_training

    data = tmp_path / "data"
    data.mkdir()
    write_shards(world / "image_qa_train.json", data / "image_qa_train", samples_per_shard=6)
    stage = StageConfig(name="s", train=["connectors"], data=["image_qa"], steps=4, lr=1e-2, batch_size=2)
    train = TrainConfig(stages=[stage], output_dir="unused", save_every=2, keep_checkpoints=5, log_every=1, shuffle_buffer=4)
    recipe = Recipe(name="tiny", survey_type="C", description="", model=tiny_config(tokenizer_dir), train=train, eval={})
    run_training(recipe, data, tmp_path / "full", progress=False)  # data holds the shards only, no JSON
    assert sum(1 for _ in (tmp_path / "full" / "checkpoints").iterdir()) == 2
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    (tmp_path / "full" / "checkpoints" / "step-000002").rename(resumed / "step-000002")
    run_training(recipe, data, tmp_path / "resumed", resume=True, progress=False)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
