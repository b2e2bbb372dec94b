"""Type-B routed experts inside the LLM's layers: CogVLM's visual expert and mPLUG-Owl2's
modality-adaptive module.

Visual expert (CogVLM, Wang et al. 2023). An image becomes ``[BOI] N image positions [EOI]`` in the sequence (BOI and EOI are learned vectors,
the N positions hold the connector's output, CogVLM's GLU adapter). In every decoder layer, the
positions of BOI and the image use their own copies of the attention's projections (q/k/v and the
output projection) and of the MLP, initialised from the LLM's weights; EOI and text use the LLM's
frozen weights. Attention is one joint causal softmax over all positions, as in the released code.
All image positions share one rotary position id (BOI, the image, EOI take three consecutive ids).

Modality-adaptive module (mPLUG-Owl2, Ye et al. 2023): the media positions (the visual abstractor's
queries, spliced in as in Type-C) use their own input norm, post-attention norm and key and value
projections; the query and output projections and the FFN stay shared. No boundary vectors, ordinary
positions.

Both are :class:`RoutedExpertFusion` with different ``parts`` (which modules of every layer get a
per-modality copy: ``attention`` = all of the attention's projections, ``mlp``, ``norms`` = the
layer's two norms, ``kv`` = the key and value projections only, columns of GPT-2's fused ``c_attn``).

How it reaches the LLM without re-implementing it: forward hooks on the copied modules replace their
output at expert positions with the expert copy's output on
the same input (the language weights still run on those positions; their result is discarded). The
copies live in this module, so the LLM's parameter names are unchanged. The routing mask and the
collapsed positions travel as the ``expert_context`` keyword of the LLM's forward; a pre-hook on the
decoder stack reads it, computes the position ids, and holds the mask for the hooks during that call
(for ``generate``, which rejects unknown keywords, it is set for the duration of the call). Decode
steps are text: language weights, positions continued from the prompt's last one.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .base import FusionStrategy
from .embedding import PLACEHOLDER_IDS, splice_media
from .layers import attention_module, decoder_layers, feed_forward
from .markers import MediaMarkers, init_std, run_starts

BOI_IDS = {"image": -310, "audio": -311, "video": -312}
EOI_IDS = {"image": -320, "audio": -321, "video": -322}


PARTS = ("attention", "mlp", "norms", "kv")
MEDIA_ATTENTION = ("causal", "bidirectional")


@dataclass
class ExpertContext:
    """``routes``: modality -> ``(B, L)`` positions its expert handles; ``collapsed``: ``(B, L)`` media
    positions after the first of their item, which repeat the previous position id (all False
    without shared positions); ``items``: ``(B, L)`` the 1-based number of the media item each media
    position belongs to (0 elsewhere)."""

    routes: dict[str, torch.Tensor]
    collapsed: torch.Tensor
    items: torch.Tensor


def routed_modules(layer: nn.Module, parts: list[str]) -> dict[str, tuple[nn.Module, slice]]:
    """name -> (module of ``layer`` to copy, output columns the copy replaces) for the ``parts``."""
    attention = attention_module(layer)
    found: dict[str, tuple[nn.Module, slice]] = {}
    if "attention" in parts:
        projections = {n: c for n, c in attention.named_children()
                       if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2}
        found |= {n: (c, slice(None)) for n, c in projections.items()}
    if "kv" in parts:
        if hasattr(attention, "k_proj") and hasattr(attention, "v_proj"):
            found |= {"k_proj": (attention.k_proj, slice(None)), "v_proj": (attention.v_proj, slice(None))}
        else:  # GPT-2's fused q/k/v: the copy replaces the key and value columns only
            found["c_attn"] = (attention.c_attn, slice(attention.split_size, None))
    if "mlp" in parts:
        found["mlp"] = (feed_forward(layer, "to copy into an expert"), slice(None))
    if "norms" in parts:
        norms = {n: c for n, c in layer.named_children() if "norm" in type(c).__name__.lower()}
        if len(norms) != 2:
            raise ValueError(f"{type(layer).__name__}: expected an input and a post-attention norm, found {sorted(norms)}")
        found |= {n: (c, slice(None)) for n, c in norms.items()}
    return found


class RoutedExpertFusion(FusionStrategy):
    """Per-modality copies of ``parts`` of every decoder layer, used at that modality's positions.
    Defaults are CogVLM's visual expert; ``boundary_tokens`` adds BOI/EOI vectors (BOI routed to the
    expert, EOI not); ``shared_position`` gives an item's media positions one position id;
    ``media_attention`` is ``"causal"`` (CogVLM's released code: one causal mask over everything) or
    ``"bidirectional"`` (an item's media positions also see each other; the prompt's mask is then
    passed to the LLM as a prepared 4D mask, which transformers takes as it is)."""

    survey_type = "B"
    context_key = "expert_context"

    def __init__(self, parts: tuple[str, ...] | list[str] = ("attention", "mlp"), boundary_tokens: bool = True,
                 shared_position: bool = True, media_attention: str = "causal"):
        super().__init__()
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ValueError(f"routed experts: parts must be a non-empty subset of {PARTS}, got {list(parts)}")
        if media_attention not in MEDIA_ATTENTION:
            raise ValueError(f"routed experts: media_attention must be one of {MEDIA_ATTENTION}, got {media_attention!r}")
        self.parts, self.boundary_tokens, self.shared_position = list(parts), boundary_tokens, shared_position
        self.media_attention = media_attention
        self.experts = nn.ModuleDict()
        self.boi = MediaMarkers([], ids=BOI_IDS)
        self.eoi = MediaMarkers([], ids=EOI_IDS)
        self._routes: dict[str, torch.Tensor] | None = None

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        media = [PLACEHOLDER_IDS[modality]] * num_tokens
        return [BOI_IDS[modality], *media, EOI_IDS[modality]] if self.boundary_tokens else media

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        if self.boundary_tokens:
            dim, std = llm.get_input_embeddings().embedding_dim, init_std(llm)
            self.boi = MediaMarkers(list(media_dims), dim, std, BOI_IDS)
            self.eoi = MediaMarkers(list(media_dims), dim, std, EOI_IDS)
        layers = [routed_modules(layer, self.parts) for layer in decoder_layers(llm)]
        self.experts = nn.ModuleDict({
            m: nn.ModuleList(nn.ModuleDict({n: copy.deepcopy(module) for n, (module, _) in found.items()}) for found in layers)
            for m in media_dims
        })
        for index, found in enumerate(layers):
            for name, (module, columns) in found.items():
                # a partial of a bound method, not a closure: a deep copy of the model rebinds it to the copy
                module.register_forward_hook(functools.partial(self._route, index, name, columns))
        decoder = llm.get_decoder()
        decoder.register_forward_pre_hook(self._enter, with_kwargs=True)
        decoder.register_forward_hook(self._exit)

    def _route(self, index: int, name: str, columns: slice, module, args, output):
        """Forward hook: at each modality's positions, ``output[..., columns]`` from its copy instead."""
        if self._routes is None:
            return output
        for modality, route in self._routes.items():
            if route.shape != args[0].shape[:2]:
                continue
            replaced = output[route]  # (n, out): only this modality's positions
            replaced[:, columns] = self.experts[modality][index][name](args[0][route])[:, columns].to(output.dtype)
            output = output.masked_scatter(route.unsqueeze(-1), replaced)
        return output

    def _enter(self, module, args, kwargs):
        context = self.call_context(kwargs)
        if context is None:
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        extra = length - context.collapsed.shape[1]
        if extra < 0:  # a cached decode step: text, its position continued past the collapsed media
            self._routes = None
            if self.shared_position:
                if kwargs.get("position_ids") is None:
                    raise ValueError("routed experts: a decode step came without position_ids to continue from")
                kwargs["position_ids"] = kwargs["position_ids"] - context.collapsed.sum(dim=1, keepdim=True)
            return args, kwargs
        collapsed = nn.functional.pad(context.collapsed, (0, extra))
        if self.shared_position:
            present = mask[:, -length:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(collapsed)
            kwargs["position_ids"] = ((present & ~collapsed).long().cumsum(dim=1) - 1).clamp(min=0)
        self._routes = {m: nn.functional.pad(route, (0, extra)) for m, route in context.routes.items()}
        if self.media_attention == "bidirectional":
            dtype = embeds.dtype if embeds is not None else torch.float32
            kwargs["attention_mask"] = bidirectional_media_mask(nn.functional.pad(context.items, (0, extra)), mask, dtype)
        return args, kwargs

    def _exit(self, module, args, output):
        self._routes = None

    def llm_inputs(self, llm, input_ids, media):
        """-> ``{"inputs_embeds": (B, L, d), "expert_context": ExpertContext}``."""
        embeds = splice_media(llm.get_input_embeddings()(input_ids.clamp(min=0)), input_ids, media)
        boi, eoi = self.boi.masks(input_ids), self.eoi.masks(input_ids)
        embeds = self.eoi.place(self.boi.place(embeds, boi), eoi)
        routes, collapsed = {}, torch.zeros_like(input_ids, dtype=torch.bool)
        is_media = torch.zeros_like(collapsed)
        for modality in self.experts:
            placeholder = input_ids == PLACEHOLDER_IDS[modality]
            routes[modality] = placeholder | boi[modality] if self.boundary_tokens else placeholder
            is_media |= placeholder
            if self.shared_position:
                collapsed |= placeholder & ~run_starts(placeholder)  # not the item's first
        first = run_starts(is_media)
        items = first.long().cumsum(dim=1) * is_media
        return {"inputs_embeds": embeds, "expert_context": ExpertContext(routes, collapsed, items)}


def bidirectional_media_mask(items: torch.Tensor, padding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An additive ``(B, 1, L, L)`` mask: causal, plus each media item's positions seeing each other;
    ``padding``: the 2D attention mask (0 = padding key), or None."""
    length = items.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    allowed = causal | ((items.unsqueeze(2) == items.unsqueeze(1)) & (items.unsqueeze(2) > 0))  # (B, L, L)
    if isinstance(padding, torch.Tensor) and padding.dim() == 2:
        allowed = allowed & padding[:, -length:].bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=items.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)



class ModalityAdaptiveFusion(RoutedExpertFusion):
    """mPLUG-Owl2's modality-adaptive module: per-modality norms and key/value projections."""

    def __init__(self, parts: tuple[str, ...] | list[str] = ("norms", "kv"), boundary_tokens: bool = False,
                 shared_position: bool = False, media_attention: str = "causal"):
        super().__init__(parts, boundary_tokens, shared_position, media_attention)
