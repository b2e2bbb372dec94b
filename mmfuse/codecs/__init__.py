"""Type-D modality tokenizers ("codecs"): media to discrete codes that extend an LLM's vocabulary, and back.

Kinds (``settings["kind"]``): ``image`` (:class:`ImageCodec`, VQ / FSQ autoencoder), ``audio``
(:class:`AudioCodec`, residual-VQ spectrogram codec), ``semantic_audio`` (:class:`SemanticAudioCodec`,
k-means over a Whisper encoder, AudioPaLM-style) and the transformers wrappers ``chameleon``
(encode only), ``encodec``, ``mimi``, ``dac``.

A saved codec directory holds ``codec.json`` (the settings), ``model.safetensors`` and the processor's
files; :func:`load_codec` also takes ``world:<name>`` (``image_codec``, ``query_image_codec``, ``audio_codec``,
``semantic_audio``, built on first use) and transformers checkpoints (hub id or path).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model
from transformers import AutoConfig

from mmfuse.codecs.audio import AudioCodec, pretrain_audio_codec
from mmfuse.codecs.base import MediaCodec
from mmfuse.codecs.image import ImageCodec, pretrain_image_codec
from mmfuse.codecs.pretrained import PRETRAINED_BY_MODEL_TYPE, ChameleonCodec, DacCodec, EncodecCodec, MimiCodec
from mmfuse.codecs.semantic import SemanticAudioCodec, pretrain_semantic_audio
from mmfuse.safe_loading import require_safetensors

SETTINGS_NAME = "codec.json"
WEIGHTS_NAME = "model.safetensors"
CODECS: dict[str, type[MediaCodec]] = {
    "image": ImageCodec,
    "audio": AudioCodec,
    "semantic_audio": SemanticAudioCodec,
    "chameleon": ChameleonCodec,
    "encodec": EncodecCodec,
    "mimi": MimiCodec,
    "dac": DacCodec,
}


def build_codec(settings: dict) -> MediaCodec:
    """The codec of ``settings`` (``{"kind": ..., **arguments}``, as :meth:`MediaCodec.settings` returns)
    with untrained weights, in eval mode."""
    if "kind" not in settings:
        raise ValueError(f"codec settings need a 'kind' (one of {sorted(CODECS)}); got keys {sorted(settings)}")
    arguments = dict(settings)
    kind = arguments.pop("kind")
    if kind not in CODECS:
        raise ValueError(f"unknown codec kind {kind!r}; expected one of {sorted(CODECS)}")
    return CODECS[kind](**arguments).eval()


def save_codec(codec: MediaCodec, directory: str | Path) -> Path:
    """Write ``codec.json``, ``model.safetensors`` and the processor's files to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS_NAME).write_text(json.dumps(codec.settings(), indent=2) + "\n")
    save_model(codec, str(directory / WEIGHTS_NAME))
    codec.processor().save_pretrained(str(directory))
    return directory


def load_codec(name_or_path: str | Path) -> MediaCodec:
    """A codec in eval mode from ``world:<name>``, a :func:`save_codec` directory, or a transformers
    codec checkpoint (hub id or path; its config's ``model_type`` picks the wrapper). Safetensors only:
    pickle-based weights are refused (:class:`~mmfuse.safe_loading.UnsafeCheckpoint`)."""
    from mmfuse.backbones.loading import resolve_path, saved_processor

    path = resolve_path(str(name_or_path))
    require_safetensors(path, WEIGHTS_NAME if (Path(path) / SETTINGS_NAME).is_file() else "*.safetensors")
    if (Path(path) / SETTINGS_NAME).is_file():
        codec = build_codec(json.loads((Path(path) / SETTINGS_NAME).read_text()))
        load_model(codec, str(Path(path) / WEIGHTS_NAME), strict=True)
        codec._processor = saved_processor(codec.modality, path)
        return codec.eval()
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in PRETRAINED_BY_MODEL_TYPE:
        raise ValueError(
            f"{name_or_path}: neither a saved codec (no {SETTINGS_NAME}) nor a supported transformers codec "
            f"(model_type {model_type!r}; supported: {sorted(PRETRAINED_BY_MODEL_TYPE)})"
        )
    return PRETRAINED_BY_MODEL_TYPE[model_type].from_pretrained(path).eval()


__all__ = [
    "CODECS",
    "AudioCodec",
    "ChameleonCodec",
    "DacCodec",
    "EncodecCodec",
    "ImageCodec",
    "MediaCodec",
    "MimiCodec",
    "SemanticAudioCodec",
    "build_codec",
    "load_codec",
    "pretrain_audio_codec",
    "pretrain_image_codec",
    "pretrain_semantic_audio",
    "save_codec",
]
