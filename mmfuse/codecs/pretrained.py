"""Pretrained codecs from transformers behind the :class:`MediaCodec` interface.

``chameleon`` (``ChameleonVQVAE``: image encoder + quantizer; transformers ships no decoder, so it
encodes only), and the audio codecs ``encodec`` (``EncodecModel``), ``mimi`` (``MimiModel``) and
``dac`` (``DacModel``). Each builds from ``hf_config`` (a config dict; random weights) or loads a
checkpoint with :meth:`from_pretrained` (hub id or local path); its settings hold the config dict.
"""

from __future__ import annotations

import json
import math

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, ChameleonVQVAE, DacModel, EncodecModel, MimiModel
from transformers.utils import cached_file

from mmfuse.backbones.loading import config_dict, hf_config_from_dict
from mmfuse.codecs.base import MediaCodec


class _TransformersCodec(MediaCodec):
    """A transformers model in ``self.model``; settings ``{"kind", "hf_config", **options}``."""

    kind = ""
    model_class: type[transformers.PreTrainedModel]

    def __init__(self, hf_config: dict, **options):
        super().__init__()
        config = hf_config_from_dict(hf_config)
        if config.model_type != self.model_class.config_class.model_type:
            raise ValueError(f"{self.kind} codec: hf_config.model_type must be {self.model_class.config_class.model_type!r}, got {config.model_type!r}")
        self.model = self.model_class(config).eval()
        self._options = options
        self._processor = self.default_processor()

    def settings(self) -> dict:
        return {"kind": self.kind, "hf_config": config_dict(self.model.config), **self._options}

    def processor(self):
        return self._processor

    def default_processor(self):
        """The processor matching the config, for codecs built without a checkpoint."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options) -> "_TransformersCodec":
        """Load a checkpoint (hub id or directory) and the processor saved with it, if any."""
        return cls._wrap(cls.model_class.from_pretrained(name_or_path, use_safetensors=True), name_or_path, **options)

    @classmethod
    def _wrap(cls, model: transformers.PreTrainedModel, name_or_path: str, **options) -> "_TransformersCodec":
        codec = cls(hf_config=config_dict(model.config), **options)
        codec.model = model.eval()
        auto = transformers.AutoFeatureExtractor if codec.modality == "audio" else transformers.AutoImageProcessor
        try:
            codec._processor = auto.from_pretrained(name_or_path)
        except OSError:  # a checkpoint without a processor config keeps the default
            pass
        return codec


class ChameleonCodec(_TransformersCodec):
    """Chameleon's VQ-VAE tokenizer: image (3, R, R) -> (R / 2^(levels-1))^2 codes of ``num_embeddings``.
    Encode only: ``decode`` raises, as transformers has no Chameleon image decoder."""

    kind = "chameleon"
    modality = "image"
    model_class = ChameleonVQVAE
    can_decode = False

    def __init__(self, hf_config: dict):
        super().__init__(hf_config)
        self.codebook_size = self.model.config.num_embeddings
        self.factor = 2 ** (len(self.model.config.channel_multiplier) - 1)

    def default_processor(self):
        """Chameleon's preprocessing (resize, centre crop, pixels to [-1, 1]) at the config's resolution."""
        side = self.model.config.resolution
        return transformers.ChameleonImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ChameleonCodec":
        """A ``ChameleonVQVAE`` checkpoint, or the VQ-VAE inside a full Chameleon checkpoint
        (``model_type`` "chameleon", e.g. facebook/chameleon-7b: only its ``model.vqmodel.*`` tensors are read)."""
        config = AutoConfig.from_pretrained(name_or_path)
        if config.model_type != "chameleon":
            return cls._wrap(ChameleonVQVAE.from_pretrained(name_or_path, use_safetensors=True), name_or_path)
        model = ChameleonVQVAE(config.vq_config)
        model.load_state_dict(_prefixed_tensors(name_or_path, "model.vqmodel."), strict=True)
        return cls._wrap(model, name_or_path)

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        if len(item_shape) != 3 or item_shape[1] % self.factor or item_shape[2] % self.factor:
            raise ValueError(f"chameleon codec: expected pixel_values items (3, H, W) with H, W multiples of {self.factor}, got {tuple(item_shape)}")
        return (item_shape[1] // self.factor) * (item_shape[2] // self.factor)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values (items, 3, H, W) in [-1, 1] -> codes (items, (H/f) * (W/f), 1), raster order."""
        self.num_frames(tuple(inputs.shape[1:]))
        return self.model.encode(inputs).image_tokens.view(inputs.shape[0], -1, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "chameleon codec: transformers' ChameleonVQVAE has no image decoder, so Chameleon image codes "
            "cannot be turned back into pixels; use an 'image' codec (mmfuse.codecs.ImageCodec) to generate images"
        )


def _prefixed_tensors(name_or_path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The safetensors tensors under ``prefix`` (stripped) of a checkpoint, reading only the shards that hold them."""
    index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        files = ["model.safetensors"]
    else:
        with open(index) as f:
            files = sorted({file for key, file in json.load(f)["weight_map"].items() if key.startswith(prefix)})
    state = {}
    for name in files:
        with safe_open(cached_file(name_or_path, name), framework="pt") as f:
            state.update({key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)})
    if not state:
        raise ValueError(f"{name_or_path}: no tensors named {prefix}* in its safetensors")
    return state


class _WaveCodec(_TransformersCodec):
    """Audio codecs on raw waveforms at the config's sampling rate: items (samples,) or (1, samples)."""

    modality = "audio"

    def default_processor(self):
        return transformers.EncodecFeatureExtractor(feature_size=1, sampling_rate=self.model.config.sampling_rate)

    def _waves(self, inputs: torch.Tensor) -> torch.Tensor:
        """(items, samples) or (items, 1, samples) -> (items, 1, samples)."""
        if inputs.dim() == 2:
            return inputs[:, None]
        if inputs.dim() == 3 and inputs.shape[1] == 1:
            return inputs
        raise ValueError(f"{self.kind} codec: expected mono waveforms (items, samples) or (items, 1, samples), got shape {tuple(inputs.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3 or codes.shape[2] != self.num_codebooks:
            raise ValueError(f"{self.kind} codec: expected codes of shape (items, frames, {self.num_codebooks}), got {tuple(codes.shape)}")


class EncodecCodec(_WaveCodec):
    """EnCodec: ``num_codebooks`` follows ``bandwidth`` (kbps; default the config's lowest), one code
    frame per ``hop_length`` samples. Only unchunked, unnormalised checkpoints (e.g. encodec_24khz):
    the others carry per-chunk scales that codes alone do not hold."""

    kind = "encodec"
    model_class = EncodecModel

    def __init__(self, hf_config: dict, bandwidth: float | None = None):
        config = hf_config_from_dict(hf_config)
        bandwidth = config.target_bandwidths[0] if bandwidth is None else bandwidth
        if bandwidth not in config.target_bandwidths:
            raise ValueError(f"encodec codec: bandwidth {bandwidth} is not one of the config's target_bandwidths {config.target_bandwidths}")
        if config.normalize or config.chunk_length_s is not None:
            raise ValueError("encodec codec: checkpoints with normalize=True or chunk_length_s set (48 kHz) need per-chunk scales that codes do not carry; use an unchunked one such as facebook/encodec_24khz")
        super().__init__(hf_config, bandwidth=bandwidth)
        self.bandwidth = bandwidth
        self.codebook_size = config.codebook_size
        self.num_codebooks = self.model.quantizer.get_num_quantizers_for_bandwidth(bandwidth)

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        return math.ceil(item_shape[-1] / self.model.config.hop_length)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Waves (items, samples) -> codes (items, ceil(samples / hop_length), num_codebooks)."""
        return self.model.encode(self._waves(inputs), bandwidth=self.bandwidth).audio_codes[0].transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, frames, num_codebooks) -> waves (items, frames * hop_length) in [-1, 1]."""
        self._check_codes(codes)
        return self.model.decode(codes.transpose(1, 2)[None], [None]).audio_values[:, 0].clamp(-1, 1)


class MimiCodec(_WaveCodec):
    """Mimi (Moshi's codec): ``num_quantizers`` codebooks (default all), ``frame_rate`` code frames per second."""

    kind = "mimi"
    model_class = MimiModel

    def __init__(self, hf_config: dict, num_quantizers: int | None = None):
        config = hf_config_from_dict(hf_config)
        num_quantizers = config.num_quantizers if num_quantizers is None else num_quantizers
        if not 1 <= num_quantizers <= config.num_quantizers:
            raise ValueError(f"mimi codec: num_quantizers must be 1..{config.num_quantizers}, got {num_quantizers}")
        super().__init__(hf_config, num_quantizers=num_quantizers)
        self.codebook_size, self.num_codebooks = config.codebook_size, num_quantizers

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        config = self.model.config
        return math.ceil(item_shape[-1] * config.frame_rate / config.sampling_rate)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Waves (items, samples) -> codes (items, frames, num_quantizers)."""
        return self.model.encode(self._waves(inputs), num_quantizers=self.num_codebooks).audio_codes.transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, frames, num_quantizers) -> waves (items, samples) in [-1, 1]."""
        self._check_codes(codes)
        return self.model.decode(codes.transpose(1, 2)).audio_values[:, 0].clamp(-1, 1)


class DacCodec(_WaveCodec):
    """DAC: the first ``num_quantizers`` codebooks (default all ``n_codebooks``), one frame per ``hop_length`` samples."""

    kind = "dac"
    model_class = DacModel

    def __init__(self, hf_config: dict, num_quantizers: int | None = None):
        config = hf_config_from_dict(hf_config)
        num_quantizers = config.n_codebooks if num_quantizers is None else num_quantizers
        if not 1 <= num_quantizers <= config.n_codebooks:
            raise ValueError(f"dac codec: num_quantizers must be 1..{config.n_codebooks}, got {num_quantizers}")
        super().__init__(hf_config, num_quantizers=num_quantizers)
        self.codebook_size, self.num_codebooks = config.codebook_size, num_quantizers

    def default_processor(self):
        config = self.model.config
        return transformers.DacFeatureExtractor(feature_size=1, sampling_rate=config.sampling_rate, hop_length=config.hop_length)

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        return item_shape[-1] // self.model.config.hop_length

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Waves (items, samples) -> codes (items, samples // hop_length, num_quantizers)."""
        codes = self.model.encode(self._waves(inputs), n_quantizers=self.num_codebooks).audio_codes
        return codes[:, : self.num_codebooks].transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, frames, num_quantizers) -> waves (items, frames * hop_length) in [-1, 1]."""
        self._check_codes(codes)
        return self.model.decode(audio_codes=codes.transpose(1, 2)).audio_values.clamp(-1, 1)


PRETRAINED_BY_MODEL_TYPE: dict[str, type[_TransformersCodec]] = {
    "chameleon": ChameleonCodec,
    "chameleon_vqgan": ChameleonCodec,
    "encodec": EncodecCodec,
    "mimi": MimiCodec,
    "dac": DacCodec,
}
