"""Dataclass configs, saved as JSON inside every checkpoint.

A :class:`MultimodalConfig` names an LLM, one encoder and one connector per modality, and a fusion
strategy. Backbones are given either as ``name_or_path`` (hub id, local directory, or ``world:<name>``
for the built-in world's pretrained backbones) or as a Hugging Face config dict (``hf_config``), which
builds the architecture with random weights. A saved checkpoint always stores the resolved
``hf_config`` so that loading it needs no network.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODALITIES = ("image", "audio", "video")
# not a media modality: the text of every user turn, read by a text tower into a prefix (Pengi)
TEXT_PROMPT = "text_prompt"


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys with a clear error."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value)
    return cls(**kwargs)


def _coerce(hint, value):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(hint, value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _from_dict(hint, value)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {k: _from_dict(args[1], v) if isinstance(v, dict) else v for k, v in value.items()}
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_from_dict(args[0], v) if isinstance(v, dict) else v for v in value]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


class JsonConfig:
    """Mixin: ``to_dict`` / ``from_dict`` / ``save`` / ``load`` for dataclass configs."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class LLMConfig(JsonConfig):
    """The causal LM. ``name_or_path``: hub id, local dir or ``world:llm``; ``hf_config``: a
    transformers config dict (must contain ``model_type``) to build random weights instead."""

    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: str = "float32"
    add_tokens: list[str] = field(default_factory=list)  # special tokens added to the vocabulary (Otter's <answer>)


@dataclass
class EncoderConfig(JsonConfig):
    """One modality's encoder, loaded through ``AutoModel``.

    ``feature_layer``: which hidden state to take (-1 last, -2 penultimate as LLaVA does).
    ``drop_cls``: "auto" drops a leading CLS token when the encoder's output has one more token than
    it has patches (CLIP, ViT); SigLIP has none. ``processor``: a dict for the image processor /
    feature extractor when the encoder directory ships none.

    ``modality="text_prompt"`` is a text tower (Pengi's frozen CLIP text encoder) that reads the text of
    every user turn in place of the LLM: ``tokenizer`` is its own (defaults to ``name_or_path``),
    each prompt is at most ``max_tokens`` tokens (padded to that length; Pengi: 40), and its feature is
    the ``feature_layer`` state at the prompt's last token (CLIP pools at its last token, EOS).

    ``extra``: more audio encoders reading the same clips (WavLLM: WavLM beside Whisper), each with its
    own processor (given ``modality: audio``); their frames are aligned to this encoder's and their
    features concatenated to its own (:class:`~mmfuse.backbones.multi.MultiEncoder`).
    """

    modality: str = "image"
    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    feature_layer: int = -1
    drop_cls: str = "auto"  # "auto" | "yes" | "no"
    processor: dict[str, Any] | None = None
    tokenizer: str | None = None  # text_prompt: the text tower's tokenizer; defaults to name_or_path
    max_tokens: int = 40  # text_prompt: tokens per prompt, padded to this length
    pad_to_square: bool = True  # LLaVA-1.5 `image_aspect_ratio pad`
    frames: int = 8  # video: frames sampled per clip
    extra: list[EncoderConfig] = field(default_factory=list)  # audio: more encoders over the same clips (WavLLM)


@dataclass
class ConnectorConfig(JsonConfig):
    """Maps encoder features (B, N, D_enc) to LLM inputs (B, M, D_llm).

    kind: ``linear`` (LLaVA), ``mlp<k>x_gelu`` (LLaVA-1.5 uses mlp2x_gelu), ``qformer`` (BLIP-2 style
    learned queries), ``perceiver`` (Flamingo / OpenFlamingo / IDEFICS perceiver resampler: ``num_latents``
    learned latents attend to the features concatenated with themselves), ``identity``. ``pool_stride``
    > 1 average-pools the features in time/sequence before projecting (Qwen-Audio uses 2; not with a
    perceiver over video frames). ``boundary_tokens`` adds learned begin/end vectors around each item
    (Qwen-Audio's audio BOS/EOS). ``input_norm`` layer-normalises the encoder features first.

    ``depth`` and ``num_heads`` serve both the qformer and the perceiver. The field defaults (2 and 4)
    suit the qformer; Flamingo's perceiver uses depth 6, 8 heads and 64 latents, which belong in a
    recipe, not here. ``max_frames`` > 0 gives the perceiver a learned embedding per video frame index
    (up to that many frames); 0 means none, and the frames are then an unordered set of tokens.

    ``kind="windows"`` is Audio Flamingo's sliding-window transformation: windows of ``window`` encoder
    output frames, starting every ``hop`` frames (``1 + (frames - window) // hop`` windows per item),
    one mean embedding per window plus a learned window-position embedding (up to ``max_windows``), then
    ``depth`` pre-norm Transformer encoder layers with ``num_heads`` heads (Audio Flamingo: 3 and 8).
    ``window`` and ``hop`` count frames after ``pool_stride`` pooling and are used only by this kind.

    ``kind="mapper"`` is ClipCap/Pengi's transformer mapping network: the features projected to the LLM
    width, ``prefix_length`` learned constants appended, ``depth`` pre-norm Transformer encoder layers
    with ``num_heads`` heads at the LLM width; the outputs at the constants are the item's prefix
    (Pengi: 40 constants, 4 layers, 8 heads per mapping network).

    ``kind="qllama"`` is InternVL's language middleware: ``num_queries`` learned queries through a copy of
    the LLM's first ``depth`` decoder layers (initialised from its weights) with gated cross-attention
    to the features before every ``cross_attention_every``-th of them, then an MLP (InternVL: 96 queries).

    With several encoders (``EncoderConfig.extra``) the features are each encoder's, concatenated;
    ``encoder_projector`` (a projector kind) first maps each encoder's part on its own to
    ``llm_dim // encoders`` (after ``pool_stride``; ``input_norm`` then normalises each part), and ``kind``
    maps their concatenation (WavLLM: one adapter per encoder, then a linear layer over both).
    """

    kind: str = "linear"
    pool_stride: int = 1
    num_queries: int = 32  # qformer / qllama: learned queries = tokens per item
    depth: int = 2
    num_heads: int = 4
    hidden_size: int | None = None  # qformer width; defaults to the encoder width
    cross_attention_every: int = 2  # qformer / qllama: cross-attention in every n-th block or copied layer (BLIP-2: 2)
    # qformer: Qwen-VL's 2-D sin-cos positions on queries and features; perceiver and projectors: on each
    # frame's features (square grids)
    positions_2d: bool = False
    num_latents: int = 64  # perceiver: learned latents = tokens per item (Flamingo: 64)
    prefix_length: int = 10  # mapper: learned prefix constants = tokens per item (Pengi: 40)
    max_frames: int = 0  # perceiver / qformer: frame embeddings for up to this many video frames; 0 = none
    window: int = 0  # windows: encoder output frames per window
    hop: int = 0  # windows: frames between the starts of consecutive windows
    max_windows: int = 64  # windows: position embeddings, the most windows an item may have
    boundary_tokens: bool = False
    input_norm: bool = False
    encoder_projector: str | None = None  # several encoders: each one's projector before the concatenation


@dataclass
class CodecConfig(JsonConfig):
    """A Type-D modality tokenizer (``mmfuse.codecs``): media to discrete codes and back.

    ``name_or_path``: ``world:image_codec`` / ``world:audio_codec`` / ``world:semantic_audio``, a saved
    codec directory, or a transformers codec (``ChameleonVQVAE``, ``EncodecModel``) by hub id or path;
    ``settings``: ``{"kind": ..., ...}`` builds the architecture with untrained weights instead. A saved
    checkpoint stores the resolved ``settings`` (the weights are in its safetensors)."""

    modality: str = "image"
    name_or_path: str | None = None
    settings: dict[str, Any] | None = None


@dataclass
class FusionConfig(JsonConfig):
    """Which survey type and its settings: ``type`` "A" (cross-attention, options of
    :class:`~mmfuse.fusion.CrossAttentionFusion`), "B" (custom layers: ``options.mechanism`` picks one of
    ``mmfuse.fusion.TYPE_B_MECHANISMS``, e.g. ``adapter_prompts``, the rest are its options) or "C"
    (non-tokenized early fusion) or "D" (tokenized early fusion: the modalities in
    ``MultimodalConfig.codecs`` become vocabulary tokens; options of :class:`~mmfuse.fusion.TokenFusion`).

    ``cross_attention`` (options of :class:`~mmfuse.fusion.CrossAttentionFusion`) adds a Type-A branch
    to a Type-B or Type-C strategy: gated cross-attention blocks reading each item's encoder features
    (CogAgent, MM-Interleaved; :class:`~mmfuse.fusion.WithCrossAttention`)."""

    type: str = "C"
    options: dict[str, Any] = field(default_factory=dict)
    cross_attention: dict[str, Any] | None = None


@dataclass
class MultimodalConfig(JsonConfig):
    llm: LLMConfig = field(default_factory=LLMConfig)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = field(default_factory=dict)
    codecs: dict[str, CodecConfig] = field(default_factory=dict)  # Type-D: modalities read and written as tokens
    fusion: FusionConfig = field(default_factory=FusionConfig)
    max_length: int = 512
    chat_template: str | None = None  # overrides the tokenizer's template
    # "error" | "skip": what to do with a sample that cannot be used (unreadable media, a malformed record,
    # longer than max_length); skipped samples are counted (Processor.bad_samples)
    on_bad_sample: str = "error"
    # AudioPaLM's task tags: text put before the first user turn of every sample whose meta.task is a key
    # (e.g. {"audio_caption": "[ASR] ", "audio_generation": "[TTS] "}), in training and evaluation alike
    task_prefixes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name, enc in self.encoders.items():
            if name not in (*MODALITIES, TEXT_PROMPT):
                raise ValueError(f"encoders: unknown modality {name!r}; expected one of {(*MODALITIES, TEXT_PROMPT)}")
            if enc.modality != name:
                raise ValueError(f"encoders[{name!r}].modality is {enc.modality!r}; it must equal the key")
            if enc.extra and name != "audio":
                raise ValueError(f"encoders.{name}.extra: several encoders per modality are supported for audio only "
                                 "(their frames are aligned in time)")
            for i, extra in enumerate(enc.extra):
                if extra.modality != name or extra.extra:
                    raise ValueError(f"encoders.{name}.extra[{i}]: needs modality {name!r} (got {extra.modality!r}) and no "
                                     "extra of its own")
        missing = sorted(set(self.encoders) - set(self.connectors))
        if missing:
            raise ValueError(f"connectors: no connector for modality {missing}; add connectors.{missing[0]}")
        for name, codec in self.codecs.items():
            if name not in MODALITIES or codec.modality != name:
                raise ValueError(f"codecs: key {name!r} must be a modality in {MODALITIES} equal to its modality field ({codec.modality!r})")
        both = sorted(set(self.codecs) & set(self.encoders))
        if both:
            raise ValueError(f"modality {both[0]!r} has both an encoder and a codec; a modality is read either continuously or as tokens")
        if (self.fusion.type == "D") != bool(self.codecs):
            raise ValueError("fusion.type 'D' needs codecs (the modalities read as tokens), and codecs need fusion.type 'D'")
        if TEXT_PROMPT in self.encoders and self.fusion.type != "C":
            raise ValueError(f"encoders.{TEXT_PROMPT} puts the prompt in the input embeddings as a prefix; it needs fusion.type 'C', "
                             f"got {self.fusion.type!r}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """As :meth:`JsonConfig.from_dict`; reads ``on_overflow``, the name of ``on_bad_sample`` in
        checkpoints saved before it covered every bad sample."""
        if isinstance(data, dict) and "on_overflow" in data:
            data = {("on_bad_sample" if k == "on_overflow" else k): v for k, v in data.items()}
        return _from_dict(cls, data)
