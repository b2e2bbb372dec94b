"""InternVL's QLLaMA: a language middleware between the image encoder and the LLM.

Learned queries (InternVL: 96) run through a copy of the LLM's first ``depth`` decoder layers,
initialised from the LLM's own weights (QLLaMA is initialised from LLaMA), with newly added
cross-attention to the encoder features before every ``cross_attention_every``-th copied layer; an MLP
maps the outputs into the LLM's input (InternVL-Chat's "glue"). Whatever the number of features,
each item becomes ``num_queries`` tokens.

The copied layers are the LLM's own Hugging Face modules, built from its config with ``depth``
layers (and no token embedding: the queries enter as embeddings), so nothing of the LLM is
re-implemented and the same code serves Llama, Qwen2 and GPT-2. The cross-attention is Type-A's gated
block (:class:`~mmfuse.fusion.cross_attention.GatedCrossAttentionBlock`, gates starting at 0, so the
middleware starts as the LLM reading the queries alone), run by the same pre-layer hooks, before
copied layers ``0, n, 2n, ...``; every query reads every feature of its own item. QLLaMA's own
cross-attention sits inside those layers, between self-attention and MLP, ungated. The queries attend
to each other with the LLM's own causal self-attention (QLLaMA's default mask; it also has an option
that lets the queries see each other both ways).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel

from ..fusion.cross_attention import CrossAttentionFusion, MediaContext
from ..fusion.layers import decoder_layers
from ..fusion.markers import init_std
from .projector import build_projector

FEATURES = "features"  # the one media key of the middleware's cross-attention blocks


def truncated_copy(llm: nn.Module, depth: int) -> nn.Module:
    """The base model (no LM head) of ``llm`` with its first ``depth`` decoder layers, their weights, its
    final norm and any position table copied; without a token embedding (inputs come as embeddings)."""
    layers = len(decoder_layers(llm))
    if not 1 <= depth <= layers:
        raise ValueError(f"qllama: depth must be 1..{layers} (the LLM's decoder layers to copy), got {depth}")
    config = copy.deepcopy(llm.config.get_text_config())
    config.num_hidden_layers = depth  # GPT-2's config maps this onto n_layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:depth]
    config.vocab_size = 1
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, name, None)
    middle = AutoModel.from_config(config)
    source = llm.base_model.state_dict()  # the class AutoModel builds from this config: the same names
    target = middle.state_dict()
    embedding = {f"{name}.weight" for name, module in middle.named_modules() if module is middle.get_input_embeddings()}
    missing = [k for k in target if k not in embedding and (k not in source or source[k].shape != target[k].shape)]
    if missing:
        raise ValueError(f"qllama: the {type(middle).__name__} built from the LLM's config has weights the LLM lacks: {missing[:5]}")
    middle.load_state_dict({k: source[k] for k in target if k not in embedding}, strict=False)
    middle.set_input_embeddings(None)  # the forward reads it only for input ids
    return middle


class LanguageMiddleware(nn.Module):
    """``(n, tokens, feature_dim) -> (n, num_queries, out_dim)`` through a truncated copy of ``llm``."""

    def __init__(self, feature_dim: int, out_dim: int, llm: nn.Module, *, num_queries: int = 96, depth: int = 2,
                 cross_attention_every: int = 2):
        super().__init__()
        if cross_attention_every < 1:
            raise ValueError(f"qllama: cross_attention_every must be >= 1, got {cross_attention_every}")
        self.middle = truncated_copy(llm, depth)
        width = llm.get_input_embeddings().embedding_dim
        self.queries = nn.Parameter(torch.randn(num_queries, width) * init_std(llm))
        self.cross = CrossAttentionFusion(every=cross_attention_every, placement="idefics")  # a block before layer 0
        self.cross.attach_blocks(self.middle, {FEATURES: feature_dim})
        self.proj = build_projector("mlp2x_gelu", width, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, tokens = features.shape[:2]
        heads = [block.split_heads(*block.media[FEATURES](features)) for block in self.cross.blocks]
        every_feature = torch.ones(n, tokens, dtype=torch.long, device=features.device)  # one item per row
        every_query = torch.ones(n, self.queries.shape[0], dtype=torch.long, device=features.device)
        context = MediaContext([k for k, _ in heads], [v for _, v in heads], every_feature, every_query)
        queries = self.queries.unsqueeze(0).expand(n, -1, -1).to(features.dtype)
        hidden = self.middle(inputs_embeds=queries, media_context=context, use_cache=False).last_hidden_state
        return self.proj(hidden)
