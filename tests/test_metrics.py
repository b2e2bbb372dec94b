"""Evaluation metrics against values computed by hand on tiny constructed cases."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mmfuse.eval.metrics import bleu4, cider_d, perplexity, tokenize, vqa_accuracy, word_error_rate

from conftest import TINY_LLMS


# ---- VQA accuracy ----------------------------------------------------------------------------

def test_vqa_accuracy_with_few_references_scores_any_match_as_one():
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0  # normalize_answer drops case, punctuation, articles
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    assert vqa_accuracy("dog", ["cat", "a dog"]) == 1.0


def test_vqa_accuracy_with_three_or_more_references_is_min_one_matches_over_three():
    refs = ["red", "red", "blue", "green", "green", "green", "green", "green", "green", "green"]
    assert vqa_accuracy("red", refs) == pytest.approx(2 / 3)
    assert vqa_accuracy("blue", refs) == pytest.approx(1 / 3)
    assert vqa_accuracy("green", refs) == 1.0  # 7 matches, capped at 1
    assert vqa_accuracy("pink", refs) == 0.0


def test_vqa_accuracy_needs_a_reference():
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


# ---- BLEU-4 ----------------------------------------------------------------------------------

def test_tokenize_lowercases_strips_punctuation_and_keeps_articles():
    assert tokenize("The cat, a dog!") == ["the", "cat", "a", "dog"]


def test_bleu4_corpus_counts_by_hand():
    # Sentence 1: "one two three four five" (c=5), refs of length 5 and 2 -> closest r=5.
    #   clipped matches / totals: 1-grams 4/5 (five misses), 2-grams 3/4, 3-grams 2/3, 4-grams 1/2.
    # Sentence 2: "red red red" (c=3), refs of length 4 and 2 both 1 away -> tie goes to the shorter, r=2.
    #   1-grams: red x3 clipped to 2 (max count in one ref) -> 2/3; 2-grams: (red red) x2 clipped to 1 -> 1/2;
    #   3-grams: 0/1; 4-grams: 0/0.
    # Corpus: p1 = 6/8, p2 = 4/6, p3 = 2/4, p4 = 1/2; c = 8 > r = 7 so BP = 1
    # (had the tie gone to the longer reference, r = 9 and BP = exp(1 - 9/8)).
    # BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** (1/4).
    predictions = ["one two three four five", "red red red"]
    references = [["one two three four six", "one two"], ["red green blue yellow", "red red"]]
    assert bleu4(predictions, references) == pytest.approx((1 / 8) ** 0.25)


def test_bleu4_brevity_penalty():
    # All precisions are 1; c = 4, r = 6 -> BP = exp(1 - 6/4) = exp(-0.5). Case and punctuation are ignored.
    assert bleu4(["One, two three four."], [["one two three four five six"]]) == pytest.approx(math.exp(-0.5))


def test_bleu4_is_one_on_exact_match_and_zero_without_any_four_gram_match():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # 4-grams: "the cat sat on", "cat sat on the", "sat on the mat" -- none is in the reference.
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0
    assert bleu4(["cat"], [["cat"]]) == 0.0  # no 4-gram at all: precision 0/0, no smoothing


@pytest.mark.parametrize("metric", [bleu4, cider_d])
def test_corpus_metrics_reject_bad_inputs(metric):
    with pytest.raises(ValueError):
        metric(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        metric([], [])
    with pytest.raises(ValueError):
        metric(["a"], [[]])
    with pytest.raises(ValueError):
        metric(["a"], ["a"])  # a bare string instead of a list of references


# ---- CIDEr-D ---------------------------------------------------------------------------------

def test_cider_d_two_image_corpus_by_hand():
    # N = 2 images, L = log 2. Document frequency counts each image's reference set once:
    #   "red" is in both sets (twice in image 1's) -> df 2 -> idf log 2 - log 2 = 0;
    #   every other n-gram has df <= 1 -> idf L.
    # Image 1, candidate "red ball" (len 2): vectors n1 {red: 0, ball: L}, n2 {(red ball): L}, n3 = n4 = {}.
    #   ref "red ball": identical, sims (1, 1, 0, 0), length penalty 1 -> mean over n 1/2.
    #   ref "red ball on grass" (len 4): n1 {red: 0, ball, on, grass: L}, norm sqrt(3) L, dot L^2 -> 1/sqrt(3);
    #     n2 {(red ball), (ball on), (on grass): L} -> 1/sqrt(3); n3, n4: 0 (empty candidate vectors).
    #     mean over n 2/sqrt(3)/4 = 1/(2 sqrt(3)); penalty exp(-(2-4)^2 / (2 * 36)) = exp(-1/18).
    #   score 1 = 10 * (1/2 + exp(-1/18) / (2 sqrt(3))) / 2 references.
    # Image 2, candidate "cube cube": n1 {cube: 2L} (norm 2L), n2 {(cube cube): L};
    #   ref "red cube": n1 {red: 0, cube: L}, n2 {(red cube): L}.
    #   n1 clipped dot: min(2L, L) * L = L^2 -> sim L^2 / (2L * L) = 1/2 (unclipped it would be 1); n2 dot 0.
    #   score 2 = 10 * (1/2) / 4 = 1.25.
    expected_1 = 10 * (0.5 + math.exp(-1 / 18) / (2 * math.sqrt(3))) / 2
    expected = (expected_1 + 1.25) / 2
    predictions = ["red ball", "cube cube"]
    references = [["red ball", "Red ball on grass."], ["red cube"]]
    assert cider_d(predictions, references) == pytest.approx(expected)


def test_cider_d_single_image_corpus_is_zero():
    # With N = 1 every idf is log 1 - log 1 = 0, so every vector is zero.
    assert cider_d(["a red ball"], [["a red ball"]]) == 0.0


def test_cider_d_unseen_candidate_ngrams_score_zero():
    assert cider_d(["blue cube", "green cone"], [["red ball"], ["red ball"]]) == 0.0


# ---- WER -------------------------------------------------------------------------------------

def test_word_error_rate_substitution_and_deletion():
    # "cat" -> "dog" (1 substitution), "down" dropped (1 deletion): 2 errors / 4 reference words.
    assert word_error_rate(["the dog sat"], ["the cat sat down"]) == pytest.approx(0.5)


def test_word_error_rate_is_corpus_weighted():
    # 1 insertion over 2 + 4 reference words = 1/6 (the mean of per-sentence rates would be 1/4).
    assert word_error_rate(["a b c", "w x y z"], ["a b", "w x y z"]) == pytest.approx(1 / 6)


def test_word_error_rate_rejects_bad_inputs():
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        word_error_rate([], [])
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["  "])


# ---- perplexity ------------------------------------------------------------------------------

TEXTS = ["what colour is the circle? red.", "a small blue square at the top left."]


@pytest.fixture
def lm_and_tokenizer(plain_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(plain_tokenizer_dir))
    llm = {k: v for k, v in TINY_LLMS["llama"].items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**llm, vocab_size=320)).eval()
    return model, tokenizer


def _manual_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of one unpadded sequence via log_softmax + gather."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
    targets = torch.tensor(ids[1:])
    return -log_probs.gather(1, targets[:, None]).sum().item(), len(targets)


def test_perplexity_matches_a_manual_computation(lm_and_tokenizer):
    model, tokenizer = lm_and_tokenizer
    ids = tokenizer(TEXTS[0])["input_ids"]
    nll, count = _manual_nll(model, ids)
    assert perplexity(model, tokenizer, TEXTS[:1]) == pytest.approx(math.exp(nll / count), rel=1e-5)
    nll, count = _manual_nll(model, ids[:5])
    assert perplexity(model, tokenizer, TEXTS[:1], max_length=5) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_padding_does_not_change_the_value(lm_and_tokenizer):
    model, tokenizer = lm_and_tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert lengths[0] != lengths[1]
    per_text = [_manual_nll(model, tokenizer(t)["input_ids"]) for t in TEXTS]
    token_weighted = math.exp(sum(n for n, _ in per_text) / sum(c for _, c in per_text))
    batched = perplexity(model, tokenizer, TEXTS, batch_size=2)
    one_at_a_time = perplexity(model, tokenizer, TEXTS, batch_size=1)
    assert batched == pytest.approx(token_weighted, rel=1e-5)
    assert one_at_a_time == pytest.approx(token_weighted, rel=1e-5)


def test_perplexity_restores_training_mode(lm_and_tokenizer):
    model, tokenizer = lm_and_tokenizer
    model.train()
    perplexity(model, tokenizer, TEXTS)
    assert model.training
    model.eval()
    perplexity(model, tokenizer, TEXTS)
    assert not model.training


def test_perplexity_rejects_bad_inputs(lm_and_tokenizer):
    model, tokenizer = lm_and_tokenizer
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, [])
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, TEXTS, batch_size=0)
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, [""])  # nothing to predict
