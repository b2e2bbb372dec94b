"""CogCoM's manipulations: the box format, crop-and-zoom, the world's chains and the evaluation loop."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmfuse.data.formats import load_samples
from mmfuse.data.manipulations import CHAIN_REQUEST, box_iou, crop_and_zoom, format_box, grounding_step, parse_box
from mmfuse.data.media import load_image
from mmfuse.data.schema import MARKERS
from mmfuse.data.synth import scenes
from mmfuse.data.synth.world import WorldSizes, write_world
from mmfuse.eval.tasks import chain_scores, evaluate_task


def test_boxes_are_written_and_read_in_cogvlms_format():
    assert format_box((0, 42, 354, 999)) == "[[000,042,354,999]]"
    step = grounding_step("the square", (0, 646, 354, 999))
    assert step == "grounding(the square) -> [[000,646,354,999]]; crop_and_zoom([[000,646,354,999]])"
    assert parse_box(step) == (0, 646, 354, 999)
    assert parse_box("[[5,5,5,9]] then [[1,2,30,40]]") == (1, 2, 30, 40)  # a degenerate box is skipped
    for text in ("no box", "[[1,2,3]]", "[[1, 2, 3, 4]]", "[[1,2,1000,4]]"):
        assert parse_box(text) is None, text
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_crop_and_zoom_shows_the_grounded_object_at_the_images_size():
    scene = scenes.Scene([scenes.Shape("circle", "red", "small", 0, 0), scenes.Shape("square", "blue", "large", 2, 2)])
    image = scenes.render_scene(scene)
    for shape in scene.shapes:
        crop = crop_and_zoom(image, scenes.object_box(shape))
        assert crop.size == image.size
        counts = Counter(tuple(int(v) for v in p) for p in np.asarray(crop).reshape(-1, 3))
        counts.pop(scenes.BACKGROUND_RGB)
        # the object's colour is the commonest (bilinear zoom blends its edge with the background)
        assert counts.most_common(1)[0][0] == scenes.COLOUR_RGB[shape.colour], (shape, counts.most_common(3))
        other = next(s for s in scene.shapes if s is not shape)
        assert scenes.COLOUR_RGB[other.colour] not in counts
    whole = crop_and_zoom(image, (0, 0, 999, 999))
    assert np.array_equal(np.asarray(whole), np.asarray(image))


def test_object_boxes_hold_the_whole_object():
    rng = random.Random(0)
    for _ in range(50):
        scene = scenes.sample_scene(rng)
        objects = scenes.object_map(scene)
        for i, shape in enumerate(scene.shapes):
            x0, y0, x1, y1 = (v * scenes.IMAGE_SIZE / 1000 for v in scenes.object_box(shape))
            ys, xs = np.nonzero(objects == i + 1)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("chains") / "w", seed=0, sizes=WorldSizes.tiny())


def test_world_chains_ground_the_named_object_and_show_its_crop(world):
    records = [r for split in ("train", "val", "test") for r in json.loads((world / f"chain_qa_{split}.json").read_text())]
    qa = {r["image"]: r for r in json.loads((world / "image_qa_train.json").read_text())}
    assert records and not (world / "chain_qa_heldout.json").exists()
    kinds = {r["meta"]["kind"] for r in records}
    assert kinds == {"colour", "shape"}
    for record in records:
        scene_file, crop_file = record["image"]
        turns = [t["value"] for t in record["conversations"]]
        assert turns[0].startswith(MARKERS["image"]) and turns[0].endswith("? " + CHAIN_REQUEST) and turns[2] == MARKERS["image"]
        box = parse_box(turns[1])
        assert box is not None and list(box) == record["meta"]["box"]
        expected = crop_and_zoom(load_image(world / scene_file), box)
        assert np.array_equal(np.asarray(load_image(world / crop_file)), np.asarray(expected))
        # the answer is what the crop shows: its caption names the answer
        crop_caption = record["meta"]["captions"]["image"][1]
        assert turns[3] in crop_caption.strip(".").split()
        if record["meta"]["split"] == "train" and scene_file in qa:  # a scene of two or more objects
            assert qa[scene_file]["meta"]["captions"]["image"][0].count(" and ") == 1


class _ScriptedAdapter:
    """Replies with a fixed first step per sample id, and records the second turns it is given."""

    batch_size = 4

    def __init__(self, steps: dict[str, str], answer: str):
        self.steps, self.answer, self.second_turns = steps, answer, []

    def generate(self, samples, max_new_tokens):
        if len(samples[0].messages) == 1:
            return [self.steps[s.id] for s in samples]
        self.second_turns += samples
        return [self.answer for _ in samples]


def test_the_loop_crops_the_box_the_model_wrote_not_the_reference(world):
    samples = load_samples(world / "chain_qa_train.json")[:3]
    wrong_box = (0, 0, 500, 500)
    steps = {samples[0].id: samples[0].messages[1].content,  # the reference step
             samples[1].id: grounding_step("something", wrong_box),
             samples[2].id: "no box at all"}
    answer = samples[0].messages[3].content
    adapter = _ScriptedAdapter(steps, answer)
    result = chain_scores(adapter, samples, 8)
    assert [s.id for s in adapter.second_turns] == [samples[0].id, samples[1].id]  # no box: no second turn
    for sample, turn, box in zip(samples, adapter.second_turns, (tuple(samples[0].meta["box"]), wrong_box)):
        assert [m.role for m in turn.messages] == ["user", "assistant", "user"] and turn.messages[2].content == MARKERS["image"]
        expected = crop_and_zoom(load_image(sample.media["image"][0]), box)
        assert np.array_equal(np.asarray(turn.media["image"][1]), np.asarray(expected))
    assert result["box_written"] == pytest.approx(2 / 3)
    grounded = box_iou(wrong_box, tuple(samples[1].meta["box"])) >= 0.5
    assert result["grounded"] == pytest.approx((1 + grounded) / 3)
    rows = result["predictions"]
    assert rows[0]["correct"] and rows[2]["prediction"] == "" and not rows[2]["correct"] and rows[2]["box"] is None
    with pytest.raises(ValueError, match="a chain is a question"):
        chain_scores(adapter, load_samples(world / "image_qa_train.json")[:1], 8)


def test_evaluate_task_runs_chains_zero_shot_only(world):
    adapter = _ScriptedAdapter({}, "red")
    with pytest.raises(ValueError, match="zero-shot"):
        evaluate_task(adapter, world, "chain_qa", "train", shots=2)


def test_crop_and_zoom_keeps_a_sliver_box_non_empty():
    image = Image.new("RGB", (48, 48), (10, 20, 30))
    assert crop_and_zoom(image, (500, 500, 501, 501)).size == (48, 48)
