"""Type-A, standard cross-attention deep fusion (Flamingo, OpenFlamingo, IDEFICS, Audio Flamingo).

Each media item takes one marker position in the token stream (a learned embedding, as Flamingo's
``<image>`` token). Gated cross-attention blocks run before chosen decoder layers of the unchanged
Hugging Face LLM: text hidden states attend to the media states (the connector's output, e.g. a
Perceiver resampler's latents), then a feed-forward layer; each is scaled by ``tanh`` of a gate that
starts at 0, so the fused model starts as the text-only LLM.

Media stay at their connector's width (OpenFlamingo's resampler runs at the vision width and the
block's ``to_kv`` maps it to the attention width): every block owns one key/value projection per
modality, so adding a modality adds parameters inside the LLM's blocks, as the survey says of Type-A.

Media masks: a text token attends to the media item of the nearest marker at or before it
(``media_attention="immediate"``, Flamingo) or to every earlier item (``"all_previous"``, Audio
Flamingo). Tokens before any media get an exactly zero cross-attention output.

How the blocks reach the LLM: a forward pre-hook on each decoder layer (so the LLM's modules and
parameter names stay as they are) runs the block on the layer's input hidden states. The media
context (keys and values of every block, computed once, and each token's media index) is passed
explicitly as the ``media_context`` keyword of the LLM's forward, which Hugging Face decoders hand to
every layer; ``generate`` rejects unknown keywords, so during generation the context is set for the
duration of the call by :meth:`CrossAttentionFusion.generation_inputs`. Decode steps reuse the
precomputed keys and values, so a new token costs one query projection and one attention row per block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..connectors.projector import SwiGLU
from .base import FusionStrategy
from .layers import attention_heads, decoder_layers
from .markers import MARKER_IDS, MediaMarkers, check_item_counts, init_std

PLACEMENTS = ("openflamingo", "idefics")
MEDIA_ATTENTION = ("immediate", "all_previous")
FFNS = ("gelu", "swiglu")  # the block's feed-forward layer: OpenFlamingo's, or IDEFICS's and mllama's


@dataclass
class MediaContext:
    """What the blocks read in one LLM call.

    ``keys[i]`` / ``values[i]``: block i's ``(B, heads, K, head_dim)``; ``key_item``: ``(B, K)`` the
    1-based item number of each key in its row (0 for padding); ``media_index``: ``(B, L)`` the item
    number each token attends to (immediate) or up to (all previous), 0 before any media.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_item: torch.Tensor
    media_index: torch.Tensor
    masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # see attention_mask

    def attention_mask(self, length: int, media_attention: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``length`` tokens: the SDPA mask ``(B, 1, L, K)`` and ``has_media`` ``(B, L, 1)``.

        Made once per length and shared by every block; every cached decode step (a shorter length:
        new tokens follow the prompt's last media item) reuses the same one."""
        if length not in self.masks:
            index, extra = self.media_index, length - self.media_index.shape[1]
            if extra < 0:
                index = index[:, -1:].expand(-1, length)
            elif extra > 0:  # an uncached step re-reads the prompt and the tokens generated so far
                index = torch.cat([index, index[:, -1:].expand(-1, extra)], dim=1)
            item, index = self.key_item.unsqueeze(1), index.unsqueeze(-1)  # (B, 1, K), (B, L, 1)
            allowed = ((item == index) if media_attention == "immediate" else (item <= index)) & (item > 0)
            has_media = allowed.any(dim=-1, keepdim=True)
            # rows without media attend anywhere (no all-masked softmax), then their output is zeroed
            self.masks[length] = ((allowed | ~has_media).unsqueeze(1), has_media)
        return self.masks[length]


class MediaKeyValue(nn.Module):
    """One modality's key and value projections: ``(n, T, media_dim) -> 2 x (n, T, dim)``."""

    def __init__(self, media_dim: int, dim: int):
        super().__init__()
        self.to_k = nn.Linear(media_dim, dim, bias=False)
        self.to_v = nn.Linear(media_dim, dim, bias=False)

    def forward(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k(media), self.to_v(media)


class GatedCrossAttentionBlock(nn.Module):
    """``x + tanh(g_attn) * xattn(LN(x), media) ; x + tanh(g_ff) * FFN(LN(x))`` on ``(B, L, d)``.

    ``media_dims``: modality -> width of its media states; each gets its own key/value projection.
    ``ffn``: ``"gelu"`` (OpenFlamingo: two matrices, ``ff_mult * dim`` hidden units) or ``"swiglu"``
    (IDEFICS's and mllama's cross layers: Llama's three-matrix MLP, ``ff_mult * dim`` hidden units).
    Only the gates start at zero (the output projections keep a normal init, so the gates get a
    gradient from the first step).
    """

    def __init__(self, dim: int, media_dims: dict[str, int], num_heads: int, ff_mult: int = 4, qk_norm: bool = False,
                 ffn: str = "gelu"):
        super().__init__()
        if ffn not in FFNS:
            raise ValueError(f"cross-attention: ffn must be one of {FFNS}, got {ffn!r}")
        if dim % num_heads:
            raise ValueError(f"cross-attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.media = nn.ModuleDict({m: MediaKeyValue(width, dim) for m, width in media_dims.items()})
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_gate = nn.Parameter(torch.zeros(1))
        hidden = ff_mult * dim
        self.ff = (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
                   if ffn == "gelu" else nn.Sequential(nn.LayerNorm(dim), SwiGLU(dim, hidden)))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def split_heads(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, dim)`` keys and values from :attr:`media` -> contiguous ``(B, heads, K, head_dim)``
        (keys through the key norm), done once per request so decode steps only read them."""
        return self.k_norm(self._heads(keys)).contiguous(), self._heads(values).contiguous()

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                has_media: torch.Tensor) -> torch.Tensor:
        """keys, values: ``(B, heads, K, head_dim)`` from :meth:`split_heads`; ``mask``: ``(B, 1, L, K)``
        which keys each token may attend to; ``has_media``: ``(B, L, 1)``, False where a token has no
        media to attend to (its cross-attention output is then exactly 0)."""
        q = self.q_norm(self._heads(self.to_q(self.norm(x))))
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        attended = self.to_out(attended.transpose(1, 2).flatten(2)) * has_media
        x = x + self.attn_gate.tanh() * attended
        return x + self.ff_gate.tanh() * self.ff(x)


def cross_attention_layers(num_layers: int, every: int, placement: str | list[int]) -> list[int]:
    """Decoder layer indices that get a block: OpenFlamingo ``(i + 1) % every == 0``, IDEFICS
    ``i % every == 0``, or an explicit list."""
    if isinstance(placement, list):
        bad = [i for i in placement if not 0 <= i < num_layers]
        if bad or not placement:
            raise ValueError(f"cross-attention layers {placement} must be a non-empty list of indices in [0, {num_layers})")
        return sorted(set(placement))
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} or a list of layer indices, got {placement!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    offset = 1 if placement == "openflamingo" else 0
    return [i for i in range(num_layers) if (i + offset) % every == 0]


class CrossAttentionFusion(FusionStrategy):
    survey_type = "A"
    context_key = "media_context"

    def __init__(self, every: int = 1, placement: str | list[int] = "openflamingo", media_attention: str = "immediate",
                 num_heads: int | None = None, ff_mult: int = 4, qk_norm: bool = False, ffn: str = "gelu"):
        super().__init__()
        if media_attention not in MEDIA_ATTENTION:
            raise ValueError(f"media_attention must be one of {MEDIA_ATTENTION}, got {media_attention!r}")
        self.every, self.placement, self.media_attention = every, placement, media_attention
        self.num_heads, self.ff_mult, self.qk_norm, self.ffn = num_heads, ff_mult, qk_norm, ffn
        self.layer_indices: list[int] = []
        self.blocks = nn.ModuleList()
        self.markers = MediaMarkers([])

    # -- layout -----------------------------------------------------------------------------------
    def layout(self, modality: str, num_tokens: int) -> list[int]:
        return [MARKER_IDS[modality]]

    # -- attachment -------------------------------------------------------------------------------
    def connector_width(self, encoder_dim: int, llm_dim: int) -> int:
        """Media stay at the encoder's width; each block projects them to keys and values."""
        return encoder_dim

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        self.attach_blocks(llm, media_dims)
        self.markers = MediaMarkers(list(media_dims), llm.get_input_embeddings().embedding_dim, init_std(llm))

    def attach_blocks(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        """The blocks and their hooks, without the marker embeddings (a strategy that lays the media
        out itself and adds these blocks as a branch, :class:`~mmfuse.fusion.WithCrossAttention`)."""
        dim = llm.config.get_text_config().hidden_size
        heads = self.num_heads or attention_heads(llm)
        layers = decoder_layers(llm)
        self.layer_indices = cross_attention_layers(len(layers), self.every, self.placement)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(dim, media_dims, heads, self.ff_mult, self.qk_norm, self.ffn)
                                    for _ in self.layer_indices)
        block_of = dict(zip(self.layer_indices, range(len(self.layer_indices))))
        for index, layer in enumerate(layers):
            # a partial of a bound method, not a closure: a deep copy of the model rebinds it to the copy
            layer.register_forward_pre_hook(functools.partial(self._before_layer, block_of.get(index)), with_kwargs=True)

    def _before_layer(self, block: int | None, module, args, kwargs):
        context = self.call_context(kwargs)
        if block is None or context is None:
            return args, kwargs
        if args:
            return (self._run_block(block, args[0], context), *args[1:]), kwargs
        kwargs["hidden_states"] = self._run_block(block, kwargs["hidden_states"], context)
        return args, kwargs

    def _run_block(self, block: int, hidden: torch.Tensor, context: MediaContext) -> torch.Tensor:
        mask, has_media = context.attention_mask(hidden.shape[1], self.media_attention)
        return self.blocks[block](hidden, context.keys[block], context.values[block], mask, has_media)

    # -- conditioning -----------------------------------------------------------------------------
    def llm_inputs(self, llm, input_ids, media):
        """-> ``{"inputs_embeds": (B, L, d), "media_context": MediaContext}``."""
        is_marker = self.markers.masks(input_ids)
        embeds = self.markers.embed(llm, input_ids, is_marker)
        return {"inputs_embeds": embeds, "media_context": self.media_context(input_ids, media, is_marker)}

    def media_context(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor], is_marker: dict[str, torch.Tensor]) -> MediaContext:
        """Order each row's media items by marker position and project them once per block into
        padded keys and values ``(B, items_per_row * tokens, dim)``."""
        counts = check_item_counts(is_marker, media)
        any_marker = torch.stack(list(is_marker.values())).any(dim=0)  # (B, L)
        media_index = any_marker.long().cumsum(dim=1)
        batch, tokens = input_ids.shape[0], max((media[m].shape[1] for m, n in counts.items() if n), default=1)
        per_row = max(int(media_index[:, -1].max()) if batch else 0, 1)  # the one host sync: it sizes the keys
        anchor = self.blocks[0].to_q.weight
        shape = (len(self.blocks), batch, per_row, tokens, anchor.shape[0])
        keys = torch.zeros(shape, dtype=anchor.dtype, device=input_ids.device)
        values = torch.zeros_like(keys)
        key_item = torch.zeros(batch, per_row, tokens, dtype=torch.long, device=input_ids.device)
        for modality, mask in is_marker.items():  # items of a modality come in row-major marker order
            if counts[modality]:
                rows, cols = mask.nonzero(as_tuple=True)
                slots = media_index[rows, cols] - 1
                items = media[modality]
                for i, block in enumerate(self.blocks):
                    k, v = block.media[modality](items)
                    keys[i, rows, slots, : items.shape[1]] = k.to(keys.dtype)
                    values[i, rows, slots, : items.shape[1]] = v.to(values.dtype)
                key_item[rows, slots, : items.shape[1]] = (slots + 1).unsqueeze(-1)
        heads = [block.split_heads(k, v) for block, k, v in zip(self.blocks, keys.flatten(2, 3), values.flatten(2, 3))]
        return MediaContext([k for k, _ in heads], [v for _, v in heads], key_item.flatten(1, 2), media_index)

