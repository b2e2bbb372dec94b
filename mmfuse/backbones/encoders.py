"""Media encoders: a thin module around a Hugging Face vision, audio or text model.

Images go through a vision tower (CLIP/SigLIP ``vision_model``, ViT), audio through an encoder
(Whisper's ``get_encoder()``, wav2vec2/HuBERT), video frame by frame through a vision tower, text
prompts through a text tower (CLIP's ``text_model``, or any ``AutoModel`` body such as a decoder LM's).
The output is always a sequence of feature vectors, ``(items, tokens, width)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config import TEXT_PROMPT, EncoderConfig


def _tower(model: PreTrainedModel, modality: str) -> nn.Module:
    """The part of ``model`` that encodes ``modality``: a dual encoder's vision tower, a seq2seq encoder."""
    if modality in ("image", "video") and hasattr(model, "vision_model"):
        return model.vision_model
    if modality == TEXT_PROMPT and hasattr(model, "text_model"):
        return model.text_model
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


def _input_name(model: PreTrainedModel, modality: str) -> str:
    if modality == TEXT_PROMPT:
        return "input_ids"
    name = getattr(model, "main_input_name", None)
    if name in ("pixel_values", "input_features", "input_values"):
        return name
    return "pixel_values" if modality in ("image", "video") else "input_features"


def _num_patches(config) -> int | None:
    config = getattr(config, "vision_config", None) or config
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return (size // patch) ** 2
    return None


class MediaEncoder(nn.Module):
    """Encode one modality's items.

    forward(x): image ``(n, 3, H, W)``, audio ``(n, mel, frames)`` or ``(n, samples)``, video
    ``(n, frames, 3, H, W)`` -> ``(n, tokens, hidden_size)``; text_prompt ids ``(n, L)``, -1 after each
    prompt's end -> ``(n, 1, hidden_size)``, the state at each prompt's last token. The hidden state is
    ``cfg.feature_layer`` (LLaVA: -2) and the CLS token is dropped per ``cfg.drop_cls``.
    """

    def __init__(self, cfg: EncoderConfig, model: PreTrainedModel):
        super().__init__()
        if cfg.drop_cls not in ("auto", "yes", "no"):
            raise ValueError(f"encoders.{cfg.modality}.drop_cls must be 'auto', 'yes' or 'no', got {cfg.drop_cls!r}")
        self.modality = cfg.modality
        self.feature_layer = cfg.feature_layer
        self.drop_cls = cfg.drop_cls
        self.model = model
        self.input_name = _input_name(model, cfg.modality)
        self._num_patches = _num_patches(model.config)

    @property
    def tower(self) -> nn.Module:
        return _tower(self.model, self.modality)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        if self.modality != "audio":
            config = getattr(config, "text_config" if self.modality == TEXT_PROMPT else "vision_config", config)
        return getattr(config, "hidden_size", None) or config.d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "video":
            n, frames = x.shape[:2]
            feats = self._encode(x.flatten(0, 1))  # (n*frames, tokens, d)
            return feats.reshape(n, frames * feats.shape[1], feats.shape[2])
        if self.modality == TEXT_PROMPT:
            valid = x >= 0
            hidden = self._hidden({self.input_name: x.clamp(min=0), "attention_mask": valid.long()})
            last = valid.sum(dim=1) - 1  # prompts are left-aligned
            return hidden[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        return self._encode(x)

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower's ``feature_layer`` hidden state for ``inputs``."""
        # transformers 5 towers that record outputs keep only the requested layer when given its index
        request = self.feature_layer if getattr(self.tower, "_can_record_outputs", None) else True
        hidden = self.tower(**inputs, output_hidden_states=request).hidden_states[self.feature_layer]
        if hidden is None:
            hidden = self.tower(**inputs, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden({self.input_name: x})
        if self._should_drop_cls(hidden.shape[1]):
            hidden = hidden[:, 1:]
        return hidden

    def _should_drop_cls(self, tokens: int) -> bool:
        if self.drop_cls == "auto":
            return self.modality != "audio" and self._num_patches is not None and tokens == self._num_patches + 1
        return self.drop_cls == "yes"
