"""Type-B mixture of experts inside the LLM (MoE-LLaVA, Lin et al. 2024).

Media enter as in Type-C (connector outputs spliced into the input embeddings); the Type-B part is
that the dense FFN of every ``every``-th decoder layer (MoE-LLaVA: every other, ``range(L)[::2]``) is
replaced by ``num_experts`` copies of it (default 4) and a linear router sending each token to its
``top_k`` experts (default 2), weighted by the router's softmax renormalised over the chosen ones.
The copies start identical, so the model starts as the dense LLM; only the router breaks the symmetry,
which the auxiliary balance loss (Switch Transformer's ``E * sum_e f_e * P_e``, weight 0.01) keeps
from collapsing onto one expert. Token dropping by capacity factor is not reproduced: every token is
processed by its top-k experts.

The dense FFN module of a replaced layer is swapped for a parameter-free forwarder into this module,
so the experts and routers are this module's parameters (the ``fusion`` group) and the LLM holds no
unused copy. The balance loss of the last forward is :meth:`auxiliary_loss`; the model adds it to
the language-model loss.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .embedding import EmbeddingFusion
from .layers import decoder_layers, feed_forward


class MoEFeedForward(nn.Module):
    """``(B, L, d) -> (B, L, d)``: top-k routed copies of one dense FFN; records router probabilities."""

    def __init__(self, dense: nn.Module, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(num_experts))
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> output ``(B, L, d)`` and the balance loss of these tokens (a scalar)."""
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # (T, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(hidden.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot].unsqueeze(-1))
        num_experts = len(self.experts)
        dispatched = nn.functional.one_hot(chosen, num_experts).sum(dim=1).float().mean(dim=0) / self.top_k  # f_e
        balance = num_experts * (dispatched * probs.mean(dim=0)).sum()
        return out.view_as(hidden), balance


class _Forwarder(nn.Module):
    """Stands in for a replaced dense FFN inside the LLM; holds the MoE block unregistered."""

    def __init__(self, owner: "MoEFusion", index: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.index = index

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out, balance = self._owner.moe[self.index](hidden)
        self._owner._balance.append(balance)
        return out


class MoEFusion(EmbeddingFusion):
    survey_type = "B"

    def __init__(self, num_experts: int = 4, top_k: int = 2, every: int = 2, aux_loss_weight: float = 0.01):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe: top_k must be 1..num_experts ({num_experts}), got {top_k}")
        if every < 1 or aux_loss_weight < 0:
            raise ValueError(f"moe: every must be >= 1 and aux_loss_weight >= 0, got {every} and {aux_loss_weight}")
        self.num_experts, self.top_k, self.every, self.aux_loss_weight = num_experts, top_k, every, aux_loss_weight
        self.layer_indices: list[int] = []
        self.moe = nn.ModuleList()
        self._balance: list[torch.Tensor] = []

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        dim = llm.get_input_embeddings().embedding_dim
        layers = decoder_layers(llm)
        self.layer_indices = list(range(len(layers)))[:: self.every]
        blocks = []
        for slot, index in enumerate(self.layer_indices):
            blocks.append(MoEFeedForward(feed_forward(layers[index], "to turn into experts"), dim, self.num_experts, self.top_k))
            layers[index].mlp = _Forwarder(self, slot)
        self.moe = nn.ModuleList(blocks)

    def llm_inputs(self, llm, input_ids, media):
        self._balance = []  # a new forward: the balance losses of the previous one are spent
        return super().llm_inputs(llm, input_ids, media)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``aux_loss_weight`` x the mean balance loss over the MoE layers of the last forward."""
        if not self._balance:
            return None
        return self.aux_loss_weight * torch.stack(self._balance).mean()
