"""One evaluation interface for every model: generate replies, score candidate replies by likelihood,
embed media for retrieval, and measure text perplexity.

Every fusion type is a :class:`~mmfuse.model.MultimodalLM`, and a plain Hugging Face causal LM (hub
id or local directory) loads as a text-only ``MultimodalLM``, so the same evaluation code scores
all of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import LLMConfig, MultimodalConfig
from ..data.processor import IGNORE_INDEX
from ..data.schema import Message, Sample
from ..model import MultimodalLM
from ..modes import training_mode
from .metrics import perplexity
from .retrieval import embed_items


class EvalAdapter:
    """Wraps a :class:`MultimodalLM` for evaluation; batches of ``batch_size`` samples."""

    def __init__(self, model: MultimodalLM, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_path: str | Path, batch_size: int = 32) -> "EvalAdapter":
        """An mmfuse checkpoint directory, or any HF causal LM (hub id or path) as a text-only model."""
        if MultimodalLM.is_checkpoint(name_or_path):
            return cls(MultimodalLM.from_pretrained(name_or_path), batch_size)
        model = MultimodalLM.from_config(MultimodalConfig(llm=LLMConfig(name_or_path=str(name_or_path))))
        return cls(model.eval(), batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 16) -> list[str]:
        """Greedy replies, one per sample (a final assistant turn, if any, is dropped)."""
        out = []
        with training_mode(self.model, False):
            for start in range(0, len(samples), self.batch_size):
                out += self.model.answer(samples[start : start + self.batch_size], max_new_tokens=max_new_tokens, do_sample=False)
        return out

    @torch.no_grad()
    def generate_media(self, samples: list[Sample], modality: str, **generate_kwargs) -> list[torch.Tensor | None]:
        """One ``modality`` item generated per sample (Type-D), from the sample's prompt alone: its final
        assistant turn and its media are dropped. Greedy unless ``generate_kwargs`` say otherwise; None
        where generation stopped before the item was complete."""
        prompts = [Sample(s.id, s.prompt_and_answer()[0] if s.messages[-1].role == "assistant" else s.messages, {}, s.meta)
                   for s in samples]
        span = self.model.span_length(modality)
        generate_kwargs = {"do_sample": False, "max_new_tokens": span + 2, **generate_kwargs}
        out = []
        with training_mode(self.model, False):
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                batch = self.model.collator("left")([self.model.processor(s, for_generation=True) for s in chunk])
                tokens = self.model.generate(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                             outputs=(modality,), **generate_kwargs)
                out += [next((item.cpu() for m, item in items if m == modality), None) for _, items in self.model.decode_output(tokens)]
        return out

    @torch.no_grad()
    def score(self, samples: list[Sample], candidates: list[str]) -> torch.Tensor:
        """``(len(samples), len(candidates))`` summed log-likelihood of each candidate as the assistant's
        final reply (its end-of-turn token included, so every candidate is scored as a full answer)."""
        if not candidates:
            raise ValueError("score: no candidates given")
        filled = [
            dataclasses.replace(s, messages=[*s.prompt_and_answer()[0], Message("assistant", c)] if s.messages[-1].role == "assistant"
                                else [*s.messages, Message("assistant", c)])
            for s in samples for c in candidates
        ]
        scores = []
        with training_mode(self.model, False):
            for start in range(0, len(filled), self.batch_size):
                batch = self.model.collator()([self.model.processor(s) for s in filled[start : start + self.batch_size]])
                logits = self.model(
                    batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                    media={m: t.to(self.device) for m, t in batch["media"].items()},
                ).logits.float()
                labels = batch["labels"][:, 1:].to(self.device)
                logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores.append((logp * (labels != IGNORE_INDEX)).sum(dim=1).cpu())
        return torch.cat(scores).view(len(samples), len(candidates))

    @torch.no_grad()
    def embed(self, modality: str, items: list) -> torch.Tensor:
        """``(len(items), d)`` :meth:`~mmfuse.model.MultimodalLM.embed_media` of media files or arrays (for retrieval)."""
        with training_mode(self.model, False):
            return embed_items(self.model, modality, items, self.batch_size, self.device)

    def text_perplexity(self, texts: list[str]) -> float:
        """Perplexity of the fused model on plain text (no template, no media): what fusion did to the
        LLM's text ability, including blocks that run on text (Type-A's gated feed-forward layers)."""
        return perplexity(self.model, self.model.tokenizer, texts, batch_size=self.batch_size)
