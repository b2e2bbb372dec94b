"""Type-C, non-tokenized early fusion (LLaVA, BLIP-2, Qwen-Audio): connector outputs are spliced
into the LLM's input embeddings at placeholder positions. The LLM itself is untouched."""

from __future__ import annotations

import torch
from torch import nn

from .base import FusionStrategy

# Sentinel ids for placeholder positions (as LLaVA's IMAGE_TOKEN_INDEX = -200): never looked up in
# the embedding table, so the LLM's vocabulary stays as it is.
PLACEHOLDER_IDS = {"image": -200, "audio": -201, "video": -202, "text_prompt": -203}


class EmbeddingFusion(FusionStrategy):
    survey_type = "C"

    def layout(self, modality: str, num_tokens: int) -> list[int]:
        return [PLACEHOLDER_IDS[modality]] * num_tokens

    def attach(self, llm: nn.Module, media_dims: dict[str, int]) -> None:
        return None

    def llm_inputs(self, llm, input_ids, media):
        """-> ``{"inputs_embeds": (B, L, d_llm)}`` with media vectors at placeholder positions."""
        return {"inputs_embeds": splice_media(llm.get_input_embeddings()(input_ids.clamp(min=0)), input_ids, media)}


def splice_media(embeds: torch.Tensor, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
    """``embeds`` ``(B, L, d)`` with each modality's connector outputs ``(items, tokens, d)`` written, in
    order, at its placeholder positions of ``input_ids``; ValueError when the counts differ."""
    masks = {m: input_ids == p for m, p in PLACEHOLDER_IDS.items()}
    counts = torch.stack([mask.sum() for mask in masks.values()]).tolist()  # one device sync
    for (modality, mask), n_positions in zip(masks.items(), counts):
        features = media.get(modality)
        n_features = 0 if features is None else features.shape[0] * features.shape[1]
        if n_positions != n_features:
            raise ValueError(
                f"{modality}: the batch has {n_positions} placeholder positions but the connector produced "
                f"{n_features} feature vectors; the processor's layout and the media do not match"
            )
        if n_positions:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    return embeds
