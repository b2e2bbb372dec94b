"""The built-in world's pretrained backbones, built on first use and cached.

``world:llm``, ``world:vision`` and ``world:audio`` name a small Llama, ViT and Whisper encoder trained
from scratch on the synthetic world (seeded, no download), ``world:acoustic`` a small WavLM on the raw
waveform (WavLLM's second, acoustic encoder); ``world:image_codec`` (grid codes),
``world:query_image_codec`` (SEED's causal learned-query codes), ``world:unified_image_codec``
(UniCode's: its frozen codebook is ``world:llm``'s embeddings of a block of text ids), ``world:audio_codec`` and
``world:semantic_audio`` the Type-D codecs of :mod:`mmfuse.codecs`. :func:`resolve` maps such a
name to its cached directory under :func:`cache_dir`, building it the first time; any other name is
returned unchanged. A build is written to a temporary directory and renamed into place, so an
interrupted build never leaves a half backbone behind. The vision and audio encoders and the codecs
see only non-held-out attribute combinations (:mod:`mmfuse.data.synth.heldout`).

Environment variables:

* ``MMFUSE_CACHE``: cache root (default ``~/.cache/mmfuse``); backbones live in ``<root>/world/v<N>/``.
* ``MMFUSE_WORLD_STEPS_SCALE``: multiplies every builder's default training steps (e.g. ``0.02``
  for fast tests). A scale other than 1 builds into its own directory (``llm-steps0.02``), so a
  quick, weak backbone never shadows the full one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..codecs import pretrain_audio_codec, pretrain_image_codec, pretrain_semantic_audio
from ..codecs.image import DEFAULT_STEPS as DEFAULT_IMAGE_CODEC_STEPS
from ..data.synth.heldout import event_allowed, shape_allowed
from ..fusion.tokens import shared_code_start
from .world_acoustic import pretrain_acoustic_encoder
from .world_audio import pretrain_audio_encoder
from .world_llm import pretrain_llm
from .world_vision import pretrain_vision_encoder

PREFIX = "world:"
SEED = 0
QUERY_CODES = 16  # world:query_image_codec's codes per image (SEED: 32 per 224 px image)
UNIFIED_CODES = 512  # world:unified_image_codec's codebook: text ids of world:llm (610 rows, 7 special)
WORLD_VERSION = 1  # bump when the world or a builder changes, so stale caches are not reused


def pretrain_unified_image_codec(out_dir: str | Path, *, seed: int = 0, steps: int = DEFAULT_IMAGE_CODEC_STEPS,
                                 progress: Callable[[int, int, dict], None] | None = None) -> Path:
    """UniCode's image tokenizer at world scale (builds ``world:llm`` first): a SimVQ image codec whose
    frozen codebook is ``world:llm``'s input embeddings of the :data:`UNIFIED_CODES` text ids from
    :func:`~mmfuse.fusion.tokens.shared_code_start` (under one learned linear map), so each image code is
    a word the LLM already has."""
    llm_dir = build("llm")
    rows = AutoModelForCausalLM.from_pretrained(llm_dir).get_input_embeddings().weight.detach()
    start = shared_code_start(rows.shape[0], AutoTokenizer.from_pretrained(llm_dir).all_special_ids, UNIFIED_CODES)
    settings = {"quantizer": "simvq", "codebook_size": UNIFIED_CODES, "codebook_dim": rows.shape[1], "text_ids_start": start}
    return pretrain_image_codec(out_dir, seed=seed, steps=steps, codec_settings=settings, codebook=rows[start:start + UNIFIED_CODES],
                                allowed=shape_allowed, progress=progress)


WORLD_BACKBONES = {
    "llm": pretrain_llm,
    "vision": functools.partial(pretrain_vision_encoder, allowed=shape_allowed),
    "audio": functools.partial(pretrain_audio_encoder, allowed=event_allowed),
    "acoustic": functools.partial(pretrain_acoustic_encoder, allowed=event_allowed),
    "image_codec": functools.partial(pretrain_image_codec, allowed=shape_allowed),
    # the query bottleneck learns slower than the grid: 1200 steps left shapes 84% recognisable
    "query_image_codec": functools.partial(pretrain_image_codec, allowed=shape_allowed, steps=3000,
                                           codec_settings={"num_queries": QUERY_CODES}),
    "unified_image_codec": pretrain_unified_image_codec,
    "audio_codec": functools.partial(pretrain_audio_codec, allowed=event_allowed),
    "semantic_audio": functools.partial(pretrain_semantic_audio, allowed=event_allowed),  # builds world:audio first
}


def cache_dir() -> Path:
    """``$MMFUSE_CACHE`` or ``~/.cache/mmfuse``."""
    return Path(os.environ.get("MMFUSE_CACHE", "~/.cache/mmfuse")).expanduser()


def steps_scale() -> float:
    """``$MMFUSE_WORLD_STEPS_SCALE`` (default 1.0)."""
    raw = os.environ.get("MMFUSE_WORLD_STEPS_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"MMFUSE_WORLD_STEPS_SCALE must be a positive number, got {raw!r}") from None
    if not scale > 0:
        raise ValueError(f"MMFUSE_WORLD_STEPS_SCALE must be a positive number, got {raw!r}")
    return scale


def _builder(name: str):
    if name not in WORLD_BACKBONES:
        raise ValueError(f"unknown world backbone {PREFIX}{name}; expected one of {[PREFIX + n for n in WORLD_BACKBONES]}")
    return WORLD_BACKBONES[name]


def scaled_leaf(name: str) -> str:
    """``name``, or ``name-steps<scale>`` under a steps scale other than 1, so a quick, weak build
    never shadows the full one."""
    scale = steps_scale()
    return name if scale == 1 else f"{name}-steps{scale:g}"


def backbone_dir(name: str) -> Path:
    """Where ``world:<name>`` is (or will be) cached under the current steps scale."""
    _builder(name)
    return cache_dir() / "world" / f"v{WORLD_VERSION}" / scaled_leaf(name)


def _steps(name: str) -> int:
    default = inspect.signature(_builder(name)).parameters["steps"].default
    return max(1, round(default * steps_scale()))


@contextlib.contextmanager
def build_progress(label: str) -> Iterator[Callable[[int, int, dict], None]]:
    """A progress bar on stderr for a build; yields the ``progress(step, steps, metrics)`` callback
    the builders call after every step."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=None)

        def progress(step: int, steps: int, metrics: dict) -> None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            bar.update(task, completed=step, total=steps, description=f"{label}  {shown}")

        yield progress


def build(name: str, force: bool = False) -> Path:
    """Return ``world:<name>``'s cached directory, building it (again, with ``force``) when needed."""
    builder, target = _builder(name), backbone_dir(name)
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with build_progress(f"{PREFIX}{name}") as progress:
            with torch.random.fork_rng(devices=[]):  # a first-use build must not change the caller's RNG
                builder(tmp, seed=SEED, steps=_steps(name), progress=progress)
        if target.is_dir():
            if not force:  # another process finished first; keep its build
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "backbone")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_all(force: bool = False) -> dict[str, Path]:
    """Build (or find) every world backbone; returns name -> directory."""
    return {name: build(name, force=force) for name in WORLD_BACKBONES}


def resolve(name_or_path: str) -> str:
    """``"world:<name>"`` -> its cached directory (built on first use); anything else unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    return str(build(name_or_path[len(PREFIX):]))
