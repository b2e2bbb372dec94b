"""Pure-Python evaluation metrics: VQA accuracy, BLEU-4, CIDEr-D, WER and causal-LM perplexity."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch
import torch.nn.functional as F

from ..modes import training_mode


__all__ = ["bleu4", "cider_d", "exact_match", "normalize_answer", "perplexity", "tokenize", "vqa_accuracy",
           "word_error_rate"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_MAX_N = 4
_CIDER_SIGMA = 6.0


def _check_corpus(predictions: list, references: list) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("empty corpus: no predictions given")


def _check_reference_sets(references: list[list[str]]) -> None:
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] must be a list of strings, not a string")
        if not refs:
            raise ValueError(f"prediction {i} has no references")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    return " ".join(w for w in tokenize(text) if w not in ("a", "an", "the"))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def tokenize(text: str) -> list[str]:
    """Lowercase, replace punctuation by spaces and split on whitespace; articles are kept."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy of one prediction after ``normalize_answer``.

    With three or more references this is the VQA rule ``min(1, matches / 3)``. With fewer than three
    references (our datasets usually have a single answer) any match scores 1.0, so that a correct
    answer is never capped at 1/3 or 2/3 just because fewer annotators exist.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference")
    matches = sum(exact_match(prediction, ref) for ref in references)
    if len(references) < 3:
        return float(matches > 0)
    return min(1.0, matches / 3)


def _closest_ref_length(candidate_len: int, ref_lens: list[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(r - candidate_len), r))


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al., 2002) in [0, 1], without smoothing.

    Clipped n-gram matches and candidate n-gram totals are summed over the corpus for n = 1..4;
    the score is their geometric mean times the brevity penalty ``exp(1 - r / c)`` (1 when c > r),
    where c is the total candidate length and r the sum of each sentence's closest reference length
    (ties go to the shorter one). Any zero precision gives 0.0. Text goes through ``tokenize``.
    """
    _check_corpus(predictions, references)
    _check_reference_sets(references)
    matches, totals = [0] * _MAX_N, [0] * _MAX_N
    cand_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        cand = tokenize(prediction)
        ref_tokens = [tokenize(r) for r in refs]
        cand_len += len(cand)
        ref_len += _closest_ref_length(len(cand), [len(r) for r in ref_tokens])
        for n in range(1, _MAX_N + 1):
            counts = _ngrams(cand, n)
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / _MAX_N
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)


def _tfidf(counts: Counter, df: Counter, log_n: float) -> list[dict[tuple, float]]:
    """TF-IDF weights of the n-gram counts, split by n (index n - 1)."""
    vec: list[dict[tuple, float]] = [{} for _ in range(_MAX_N)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    return vec


def _norm(weights: dict[tuple, float]) -> float:
    return math.sqrt(sum(w * w for w in weights.values()))


def _cider_sim(cand: list[dict], ref: list[dict], cand_len: int, ref_len: int) -> float:
    """Mean over n of the clipped cosine similarity times the Gaussian length penalty.

    pycocoevalcap measures lengths in bigrams rather than words; the difference is the same whenever
    both sentences are non-empty, and an empty one scores 0 either way.
    """
    penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))
    total = 0.0
    for c, r in zip(cand, ref):
        dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in c.items())
        norms = _norm(c) * _norm(r)
        total += (dot / norms if norms else 0.0) * penalty
    return total / _MAX_N


def _all_ngrams(tokens: list[str]) -> Counter:
    counts = Counter()
    for n in range(1, _MAX_N + 1):
        counts.update(_ngrams(tokens, n))
    return counts


def cider_d(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al., 2015) with the arithmetic of pycocoevalcap's CiderD scorer.

    n = 1..4; document frequency counts each image's reference set once per n-gram; weights are
    ``tf * (log N - log max(1, df))`` with N the number of images; per n the candidate-reference
    similarity is ``sum_g min(c_g, r_g) * r_g / (|c| |r|)`` times ``exp(-(len_c - len_r)^2 / 72)``.
    An image scores 10 x the mean over n and references; the corpus score is the mean over images.
    Text goes through ``tokenize``.
    """
    _check_corpus(predictions, references)
    _check_reference_sets(references)
    ref_tokens = [[tokenize(r) for r in refs] for refs in references]
    ref_counts = [[_all_ngrams(r) for r in refs] for refs in ref_tokens]
    df = Counter(g for counts in ref_counts for g in set().union(*counts))
    log_n = math.log(float(len(predictions)))
    scores = []
    for prediction, refs, counts in zip(predictions, ref_tokens, ref_counts):
        cand = tokenize(prediction)
        cand_vec = _tfidf(_all_ngrams(cand), df, log_n)
        sims = [_cider_sim(cand_vec, _tfidf(c, df, log_n), len(cand), len(r)) for r, c in zip(refs, counts)]
        scores.append(10.0 * sum(sims) / len(sims))
    return sum(scores) / len(scores)


def word_error_rate(predictions: list[str], references: list[str]) -> float:
    """Corpus WER via ``jiwer``: (substitutions + deletions + insertions) / reference words.

    Words are whitespace-separated and compared case-sensitively (jiwer's default transform).
    """
    import jiwer

    _check_corpus(predictions, references)
    if not any(ref.split() for ref in references):
        raise ValueError("WER is undefined: the references contain no words")
    return float(jiwer.wer(reference=list(references), hypothesis=list(predictions)))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` into ``(input_ids, attention_mask, labels)``; labels are -100 on padding."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return input_ids, mask, labels


def _batch_nll(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens in one batch."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                          reduction="sum")
    return nll.item(), int((targets != -100).sum())


def perplexity(model, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int | None = None) -> float:
    """``exp`` of the token-weighted mean next-token NLL of a Hugging Face causal LM over ``texts``.

    Texts are tokenized with the tokenizer's defaults (so BOS follows its settings), truncated to
    ``max_length`` when given, and right-padded with the pad id (EOS, else 0, when there is none);
    padding is masked out of attention and loss, so batching does not change the value.
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    rows = [row for row in encoded if len(row) >= 2]  # a shorter text has no next token to predict
    if not rows:
        raise ValueError("no token to predict: every text is shorter than two tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    total_nll, total_tokens = 0.0, 0
    with training_mode(model, False), torch.no_grad():
        for start in range(0, len(rows), batch_size):
            nll, count = _batch_nll(model, *_pad(rows[start : start + batch_size], pad_id))
            total_nll += nll
            total_tokens += count
    return math.exp(total_nll / total_tokens)
