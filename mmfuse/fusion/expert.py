"""Type-B visual expert (CogVLM, Wang et al. 2023).

An image becomes ``[BOI] N image positions [EOI]`` in the sequence (BOI and EOI are learned vectors,
the N positions hold the connector's output, CogVLM's GLU adapter). In every decoder layer, the
positions of BOI and the image use their own copies of the attention's projections (q/k/v and the
output projection) and of the MLP, initialised from the LLM's weights; EOI and text use the LLM's
frozen weights. Attention is one joint causal softmax over all positions, as in the released code.
All image positions share one rotary position id (BOI, the image, EOI take three consecutive ids).

How it reaches the LLM without re-implementing it: forward hooks on the attention's projection
modules and on the MLP replace their output at expert positions with the expert copy's output on
the same input (the language weights still run on those positions; their result is discarded). The
copies live in this module, so the LLM's parameter names are unchanged. The routing mask and the
collapsed positions travel as the ``expert_context`` keyword of the LLM's forward; a pre-hook on the
decoder stack reads it, computes the position ids, and holds the mask for the hooks during that call
(for ``generate``, which rejects unknown keywords, it is set for the duration of the call). Decode
steps are text: language weights, positions continued from the prompt's last one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .base import FusionStrategy
from .layers import attention_module, decoder_layers
from .embedding import PLACEHOLDER_IDS, splice_media

BOI_IDS = {"image": -310, "audio": -311, "video": -312}
EOI_IDS = {"image": -320, "audio": -321, "video": -322}


@dataclass
class ExpertContext:
    """``route``: ``(B, L)`` positions the expert weights handle (BOI and media); ``collapsed``:
    ``(B, L)`` media positions after the first of their item, which repeat the previous position id."""

    route: torch.Tensor
    collapsed: torch.Tensor


def projection_names(attention: nn.Module) -> list[str]:
    """The attention module's projection children (q/k/v/o, or GPT-2's fused c_attn and c_proj)."""
    names = [name for name, child in attention.named_children() if hasattr(child, "weight") and child.weight.dim() == 2]
    if not names:
        raise ValueError(f"{type(attention).__name__}: found no projection layers to copy into a visual expert")
    return names


class VisualExpertFusion(FusionStrategy):
    survey_type = "B"

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList()
        self.boi = nn.ParameterDict()
        self.eoi = nn.ParameterDict()
        self._route: torch.Tensor | None = None
        self._generation_context: ExpertContext | None = None

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        return [BOI_IDS[modality], *[PLACEHOLDER_IDS[modality]] * num_tokens, EOI_IDS[modality]]

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        dim = llm.get_input_embeddings().embedding_dim
        std = getattr(llm.config.get_text_config(), "initializer_range", 0.02)
        self.boi = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * std) for m in media_dims})
        self.eoi = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * std) for m in media_dims})
        experts = []
        for layer in decoder_layers(llm):
            attention = attention_module(layer)
            mlp = getattr(layer, "mlp", None)
            if mlp is None:
                raise ValueError(f"{type(layer).__name__}: no 'mlp' module to copy into a visual expert")
            originals = {name: getattr(attention, name) for name in projection_names(attention)} | {"mlp": mlp}
            copies = nn.ModuleDict({name: copy.deepcopy(module) for name, module in originals.items()})
            for name, module in originals.items():
                module.register_forward_hook(self._hook(copies[name]))
            experts.append(copies)
        self.experts = nn.ModuleList(experts)
        decoder = llm.get_decoder()
        decoder.register_forward_pre_hook(self._enter, with_kwargs=True)
        decoder.register_forward_hook(self._exit)

    def _hook(self, expert: nn.Module):
        def run(module, args, output):
            route = self._route
            if route is None or route.shape != args[0].shape[:2]:
                return output
            expert_out = expert(args[0][route])  # (n, out): only the expert positions
            return output.masked_scatter(route.unsqueeze(-1), expert_out.to(output.dtype))

        return run

    def _enter(self, module, args, kwargs):
        context = kwargs.pop("expert_context", None) or self._generation_context
        if context is None:
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        extra = length - context.route.shape[1]
        if extra < 0:  # a cached decode step: text, its position continued past the collapsed media
            self._route = None
            if kwargs.get("position_ids") is None:
                raise ValueError("visual expert: a decode step came without position_ids to continue from")
            kwargs["position_ids"] = kwargs["position_ids"] - context.collapsed.sum(dim=1, keepdim=True)
            return args, kwargs
        route, collapsed = (nn.functional.pad(t, (0, extra)) for t in (context.route, context.collapsed))
        present = mask[:, -length:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(route)
        kwargs["position_ids"] = ((present & ~collapsed).long().cumsum(dim=1) - 1).clamp(min=0)
        self._route = route
        return args, kwargs

    def _exit(self, module, args, output):
        self._route = None

    def llm_inputs(self, llm, input_ids, media):
        """-> ``{"inputs_embeds": (B, L, d), "expert_context": ExpertContext}``."""
        embeds = splice_media(llm.get_input_embeddings()(input_ids.clamp(min=0)), input_ids, media)
        route = torch.zeros_like(input_ids, dtype=torch.bool)
        collapsed = torch.zeros_like(route)
        for modality in self.boi:
            boi, eoi = input_ids == BOI_IDS[modality], input_ids == EOI_IDS[modality]
            embeds = torch.where(boi.unsqueeze(-1), self.boi[modality].to(embeds.dtype), embeds)
            embeds = torch.where(eoi.unsqueeze(-1), self.eoi[modality].to(embeds.dtype), embeds)
            placeholder = input_ids == PLACEHOLDER_IDS[modality]
            first = placeholder & ~nn.functional.pad(placeholder, (1, 0))[:, :-1]
            route |= boi | placeholder
            collapsed |= placeholder & ~first
        return {"inputs_embeds": embeds, "expert_context": ExpertContext(route, collapsed)}

    @contextlib.contextmanager
    def generation_inputs(self, inputs: dict) -> Iterator[dict]:
        """``llm.generate`` accepts no extra keywords: the routing context is set for the call instead."""
        inputs = dict(inputs)
        self._generation_context = inputs.pop("expert_context")
        try:
            yield inputs
        finally:
            self._generation_context = None
