"""Type-B mixture of adapters inside the LLM's feed-forward layers (LION, Chen et al. 2024).

Media enter as in Type-C (connector outputs spliced into the input embeddings). Every decoder layer's
FFN gets ``num_adapters`` bottleneck adapters in parallel (``d -> rank -> d``, GELU; the up projection
starts at zero, so the model starts as the bare LLM) and a router that mixes them per token with a
softmax: ``FFN(x) + sum_k softmax(router(x))_k * adapter_k(x)``. LION trains the adapters for its
image-level and region-level knowledge together and lets the router weigh them; the frozen FFN is
untouched. It reaches the LLM through a forward hook on each FFN module, so no LLM module is replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from .embedding import EmbeddingFusion
from .layers import decoder_layers, feed_forward


class AdapterMixture(nn.Module):
    """``(..., d) -> (..., d)``: the router-weighted sum of ``num_adapters`` bottleneck adapters."""

    def __init__(self, dim: int, num_adapters: int, rank: int):
        super().__init__()
        self.router = nn.Linear(dim, num_adapters, bias=False)
        self.down = nn.Parameter(torch.randn(num_adapters, dim, rank) * dim**-0.5)
        self.up = nn.Parameter(torch.zeros(num_adapters, rank, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.router(x), dim=-1)  # (..., K)
        hidden = nn.functional.gelu(torch.einsum("...d,kdr->...kr", x, self.down.to(x.dtype)))
        outputs = torch.einsum("...kr,krd->...kd", hidden, self.up.to(x.dtype))  # (..., K, d)
        return (weights.unsqueeze(-1).to(x.dtype) * outputs).sum(dim=-2)

    def hook(self, module, args, output):
        return output + self(args[0])


class AdapterMixtureFusion(EmbeddingFusion):
    survey_type = "B"

    def __init__(self, num_adapters: int = 2, rank: int = 16):
        super().__init__()
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"adapter mixture: num_adapters and rank must be >= 1, got {num_adapters} and {rank}")
        self.num_adapters, self.rank = num_adapters, rank
        self.mixtures = nn.ModuleList()

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        dim = llm.get_input_embeddings().embedding_dim
        mixtures = []
        for layer in decoder_layers(llm):
            mixtures.append(mixture := AdapterMixture(dim, self.num_adapters, self.rank))
            feed_forward(layer, "to put adapters beside").register_forward_hook(mixture.hook)
        self.mixtures = nn.ModuleList(mixtures)
