"""Metric functions against values worked out by hand."""

import math

import pytest

from dsunlearn.metrics import (
    DEFAULT_REPRODUCTION_THRESHOLD,
    distinct_n,
    lcs_length,
    perplexity,
    reproduces,
    reproduction_rate,
    rouge_l_f1,
    rouge_l_recall,
    word_tokens,
)


def test_word_tokens_lowercases_and_drops_punctuation():
    assert word_tokens("Don't stop, NOW!") == ["don", "t", "stop", "now"]
    assert word_tokens("  \n\t ") == []
    assert word_tokens("Über 2 cafés") == ["über", "2", "cafés"]
    with pytest.raises(TypeError):
        word_tokens(None)


def test_lcs_length_hand_computed():
    # a b c b d a b  vs  b d c a b a : a classic LCS example (CLRS 15.4) with LCS length 4 ("b c b a").
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_length(list("bdcaba"), list("abcbdab")) == 4
    assert lcs_length([], ["x"]) == 0
    assert lcs_length(["x", "y"], ["y", "x"]) == 1


def test_rouge_l_recall_hand_computed():
    reference = "the cat sat on the mat"  # 6 words
    # LCS with "the cat was on a mat" is "the cat on mat": 4 of 6 reference words.
    assert rouge_l_recall("The cat was on a mat.", reference) == pytest.approx(4 / 6)
    # Extra candidate words do not lower recall.
    assert rouge_l_recall("well, the cat sat on the mat today", reference) == 1.0
    # Order matters: against the reversed reference the LCS is a palindromic subsequence; only "the" repeats,
    # so the longest is "the <one word> the" (e.g. "the cat the"): 3 of 6 words.
    assert rouge_l_recall("mat the on sat cat the", reference) == pytest.approx(3 / 6)
    assert rouge_l_recall("", reference) == 0.0
    assert rouge_l_recall("anything", "?!") == 0.0


def test_rouge_l_f1_hand_computed():
    # candidate 4 words, reference 6 words, LCS 3 ("the", "sat", "mat"): P = 3/4, R = 3/6, F = 2PR/(P+R) = 0.6
    assert rouge_l_f1("the dog sat mat", "the cat sat on the mat") == pytest.approx(0.6)
    assert rouge_l_f1("a b", "b a") == pytest.approx(0.5)
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("", "word") == 0.0
    assert rouge_l_f1("x y", "z") == 0.0


def test_reproduction_rate_uses_threshold_inclusively():
    references = ["one two three four", "one two three four", "alpha beta", "alpha beta"]
    candidates = [
        "one two",  # recall 2/4 = 0.5: reproduces at the default threshold (>=)
        "one",  # 1/4
        "alpha and beta",  # 2/2
        "gamma",  # 0/2
    ]
    assert DEFAULT_REPRODUCTION_THRESHOLD == 0.5
    assert reproduces("one two", "one two three four")
    assert not reproduces("one", "one two three four")
    assert reproduction_rate(candidates, references) == pytest.approx(2 / 4)
    assert reproduction_rate(candidates, references, threshold=0.25) == pytest.approx(3 / 4)
    assert reproduction_rate(candidates, references, threshold=1.0) == pytest.approx(1 / 4)
    assert reproduction_rate(candidates, references, threshold=0.0) == 1.0


def test_reproduction_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        reproduction_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        reproduction_rate([], [])
    with pytest.raises(ValueError, match="threshold"):
        reproduces("a", "a", threshold=1.5)


def test_distinct_n_hand_computed():
    texts = ["the cat the cat", "the dog"]
    # unigrams: the cat the cat the dog -> 6 total, {the, cat, dog} = 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams within texts only: (the cat)(cat the)(the cat) + (the dog) -> 4 total, 3 distinct;
    # the cross-text bigram (cat, the) at the boundary must not be counted a second time.
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a b c"], 2) == 1.0
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_perplexity_from_summed_nll():
    # Three tokens each with probability 1/4 -> NLL sum 3 ln 4 -> perplexity 4.
    assert perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert perplexity(0.0, 5) == 1.0
    # Mean NLL 2 nats over 10 tokens.
    assert perplexity(20.0, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one token"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        perplexity(-1.0, 2)
