"""Question answering accuracy by question kind: generate greedily, compare with the reference."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable

import torch

from ..data.schema import Sample

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def evaluate_qa(
    model,
    samples: list[Sample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``{"accuracy", "count", "by_kind": {kind: {"accuracy", "count"}}, "predictions": [...]}``.

    The question kind comes from ``sample.meta["kind"]`` ("all" when absent); the reference is the
    sample's final assistant turn.
    """
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            answers = model.answer(chunk, max_new_tokens=max_new_tokens, do_sample=False)
            for sample, answer in zip(chunk, answers):
                reference = sample.prompt_and_answer()[1]
                ok = exact_match(answer, reference)
                hits[sample.meta.get("kind", "all")].append(ok)
                predictions.append({"id": sample.id, "kind": sample.meta.get("kind", "all"), "prediction": answer,
                                    "reference": reference, "correct": ok})
            if progress:
                progress(min(start + batch_size, len(samples)), len(samples))
    model.train(was_training)
    every = [ok for oks in hits.values() for ok in oks]
    return {
        "accuracy": sum(every) / max(len(every), 1),
        "count": len(every),
        "by_kind": {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(hits.items())},
        "predictions": predictions,
    }
