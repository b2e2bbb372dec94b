"""Load Hugging Face backbones from a hub id, a local directory, ``world:<name>`` or a config dict.

Nothing here re-implements a model: the LLM comes from ``AutoModelForCausalLM`` and encoders from
``AutoModel``. A config dict (``{"model_type": "llama", ...}``) builds the architecture with random
weights, which is what tests and saved checkpoints use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..config import TEXT_PROMPT, EncoderConfig, LLMConfig
from ..safe_loading import UnsafeCheckpoint, require_safetensors


def resolve_path(name_or_path: str) -> str:
    """Map ``world:<name>`` to the cached built-in backbone (building it on first use)."""
    if name_or_path.startswith("world:"):
        from .world import resolve

        return resolve(name_or_path)
    return name_or_path


def hf_config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """Rebuild a transformers config from ``config.to_dict()`` output (or a hand-written dict)."""
    if "model_type" not in data:
        raise ValueError(f"hf_config needs a 'model_type' key (e.g. 'llama'); got keys {sorted(data)[:8]}")
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"hf_config: transformers {transformers.__version__} does not know model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(data)


def from_pretrained_safetensors(auto_class, name_or_path: str, **kwargs) -> transformers.PreTrainedModel:
    """``auto_class.from_pretrained`` reading safetensors only: a local directory with pickle-based
    weights, or a checkpoint without safetensors, raises :class:`UnsafeCheckpoint` naming the path."""
    path = resolve_path(name_or_path)
    require_safetensors(path)
    try:
        return auto_class.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise UnsafeCheckpoint(f"{path}: no safetensors weights ({err}); mmfuse loads weights from safetensors only, "
                               "because unpickling runs arbitrary code") from err


def _dtype(name: str) -> torch.dtype:
    try:
        return getattr(torch, name)
    except AttributeError as err:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from err


def load_llm(cfg: LLMConfig) -> transformers.PreTrainedModel:
    """The causal LM named by ``cfg``, pretrained weights when a path is given."""
    dtype = _dtype(cfg.dtype)
    if cfg.hf_config is not None:
        return AutoModelForCausalLM.from_config(hf_config_from_dict(cfg.hf_config), dtype=dtype)
    if cfg.name_or_path is None:
        raise ValueError("llm: give either name_or_path or hf_config")
    return from_pretrained_safetensors(AutoModelForCausalLM, cfg.name_or_path, dtype=dtype)


def load_tokenizer(cfg: LLMConfig, fallback: str | None = None):
    """The LLM's tokenizer; ``fallback`` is a directory that holds one (a saved checkpoint)."""
    source = fallback or cfg.tokenizer or cfg.name_or_path
    if source is None:
        raise ValueError("llm: no tokenizer; set llm.tokenizer to a hub id or directory")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_tokens(llm: transformers.PreTrainedModel, tokenizer, tokens: list[str]) -> None:
    """Add ``tokens`` as special tokens (skipped when decoding) and grow the LLM's embeddings to match;
    tokens already in the vocabulary are left as they are."""
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()], special_tokens=True)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))


def load_encoder_model(cfg: EncoderConfig) -> transformers.PreTrainedModel:
    """The HF model behind one modality's encoder (whole model; :mod:`encoders` picks the tower)."""
    if cfg.hf_config is not None:
        return AutoModel.from_config(hf_config_from_dict(cfg.hf_config))
    if cfg.name_or_path is None:
        raise ValueError(f"encoders.{cfg.modality}: give either name_or_path or hf_config")
    return from_pretrained_safetensors(AutoModel, cfg.name_or_path)


def load_media_processor(cfg: EncoderConfig, model_config: PretrainedConfig, directory: str | None = None):
    """Image processor or feature extractor for an encoder (a text_prompt encoder: its tokenizer).

    Order: a saved ``directory``; ``cfg.processor`` (a dict with ``type``, a transformers class name);
    the encoder's own directory; else a default derived from the encoder's config. A text_prompt
    encoder's tokenizer comes from ``cfg.tokenizer`` or ``cfg.name_or_path``.
    """
    if directory is not None:
        return saved_processor(cfg.modality, directory)
    if cfg.modality == TEXT_PROMPT:
        source = cfg.tokenizer or cfg.name_or_path
        if source is None:
            raise ValueError(f"encoders.{TEXT_PROMPT}: no tokenizer; set encoders.{TEXT_PROMPT}.tokenizer to a hub id or directory")
        return AutoTokenizer.from_pretrained(resolve_path(source))
    if cfg.processor is not None:
        spec = dict(cfg.processor)
        cls = getattr(transformers, spec.pop("type"))
        return cls(**spec)
    if cfg.name_or_path is not None:
        return saved_processor(cfg.modality, resolve_path(cfg.name_or_path))
    return default_processor(cfg.modality, model_config)


def saved_processor(modality: str, path: str):
    """The image processor (image, video), feature extractor (audio) or tokenizer (text_prompt) saved in ``path``."""
    if modality == TEXT_PROMPT:
        return AutoTokenizer.from_pretrained(path)
    if modality == "audio":
        return transformers.AutoFeatureExtractor.from_pretrained(path)
    return transformers.AutoImageProcessor.from_pretrained(path)


def default_processor(modality: str, config: PretrainedConfig):
    """A processor matching a randomly initialised encoder's input shape."""
    config = getattr(config, "vision_config", None) or getattr(config, "audio_config", None) or config
    if modality in ("image", "video"):
        size = config.image_size
        return transformers.ViTImageProcessor(size={"height": size, "width": size})
    if config.model_type == "whisper":
        frames = 2 * config.max_source_positions  # the encoder's stride-2 conv halves the mel frames
        seconds, rest = divmod(frames * 160, 16000)
        if rest:
            raise ValueError(f"encoders.{modality}: whisper max_source_positions {config.max_source_positions} is not a whole number of seconds at hop 160")
        return transformers.WhisperFeatureExtractor(
            feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=seconds
        )
    if config.model_type in ("wav2vec2", "hubert", "wavlm"):
        return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0)
    raise ValueError(
        f"encoders.{modality}: cannot derive a processor for model_type {config.model_type!r}; "
        "set encoders.<m>.processor to a dict with 'type' (a transformers class) and its arguments"
    )


def config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A JSON-safe config dict that :func:`hf_config_from_dict` rebuilds."""
    return config.to_dict()


@contextlib.contextmanager
def progress_bars_off() -> Iterator[None]:
    """transformers' progress bars off for the block (a ``save_pretrained`` / ``from_pretrained`` inside a
    world build, which draws its own bar), restored after."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


__all__ = [
    "config_dict",
    "default_processor",
    "from_pretrained_safetensors",
    "hf_config_from_dict",
    "load_encoder_model",
    "load_llm",
    "load_media_processor",
    "load_tokenizer",
    "progress_bars_off",
    "resolve_path",
]
