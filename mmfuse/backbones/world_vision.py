"""A small ViT image encoder pretrained on the synthetic world's shape scenes and video frames.

Pretraining is dense supervision: linear heads on the last hidden state predict every patch's
colour, shape and size (as ``scenes.patch_labels`` / ``video.patch_labels``) and the CLS token
predicts the object count, on freshly sampled scenes plus a share of single video frames, whose
shapes sit off the 3x3 grid (an encoder trained on scenes alone does not recognise those), with a
colour / shape augmentation for held-out pairs (see ``RECOLOUR_PROB``). The heads are
discarded: the saved directory holds only the ``ViTModel`` (safetensors) and its image processor,
so ``AutoModel`` / ``AutoImageProcessor.from_pretrained`` load it offline.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

from mmfuse.backbones.loading import progress_bars_off
from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.data.synth import video
from mmfuse.data.synth.scenes import (
    BACKGROUND_RGB, COLOUR_RGB, COLOURS, GRID, IMAGE_SIZE, PATCH_SIZE, SHAPES, SIZES,
    Scene, Shape, geometry, labels_by_patch, sample_scene, shape_mask,
)

# per-channel statistics of rendered scenes (mostly light grey background)
IMAGE_MEAN = (0.85, 0.84, 0.84)
IMAGE_STD = (0.14, 0.15, 0.16)
DEFAULT_STEPS = 600
VIDEO_FRACTION = 0.3  # share of each batch that is a single frame of a motion video
EVAL_EXAMPLES = 512
# Augmentation for compositional generalisation. A training object is repainted, with RECOLOUR_PROB,
# in a random colour at least OFF_PALETTE_DISTANCE (RGB) from every world colour, and its colour target
# is ignored; it is redrawn, with RESHAPE_PROB, as an off-catalogue shape, and its shape target is
# ignored. Seeing shapes in many colours and colours on many shapes makes the two features independent,
# so held-out (colour, shape) pairs are recognised although no image shows one in world colours.
RECOLOUR_PROB = 0.6
RESHAPE_PROB = 0.3
OFF_PALETTE_DISTANCE = 80.0
EXTRA_SHAPES = {  # boolean masks from pixel offsets (dx, dy) to the centre and the radius r
    "diamond": lambda dx, dy, r: np.abs(dx) + np.abs(dy) <= r,
    "cross": lambda dx, dy, r: (np.maximum(np.abs(dx), np.abs(dy)) <= r) & (np.minimum(np.abs(dx), np.abs(dy)) <= r / 3),
    "ring": lambda dx, dy, r: (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (r / 2) ** 2),
}
_TARGETS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1}  # classes incl. background


def vision_config() -> ViTConfig:
    """48x48 images, 8x8 patches: 36 patch tokens + CLS, width 128, 4 layers."""
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def image_processor() -> ViTImageProcessorPil:
    """Rescale to [0, 1] and normalise with the scenes' statistics; resizes other sizes to 48x48."""
    return ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)
    )


class _DenseHeads(nn.Module):
    """Per-patch colour/shape/size classifiers and a CLS count classifier (1-3 objects)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.patch = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in _TARGETS.items()})
        self.count = nn.Linear(hidden, GRID)

    def forward(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1 + P, D) -> logits: patch targets (B, P, C), ``"count"`` (B, 3)."""
        patches = hidden_states[:, 1:]
        logits = {name: head(patches) for name, head in self.patch.items()}
        logits["count"] = self.count(hidden_states[:, 0])
        return logits


@dataclass
class _Drawn:
    """One object to paint: what it looks like (pixels of the 48x48 image) and its targets (-100 ignored)."""

    shape: str  # a SHAPES or EXTRA_SHAPES name
    rgb: tuple[int, int, int]
    x: float
    y: float
    radius: float
    colour: int
    shape_class: int
    size: int


def _scene_objects(scene: Scene) -> list[_Drawn]:
    """The scene's shapes, drawn exactly as ``scenes.render_scene`` and labelled as ``scenes.patch_labels``."""
    return [
        _Drawn(s.shape, COLOUR_RGB[s.colour], *geometry(s), *_classes(s.colour, s.shape), 1 + SIZES.index(s.size))
        for s in scene.shapes
    ]


def _motion_objects(motion: video.Motion, t: float) -> list[_Drawn]:
    """The moving shape at clip time ``t`` in [0, 1]; it has no size class."""
    x, y = motion.centre(t)
    return [_Drawn(motion.shape, COLOUR_RGB[motion.colour], x, y, video.RADIUS, *_classes(motion.colour, motion.shape), -100)]


def _classes(colour: str, shape: str) -> tuple[int, int]:
    return 1 + COLOURS.index(colour), 1 + SHAPES.index(shape)


def _off_palette_rgb(rng: random.Random) -> tuple[int, int, int]:
    """A random colour far from the background and every world colour."""
    taken = np.array([BACKGROUND_RGB, *COLOUR_RGB.values()], dtype=np.float64)
    while True:
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if np.linalg.norm(taken - rgb, axis=1).min() >= OFF_PALETTE_DISTANCE:
            return rgb


def _augment(rng: random.Random, objects: list[_Drawn]) -> list[_Drawn]:
    """Repaint / redraw objects off-palette / off-catalogue, ignoring the replaced targets."""
    out = []
    for o in objects:
        if rng.random() < RECOLOUR_PROB:
            o = dataclasses.replace(o, rgb=_off_palette_rgb(rng), colour=-100)
        if rng.random() < RESHAPE_PROB:
            o = dataclasses.replace(o, shape=rng.choice(sorted(EXTRA_SHAPES)), shape_class=-100)
        out.append(o)
    return out


def _mask(o: _Drawn) -> np.ndarray:
    """Boolean (48, 48) mask of a drawn object."""
    if o.shape in EXTRA_SHAPES:
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        return EXTRA_SHAPES[o.shape](xs - o.x, ys - o.y, o.radius)
    return shape_mask(o.shape, o.x, o.y, o.radius, IMAGE_SIZE)


def _paint(objects: list[_Drawn]) -> tuple[np.ndarray, dict]:
    """uint8 (48, 48, 3) image and targets: per-patch (6, 6) colour/shape/size, count = objects - 1."""
    owner = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
    for i, o in enumerate(objects):
        owner[_mask(o)] = i + 1
    palette = np.array([BACKGROUND_RGB] + [o.rgb for o in objects], dtype=np.uint8)
    classes = {"colour": [o.colour for o in objects], "shape": [o.shape_class for o in objects], "size": [o.size for o in objects]}
    return palette[owner], {**labels_by_patch(owner, classes), "count": len(objects) - 1}


def _examples(
    rng: random.Random, n: int, allowed: Callable[[Shape], bool] | None, *, video_fraction: float = 0.0,
    augment: bool = False, n_shapes: int | None = None,
) -> tuple[list[np.ndarray], list[dict]]:
    """``n`` fresh images (scenes, and a ``video_fraction`` share of single video frames at random
    times) with their targets; ``augment`` applies the recolour / reshape augmentation."""
    n_frames = round(n * video_fraction)
    drawn = [_scene_objects(sample_scene(rng, n_shapes=n_shapes, allowed=allowed)) for _ in range(n - n_frames)]
    drawn += [_motion_objects(video.sample_motion(rng, allowed=allowed), rng.random()) for _ in range(n_frames)]
    painted = [_paint(_augment(rng, objects) if augment else objects) for objects in drawn]
    return [image for image, _ in painted], [targets for _, targets in painted]


def _tensors(images: list[np.ndarray], targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (B, 3, 48, 48), exactly as ``image_processor()`` makes them, and int64 targets:
    (B, 36) per patch for colour/shape/size, ``"count"`` (B,) = number of objects - 1."""
    pixels = np.stack(images).astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    out = {name: torch.from_numpy(np.stack([t[name].reshape(-1) for t in targets])) for name in _TARGETS}
    out["count"] = torch.tensor([t["count"] for t in targets])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), out


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name].flatten(0, -2), targets[name].flatten()) for name in logits)


@torch.no_grad()
def _accuracy(model: ViTModel, heads: _DenseHeads, images: list[np.ndarray], targets: list[dict]) -> dict[str, float]:
    """Per-patch accuracy on all patches and on object patches only, and count accuracy."""
    pixels, target = _tensors(images, targets)
    logits = heads(model(pixel_values=pixels).last_hidden_state)
    out = {}
    foreground = target["colour"] != 0  # an object patch (ignored colours are -100, background 0)
    for name in _TARGETS:
        correct = logits[name].argmax(-1) == target[name]
        labelled = target[name] >= 0
        if (labelled & foreground).any():  # video frames have no size targets
            out[f"patch_{name}"] = correct[labelled].float().mean().item()
            out[f"object_patch_{name}"] = correct[labelled & foreground].float().mean().item()
    out["count"] = (logits["count"].argmax(-1) == target["count"]).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def pretrain_vision_encoder(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 3e-3,
    allowed: Callable[[Shape], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Pretrain the world's ViT on fresh scenes and video frames whose shapes pass ``allowed``
    (called with a ``Shape`` or a ``video.Motion``: read only ``.colour`` and ``.shape``) and save it.

    Deterministic for a given seed and thread count. Writes ``model.safetensors``, ``config.json``,
    ``preprocessor_config.json`` and ``pretrain_metrics.json``: accuracy on ``EVAL_EXAMPLES`` fresh
    allowed scenes and as many video frames, and on one-shape scenes of held-out shapes when
    ``allowed`` rejects any.
    ``progress(step, steps, {"loss": float, "lr": float})`` is called after every step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = ViTModel(vision_config())  # keeps the (unused) pooler so AutoModel loads it without missing keys
    heads = _DenseHeads(model.config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    model.train()
    for step in range(1, steps + 1):
        images, targets = _examples(rng, batch_size, allowed, video_fraction=VIDEO_FRACTION, augment=True)
        pixels, targets = _tensors(images, targets)
        loss = _loss(heads(model(pixel_values=pixels).last_hidden_state), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        schedule.step()
    train_seconds = time.perf_counter() - start

    model.eval()
    eval_rng = random.Random(f"world_vision-eval-{seed}")
    metrics = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(train_seconds, 1),
        "eval_examples": EVAL_EXAMPLES,
        "eval_scenes": _accuracy(model, heads, *_examples(eval_rng, EVAL_EXAMPLES, allowed)),
        "eval_video_frames": _accuracy(model, heads, *_examples(eval_rng, EVAL_EXAMPLES, allowed, video_fraction=1.0)),
    }
    every_shape = [Shape(*spec) for spec in itertools.product(SHAPES, COLOURS, SIZES, range(GRID), range(GRID))]
    if allowed is not None and not all(allowed(s) for s in every_shape):
        held_out = lambda s: not allowed(s)  # noqa: E731
        metrics["eval_held_out_scenes"] = _accuracy(model, heads, *_examples(eval_rng, EVAL_EXAMPLES, held_out, n_shapes=1))

    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bars_off():
        model.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir
