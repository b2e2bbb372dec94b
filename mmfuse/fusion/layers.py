"""Where a Hugging Face causal LM keeps its decoder layers, their self-attention and feed-forward
modules, and how many attention heads it has.

Found by structure rather than by a per-architecture table: the decoder layers are the ModuleList
as long as the config's layer count; a layer's self-attention is the child that carries ``layer_idx``
and key/value projections (``k_proj``/``v_proj``, or GPT-2's fused ``c_attn``); its feed-forward
network is its ``mlp`` child (Llama, Qwen2, GPT-2 and most others). Anything else is a clear error
naming the model.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Hugging Face causal LM: the ModuleList as long as its layer count."""
    config = llm.config.get_text_config()
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in llm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(llm).__name__}: found no list of {n} decoder layers to attach fusion modules to")


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of a decoder layer: the child holding the layer index."""
    for module in layer.modules():
        if module is not layer and hasattr(module, "layer_idx") and (hasattr(module, "k_proj") or hasattr(module, "c_attn")):
            return module
    raise ValueError(f"{type(layer).__name__}: found no self-attention module with k_proj/v_proj or a fused c_attn "
                     "(Type-B fusion needs the layer's key and value projections)")


def attention_heads(llm: nn.Module) -> int:
    """The LLM's number of (query) attention heads."""
    config = llm.config.get_text_config()
    return getattr(config, "num_attention_heads", None) or config.n_head


def feed_forward(layer: nn.Module, purpose: str) -> nn.Module:
    """A decoder layer's feed-forward network; ``purpose`` completes the error message."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"{type(layer).__name__}: no 'mlp' module {purpose}")
    return mlp
