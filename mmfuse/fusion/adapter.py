"""Type-B adapter prompts (LLaMA-Adapter V1, Zhang et al. 2023).

``prompt_length`` learned prompt vectors per adapted layer (the top ``layers`` decoder layers) are
projected by that layer's own frozen key and value projections, with no rotary position, and every
query attends to them through a *separate* softmax whose output is scaled by a per-head gate that
starts at 0 (``tanh(gate)`` as in the released code, or the paper's plain ``gate``)::

    out = attention(q, K, V) + g_h * softmax(q K_p^T * scale) V_p

so the adapted model starts as the bare LLM. Grouped-query attention is handled by sharing each
key/value head's prompt keys across its query heads.

How media enter (``media``):

- ``"mean"`` (V1, the paper's ScienceQA model): each row's global media feature (the connector's
  output averaged over its tokens, and over the row's items) is added to every prompt of every
  adapted layer;
- ``"tokens"`` (LLaMA-Adapter V2's released code): the connector yields exactly ``prompt_length``
  tokens per item (a visual query), added element-wise to the prompts of every adapted layer;
- ``"early"`` (the V2 paper's early fusion): the media are spliced into the input sequence (as in
  Type-C, so the first layer reads them) and the prompts stay static.

``bias_scale`` adds LLaMA-Adapter V2's bias and scale tuning: every linear layer of the decoder
becomes ``y = s * (W x + b)`` with ``b = 0`` and ``s = 1`` at the start (forward hooks; ``b`` and
``s`` live here, in ``fusion.bias_scale``); V2 also tunes the LLM's norms (group ``llm.norms``).

How it reaches the LLM: through transformers' attention interface. The LLM's attention
implementation is set to a registered function (named after :data:`ATTENTION_NAME` and the original
implementation, whose mask format it keeps) that runs the original implementation (sdpa, eager,
flash, ...) and adds the prompt term; queries arrive there after the model's own
rotary embedding, so nothing of the LLM is re-implemented. The per-row media features travel as the
``adapter_context`` keyword of the LLM's forward, which Hugging Face decoders hand to every attention
call; during ``generate`` (which rejects unknown keywords) they are set for the duration of the call.
Each media item keeps one marker position (:mod:`.markers`) so that its row is known.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import FusionStrategy
from .embedding import PLACEHOLDER_IDS, splice_media
from .layers import attention_heads, attention_module, decoder_layers
from .markers import MARKER_IDS, MediaMarkers, check_item_counts, init_std

ATTENTION_NAME = "mmfuse_adapter_prompts"
GATES = ("tanh", "linear")
MEDIA = ("mean", "tokens", "early")

# each attention module of an adapted LLM holds (its fusion, the adapted-layer slot or None) under this
# name in its __dict__: not a registered submodule, and a deep copy of the model maps it to the copy
OWNER = "_mmfuse_adapter_prompts"


def project_prompts(module: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, K, d)`` prompts through the attention module's frozen key/value projections (and its key
    norm, if it has one) -> keys and values ``(n, kv_heads, K, head_dim)``; no rotary position."""
    head_dim = module.head_dim
    if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
        keys, values = module.k_proj(prompts), module.v_proj(prompts)
    elif hasattr(module, "c_attn"):  # GPT-2's fused q/k/v projection
        _, keys, values = module.c_attn(prompts).split(module.split_size, dim=2)
    else:
        raise ValueError(f"{type(module).__name__}: adapter prompts need k_proj/v_proj or a fused c_attn")
    keys = keys.unflatten(-1, (-1, head_dim)).transpose(1, 2)
    values = values.unflatten(-1, (-1, head_dim)).transpose(1, 2)
    if isinstance(getattr(module, "k_norm", None), nn.Module):  # Qwen3/OLMo-style per-head key norm
        keys = module.k_norm(keys)
    return keys, values


def adapter_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the original attention plus the adapter-prompt term."""
    if OWNER not in module.__dict__:
        raise ValueError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs attention "
                         f"'{ATTENTION_NAME}_*' but belongs to no adapter-prompt model; a copied config keeps that setting: "
                         "call set_attn_implementation('sdpa') on the copy")
    fusion, slot = module.__dict__[OWNER]
    context = fusion.call_context(kwargs)
    out, weights = fusion.base_attention_function(module, query, key, value, attention_mask, **kwargs)
    if slot is None:
        return out, weights
    scaling = kwargs.get("scaling") or module.head_dim**-0.5
    return out + fusion.prompt_attention(module, slot, query, scaling, context).to(out.dtype), weights


def register_attention(base: str) -> str:
    """The attention implementation name for an LLM whose own implementation is ``base``:
    :func:`adapter_attention`, with ``base``'s attention-mask format (transformers builds no mask at all,
    padding included, for an implementation it has no mask function for)."""
    name = f"{ATTENTION_NAME}_{base}"
    AttentionInterface.register(name, adapter_attention)
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


class AdapterPromptFusion(FusionStrategy):
    survey_type = "B"
    context_key = "adapter_context"

    def __init__(self, prompt_length: int = 10, layers: int | list[int] | None = None, gate: str = "tanh",
                 media: str = "mean", bias_scale: bool = False):
        super().__init__()
        if prompt_length < 1:
            raise ValueError(f"adapter prompts: prompt_length must be >= 1, got {prompt_length}")
        if gate not in GATES:
            raise ValueError(f"adapter prompts: gate must be one of {GATES}, got {gate!r}")
        if media not in MEDIA:
            raise ValueError(f"adapter prompts: media must be one of {MEDIA}, got {media!r}")
        self.prompt_length, self.layers, self.gate, self.media = prompt_length, layers, gate, media
        self.tune_bias_scale = bias_scale
        self.bias_scale = nn.ModuleDict()
        self.layer_indices: list[int] = []
        self.base_attention = "sdpa"
        self.prompts = nn.Parameter(torch.zeros(0))
        self.gates = nn.Parameter(torch.zeros(0))
        self.markers = MediaMarkers([])

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        if self.media == "early":
            return [PLACEHOLDER_IDS[modality]] * num_tokens
        if self.media == "tokens" and num_tokens != self.prompt_length:
            raise ValueError(f"adapter prompts (media 'tokens'): the {modality} connector yields {num_tokens} tokens per "
                             f"item but the prompts are {self.prompt_length} long; give it {self.prompt_length} queries")
        return [MARKER_IDS[modality]]

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        dim = llm.get_input_embeddings().embedding_dim
        wrong = {m: w for m, w in media_dims.items() if w != dim}
        if wrong:
            raise ValueError(f"adapter prompts: media features must have the LLM width {dim}, got {wrong}")
        layers = decoder_layers(llm)
        self.layer_indices = adapted_layers(len(layers), self.layers)
        attention = [attention_module(layer) for layer in layers]
        # unit-scale prompts, as LLaMA-Adapter's nn.Embedding: they meet k/v projections made for normed states
        self.prompts = nn.Parameter(torch.randn(len(self.layer_indices), self.prompt_length, dim))
        self.gates = nn.Parameter(torch.zeros(len(self.layer_indices), attention_heads(llm)))
        self.markers = MediaMarkers([] if self.media == "early" else list(media_dims), dim, init_std(llm))
        if self.tune_bias_scale:
            self.bias_scale = attach_bias_scale(layers)
        slot_of = {index: slot for slot, index in enumerate(self.layer_indices)}
        for index, module in enumerate(attention):
            module.__dict__[OWNER] = (self, slot_of.get(index))
        self.base_attention = llm.config._attn_implementation
        # resolved once here, not at every attention call: the kernel the LLM ran before (eager falls back
        # to its modeling file's own function)
        self.base_attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.base_attention, sys.modules[type(attention[0]).__module__].eager_attention_forward)
        llm.set_attn_implementation(register_attention(self.base_attention))

    def prompt_attention(self, module: nn.Module, slot: int, query: torch.Tensor, scaling: float,
                         media: torch.Tensor | None) -> torch.Tensor:
        """query ``(B, heads, L, head_dim)`` -> the gated prompt term ``(B, L, heads, head_dim)``.
        ``media``: per-row features added to the prompts, ``(B, d)`` or ``(B, K, d)``, or None."""
        prompts = self.prompts[slot].unsqueeze(0)  # (1, K, d)
        if media is not None:
            prompts = prompts + (media.unsqueeze(1) if media.dim() == 2 else media).to(prompts.dtype)  # (B, K, d)
        keys, values = project_prompts(module, prompts.to(query.dtype))
        groups = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        weights = torch.softmax((query @ keys.transpose(-1, -2)) * scaling, dim=-1, dtype=torch.float32)
        out = weights.to(values.dtype) @ values  # (B, heads, L, head_dim)
        gate = self.gates[slot].tanh() if self.gate == "tanh" else self.gates[slot]
        return (gate.to(out.dtype).view(1, -1, 1, 1) * out).transpose(1, 2)

    def llm_inputs(self, llm, input_ids, media):
        """-> ``{"inputs_embeds": (B, L, d), "adapter_context": (B, d) or (B, K, d) or None}``."""
        if self.media == "early":
            embeds = splice_media(llm.get_input_embeddings()(input_ids.clamp(min=0)), input_ids, media)
            return {"inputs_embeds": embeds, "adapter_context": None}
        masks = self.markers.masks(input_ids)
        counts = check_item_counts(masks, media)
        embeds = self.markers.embed(llm, input_ids, masks)
        pooled = media if self.media == "tokens" else {m: t.mean(dim=1, keepdim=True) for m, t in media.items() if t is not None}
        features = row_features(masks, pooled, counts, embeds.shape[0])
        return {"inputs_embeds": embeds, "adapter_context": features}



def adapted_layers(num_layers: int, layers: int | list[int] | None) -> list[int]:
    """The top ``layers`` decoder layers (all when None), or an explicit list of indices."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, list):
        if not layers or any(not 0 <= i < num_layers for i in layers):
            raise ValueError(f"adapter prompts: layers {layers} must be a non-empty list of indices in [0, {num_layers})")
        return sorted(set(layers))
    if not 1 <= layers <= num_layers:
        raise ValueError(f"adapter prompts: layers must be 1..{num_layers} (the top L layers), got {layers}")
    return list(range(num_layers - layers, num_layers))


def row_features(masks: dict[str, torch.Tensor], media: dict[str, torch.Tensor], counts: dict[str, int],
                 batch: int) -> torch.Tensor | None:
    """Each row's media features ``(B, T, d)`` from items ``(n, T, d)``: the mean over the row's items
    (rows without media get 0); ``(B, d)`` when ``T`` is 1; None when the batch has no media."""
    if not any(counts.values()):
        return None
    total = counts_per_row = None
    for modality, mask in masks.items():
        if not counts[modality]:
            continue
        rows = mask.nonzero(as_tuple=True)[0]
        items = media[modality]
        if total is None:
            total = items.new_zeros(batch, *items.shape[1:])
            counts_per_row = items.new_zeros(batch, 1, 1)
        if items.shape[1:] != total.shape[1:]:
            raise ValueError(f"adapter prompts: {modality} items have {tuple(items.shape[1:])} features per item but "
                             f"other media have {tuple(total.shape[1:])}")
        total = total.index_add(0, rows, items)
        counts_per_row = counts_per_row.index_add(0, rows, torch.ones_like(items[:, :1, :1]))
    features = total / counts_per_row.clamp(min=1)
    return features.squeeze(1) if features.shape[1] == 1 else features


class BiasScale(nn.Module):
    """LLaMA-Adapter V2's tuning of one linear layer: ``y = scale * (W x + bias)``, bias 0 and scale 1."""

    def __init__(self, out_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = nn.Parameter(torch.ones(out_features))

    def hook(self, module, args, output):
        return self.scale.to(output.dtype) * (output + self.bias.to(output.dtype))


def attach_bias_scale(layers: nn.ModuleList) -> nn.ModuleDict:
    """A :class:`BiasScale` hooked onto every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) of the
    decoder layers, keyed by the layer's path with ``.`` as ``-``."""
    tuned = nn.ModuleDict()
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D" or weight is None:
                continue
            out_features = module.out_features if isinstance(module, nn.Linear) else module.nf
            tuned[f"{index}-{name.replace('.', '-')}"] = part = BiasScale(out_features)
            module.register_forward_hook(part.hook)
    return tuned
