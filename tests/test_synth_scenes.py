"""The synthetic world's visual half: shape scenes, motion videos, handwritten digits."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmfuse.data.synth import digits, scenes, video
from mmfuse.data.synth.scenes import (
    BACKGROUND_RGB,
    CELL_NAMES,
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    PATCH_SIZE,
    SHAPES,
    SIZES,
    Scene,
    Shape,
)

CELL = IMAGE_SIZE // 3
HELD_OUT = {("red", "circle"), ("blue", "square")}


def _scenes(seed: int, n: int = 500, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [scenes.sample_scene(rng, **kwargs) for _ in range(n)]


def _cell_centre(pixels: np.ndarray, cell: int) -> tuple[int, ...]:
    row, col = divmod(cell, 3)
    return tuple(int(v) for v in pixels[row * CELL + CELL // 2, col * CELL + CELL // 2])


def _colours_shown(pixels: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in rgb) for rgb in np.unique(pixels.reshape(-1, 3), axis=0)}


def _colour_pixels(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.all(pixels == COLOUR_RGB[colour], axis=-1)


# --- scenes -------------------------------------------------------------------------------------


def test_sampling_is_deterministic_per_seed():
    assert _scenes(3, 50) == _scenes(3, 50)
    assert _scenes(3, 50) != _scenes(4, 50)
    qa = lambda seed: [scenes.questions(s, random.Random(seed)) for s in _scenes(seed, 50)]  # noqa: E731
    assert qa(3) == qa(3)


def test_scenes_have_unique_cells_colours_and_shapes():
    counts = set()
    for scene in _scenes(0, 2000):
        n = len(scene.shapes)
        counts.add(n)
        assert 1 <= n <= 3
        assert len({s.cell for s in scene.shapes}) == n
        assert len({s.colour for s in scene.shapes}) == n
        assert len({s.shape for s in scene.shapes}) == n
        assert [s.cell for s in scene.shapes] == sorted(s.cell for s in scene.shapes)
    assert counts == {1, 2, 3}
    assert all(len(s.shapes) == 3 for s in _scenes(1, 50, n_shapes=3))
    with pytest.raises(ValueError, match="n_shapes"):
        scenes.sample_scene(random.Random(0), n_shapes=4)


def test_allowed_excludes_held_out_pairs():
    allowed = lambda s: (s.colour, s.shape) not in HELD_OUT  # noqa: E731
    seen = {(s.colour, s.shape) for scene in _scenes(0, 2000, allowed=allowed) for s in scene.shapes}
    assert seen == {(c, k) for c in COLOURS for k in SHAPES} - HELD_OUT
    # a filter that random draws rarely satisfy still yields exactly the one allowed shape
    only = Shape("triangle", "purple", "large", 2, 1)
    assert all(scene.shapes == [only] for scene in _scenes(0, 20, n_shapes=1, allowed=lambda s: s == only))
    with pytest.raises(ValueError, match="allowed"):
        scenes.sample_scene(random.Random(0), n_shapes=2, allowed=lambda s: s.shape == "circle")


def test_shape_rejects_unknown_values():
    with pytest.raises(ValueError, match="colour"):
        Shape("circle", "pink", "small", 0, 0)
    with pytest.raises(ValueError, match="grid"):
        Shape("circle", "red", "small", 3, 0)


def test_render_is_exact_and_cell_centres_carry_the_colour():
    for scene in _scenes(5, 200):
        image = scenes.render_scene(scene)
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(image)
        assert np.array_equal(pixels, np.asarray(scenes.render_scene(scene)))
        palette = {BACKGROUND_RGB} | {COLOUR_RGB[s.colour] for s in scene.shapes}
        assert _colours_shown(pixels) == palette  # no anti-aliasing, every shape visible
        occupied = {s.cell: s for s in scene.shapes}
        for cell in range(9):
            expected = COLOUR_RGB[occupied[cell].colour] if cell in occupied else BACKGROUND_RGB
            assert _cell_centre(pixels, cell) == expected
            row, col = divmod(cell, 3)
            block = pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
            assert np.all(block[[0, -1]] == BACKGROUND_RGB) and np.all(block[:, [0, -1]] == BACKGROUND_RGB)  # shape stays in its cell


def test_shapes_and_sizes_look_different():
    areas = {}
    for shape in SHAPES:
        for size in SIZES:
            pixels = np.asarray(scenes.render_scene(Scene([Shape(shape, "red", size, 1, 1)])))
            mask = _colour_pixels(pixels, "red")
            areas[shape, size] = int(mask.sum())
            rows = np.flatnonzero(mask.any(axis=1))
            widths = mask[rows].sum(axis=1)
            if shape == "triangle":
                assert widths[0] < widths[-1]  # points up
            if shape == "square":
                assert len(set(widths.tolist())) == 1
    assert all(areas[k, "large"] > 2 * areas[k, "small"] for k in SHAPES)
    assert len(set(areas.values())) == len(areas)


def test_patch_labels_match_rendering():
    for scene in _scenes(7, 200):
        labels = scenes.patch_labels(scene)
        grid = IMAGE_SIZE // PATCH_SIZE
        assert set(labels) == {"colour", "shape", "size"}
        blocks = np.asarray(scenes.render_scene(scene)).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4)
        by_colour = {s.colour: s for s in scene.shapes}
        for name, values in labels.items():
            assert values.shape == (grid, grid) and values.dtype == np.int64
        for r in range(grid):
            for c in range(grid):
                colours = _colours_shown(blocks[r, c]) - {BACKGROUND_RGB}
                if not colours:
                    assert labels["colour"][r, c] == labels["shape"][r, c] == labels["size"][r, c] == 0
                    continue
                (rgb,) = colours  # a patch lies inside one cell, so it shows at most one object
                colour = next(k for k, v in COLOUR_RGB.items() if v == rgb)
                shape = by_colour[colour]
                assert labels["colour"][r, c] == 1 + COLOURS.index(colour)
                assert labels["shape"][r, c] == 1 + SHAPES.index(shape.shape)
                assert labels["size"][r, c] == 1 + SIZES.index(shape.size)
                assert (r * PATCH_SIZE) // CELL == shape.row and (c * PATCH_SIZE) // CELL == shape.col
    with pytest.raises(ValueError, match="multiple"):
        scenes.patch_labels(Scene([]), size=50)


def test_caption():
    two = Scene([Shape("circle", "red", "large", 0, 0), Shape("square", "blue", "small", 1, 1)])
    assert scenes.caption(two) == "a large red circle at the top left and a small blue square in the middle."
    three = Scene([
        Shape("triangle", "green", "small", 0, 2), Shape("circle", "yellow", "large", 1, 0), Shape("square", "purple", "small", 2, 1)
    ])
    assert scenes.caption(three) == (
        "a small green triangle at the top right, a large yellow circle on the left and a small purple square at the bottom."
    )


def test_question_answers_agree_with_the_rendered_image():
    yes = 0
    all_scenes = _scenes(11, 400)
    rng = random.Random(0)
    for scene in all_scenes:
        pixels = np.asarray(scenes.render_scene(scene))
        qa = scenes.questions(scene, rng)
        assert [kind for kind, _, _ in qa] == ["colour", "shape", "count", "position", "yesno", "size"]
        assert all(a == a.lower() and not a.endswith(".") for _, _, a in qa)
        answers = {kind: (q, a) for kind, q, a in qa}
        labels = scenes.patch_labels(scene)

        q, a = answers["colour"]
        shape = q.removeprefix("What colour is the ").removesuffix("?")
        shape_patches = labels["shape"] == 1 + SHAPES.index(shape)
        assert shape_patches.any() and np.all(labels["colour"][shape_patches] == 1 + COLOURS.index(a))

        q, a = answers["shape"]
        colour = q.removeprefix("What shape is the ").removesuffix(" object?")
        colour_patches = labels["colour"] == 1 + COLOURS.index(colour)
        assert colour_patches.any() and np.all(labels["shape"][colour_patches] == 1 + SHAPES.index(a))

        q, a = answers["count"]
        shown = _colours_shown(pixels) - {BACKGROUND_RGB}
        assert a == ("one", "two", "three")[len(shown) - 1]

        q, a = answers["position"]
        colour, shape = q.removeprefix("Where is the ").removesuffix("?").split()
        assert _cell_centre(pixels, CELL_NAMES.index(a)) == COLOUR_RGB[colour]

        q, a = answers["yesno"]
        colour, shape = q.removeprefix("Is there a ").removesuffix("?").split()
        present = (colour, shape) in {(s.colour, s.shape) for s in scene.shapes}
        assert a == ("yes" if present else "no")
        yes += a == "yes"

        q, a = answers["size"]
        colour, shape = q.removeprefix("Is the ").removesuffix(" small or large?").split()
        area = _colour_pixels(pixels, colour).sum()
        assert a == ("large" if area > 80 else "small")  # small shapes cover <= 64 pixels, large >= 98
    assert 0.4 < yes / len(all_scenes) < 0.6


def test_no_questions_avoid_held_out_pairs_when_asked():
    allowed = lambda s: (s.colour, s.shape) not in HELD_OUT  # noqa: E731
    rng = random.Random(0)
    asked = set()
    for scene in _scenes(2, 1000, allowed=allowed):
        (_, q, a), = [x for x in scenes.questions(scene, rng, allowed=allowed) if x[0] == "yesno"]
        asked.add(tuple(q.removeprefix("Is there a ").removesuffix("?").split()))
    assert not asked & HELD_OUT and len(asked) == 15 - len(HELD_OUT)


# --- video --------------------------------------------------------------------------------------


def _centroid(frame) -> np.ndarray:
    ys, xs = np.nonzero(np.any(np.asarray(frame) != BACKGROUND_RGB, axis=-1))
    return np.array([xs.mean(), ys.mean()])


def test_motions_are_deterministic_and_filtered():
    sample = lambda seed, **kw: [video.sample_motion(random.Random(seed), **kw) for _ in range(5)]  # noqa: E731
    assert sample(1) == sample(1)
    rng = random.Random(0)
    allowed = lambda m: (m.colour, m.shape) not in HELD_OUT  # noqa: E731
    motions = [video.sample_motion(rng, allowed=allowed) for _ in range(1000)]
    assert not {(m.colour, m.shape) for m in motions} & HELD_OUT
    assert {m.direction for m in motions} == set(video.DIRECTIONS) and {m.speed for m in motions} == set(video.SPEEDS)
    with pytest.raises(ValueError, match="leaves the frame"):
        video.Motion("circle", "red", "left", "fast", 10, 24)


def test_video_moves_the_right_way_at_the_right_speed_inside_the_frame():
    rng = random.Random(4)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    travelled = {"slow": [], "fast": []}
    for _ in range(200):
        motion = video.sample_motion(rng)
        frames = video.render_video(motion, frames=8)
        assert len(frames) == 8 and all(f.size == (IMAGE_SIZE, IMAGE_SIZE) and f.mode == "RGB" for f in frames)
        for f in frames:
            pixels = np.asarray(f)
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            assert np.all(border == BACKGROUND_RGB)  # fully inside
            assert _colour_pixels(pixels, motion.colour).sum() > 50
        shift = _centroid(frames[-1]) - _centroid(frames[0])
        assert np.dot(shift, step[motion.direction]) > 0.9 * np.linalg.norm(shift)
        travelled[motion.speed].append(np.linalg.norm(shift))
    assert np.mean(travelled["fast"]) == pytest.approx(2 * np.mean(travelled["slow"]), rel=0.1)


def test_gif_round_trip_keeps_frames_and_colours(tmp_path):
    rng = random.Random(9)
    for i in range(10):
        frames = video.render_video(video.sample_motion(rng), frames=6)
        path = tmp_path / f"clip{i}.gif"
        video.save_gif(frames, path)
        back = video.load_gif(path)
        assert len(back) == len(frames)
        assert all(b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, back))


def test_video_patch_labels_match_frames():
    motion = video.Motion("triangle", "yellow", "right", "fast", 8, 20)
    frames = video.render_video(motion, frames=5)
    labels = video.patch_labels(motion, frames=5)
    grid = IMAGE_SIZE // PATCH_SIZE
    assert labels["colour"].shape == labels["shape"].shape == (5, grid, grid)
    for frame, colour, shape in zip(frames, labels["colour"], labels["shape"]):
        touched = _colour_pixels(np.asarray(frame), "yellow").reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).any(axis=(1, 3))
        assert np.array_equal(colour, np.where(touched, 1 + COLOURS.index("yellow"), 0))
        assert np.array_equal(shape, np.where(touched, 1 + SHAPES.index("triangle"), 0))


def test_video_caption_and_questions():
    motion = video.Motion("circle", "red", "left", "slow", 40, 24)
    assert video.caption(motion) == "a red circle moves left slowly."
    qa = video.questions(motion, random.Random(0))
    assert [(k, a) for k, _, a in qa] == [("direction", "left"), ("speed", "slowly"), ("colour", "red"), ("shape", "circle")]
    fast = video.Motion("square", "blue", "up", "fast", 10, 40)
    assert video.caption(fast) == "a blue square moves up fast."
    assert dict((k, a) for k, _, a in video.questions(fast, random.Random(0)))["speed"] == "fast"


# --- digits -------------------------------------------------------------------------------------


def test_digits_load_as_images():
    images, labels = digits.load_digit_images()
    assert len(images) == len(labels) == 1797
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    pixels = np.asarray(images[0])
    assert images[0].mode == "RGB" and pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert tuple(pixels[0, 0]) == BACKGROUND_RGB and pixels.min() < 100  # dark ink on the scenes' grey
    assert digits.caption(7) == "a handwritten seven."
    assert digits.questions(labels[3]) == [("digit", "What digit is this?", digits.DIGIT_WORDS[labels[3]])]
    with pytest.raises(ValueError):
        digits.caption(10)
