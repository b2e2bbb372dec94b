"""The world's small pretrained ViT: saving, offline reloading, determinism, quality."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from mmfuse.backbones import world_vision
from mmfuse.data.synth import scenes, video


@pytest.fixture
def small_eval(monkeypatch):
    """Tiny evaluation, offline, one thread: on a 2-core machine shared with other jobs, two torch
    threads can run these tiny steps many times slower than one."""
    monkeypatch.setattr(world_vision, "EVAL_EXAMPLES", 16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vision_config():
    config = world_vision.vision_config()
    assert (config.image_size, config.patch_size, config.hidden_size) == (48, 8, 128)
    assert config.num_hidden_layers == 4 and config.num_attention_heads == 4


def test_short_pretraining_saves_a_reloadable_encoder(tmp_path, small_eval):
    calls = []
    out = world_vision.pretrain_vision_encoder(
        tmp_path / "vit", steps=20, batch_size=8, progress=lambda step, total, logs: calls.append((step, total, logs))
    )
    assert out == tmp_path / "vit"
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "preprocessor_config.json", "pretrain_metrics.json"}
    assert [(s, t) for s, t, _ in calls] == [(i, 20) for i in range(1, 21)]
    assert all(math.isfinite(logs["loss"]) for _, _, logs in calls)
    assert calls[-1][2]["loss"] < calls[0][2]["loss"]

    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["steps"] == 20
    for key in ("patch_colour", "patch_shape", "patch_size", "object_patch_colour", "count"):
        assert 0.0 <= metrics["eval_scenes"][key] <= 1.0
    assert "patch_size" not in metrics["eval_video_frames"]  # frames carry no size label
    assert "eval_held_out_scenes" not in metrics

    model, loading = AutoModel.from_pretrained(out, local_files_only=True, output_loading_info=True)
    # every weight was saved (the unused pooler too), so loading initialises nothing at random
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    processor = AutoImageProcessor.from_pretrained(out, local_files_only=True)
    scene = scenes.sample_scene(random.Random(0))
    pixel_values = processor(scenes.render_scene(scene), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape == (1, 37, 128)
    # the processor reproduces the pretraining input exactly
    expected, _ = world_vision._tensors([scenes.render_array(scene)], [{**scenes.patch_labels(scene), "count": 0}])
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)


def test_pretraining_is_deterministic_per_seed(tmp_path, small_eval):
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = world_vision.pretrain_vision_encoder(tmp_path / name, seed=seed, steps=3, batch_size=4)
        return load_file(out / "model.safetensors")

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_held_out_pairs_are_reported_separately(tmp_path, small_eval):
    held_out = {("red", "circle")}
    allowed = lambda s: (s.colour, s.shape) not in held_out  # noqa: E731
    out = world_vision.pretrain_vision_encoder(tmp_path / "vit", steps=2, batch_size=4, allowed=allowed)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert "eval_held_out_scenes" in metrics


def test_training_images_match_the_world_and_augmentation_hides_held_out_pairs():
    rng = random.Random(0)
    for _ in range(50):
        scene = scenes.sample_scene(rng)
        image, targets = world_vision._paint(world_vision._scene_objects(scene))
        assert np.array_equal(image, scenes.render_array(scene))
        assert all(np.array_equal(targets[k], v) for k, v in scenes.patch_labels(scene).items())
        assert targets["count"] == len(scene.shapes) - 1
    motion = video.sample_motion(rng)
    frames, labels = video.render_video(motion, frames=8), video.patch_labels(motion, frames=8)
    for k in (0, 3, 7):
        image, targets = world_vision._paint(world_vision._motion_objects(motion, k / 7))
        assert np.array_equal(image, np.asarray(frames[k]))
        assert np.array_equal(targets["colour"], labels["colour"][k]) and np.array_equal(targets["shape"], labels["shape"][k])

    held_out = {("red", "circle")}
    allowed = lambda s: (s.colour, s.shape) not in held_out  # noqa: E731
    palette = np.array(list(scenes.COLOUR_RGB.values()))
    shown, recoloured, reshaped = set(), 0, 0
    for _ in range(300):
        for o in world_vision._augment(rng, world_vision._scene_objects(scenes.sample_scene(rng, allowed=allowed))):
            in_palette = np.linalg.norm(palette - o.rgb, axis=1).min() < world_vision.OFF_PALETTE_DISTANCE
            assert in_palette == (o.colour != -100)
            assert (o.shape in scenes.SHAPES) == (o.shape_class != -100)
            recoloured += not in_palette
            reshaped += o.shape not in scenes.SHAPES
            if in_palette and o.shape in scenes.SHAPES:
                shown.add((scenes.COLOURS[o.colour - 1], o.shape))
    assert not shown & held_out and recoloured > 100 and reshaped > 50


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        world_vision.pretrain_vision_encoder(tmp_path, steps=0)


@pytest.mark.full
def test_default_pretraining_reaches_target_accuracy(tmp_path):
    out = world_vision.pretrain_vision_encoder(tmp_path / "vit")
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    for key in ("patch_colour", "patch_shape", "object_patch_colour", "object_patch_shape"):
        assert metrics["eval_scenes"][key] >= 0.97, metrics
    assert np.isfinite(metrics["train_seconds"])
