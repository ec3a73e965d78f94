"""Metric functions against the libraries' own outputs (rouge-score, sacrebleu) and against hand computations."""

import itertools
import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from dsunlearn.eval.metrics import (
    DEFAULT_REPRODUCTION_THRESHOLD,
    ROUGE_PRESETS,
    bleu,
    bootstrap_ci,
    distinct_n,
    perplexity,
    reproduces,
    reproduction_rate,
    rouge_l,
    word_tokens,
)

# The cases of issue #10's table, where the hand-written ROUGE-L disagreed with rouge-score.
STEMMED_CANDIDATE, STEMMED_REFERENCE = "he running to the banks", "he runs to the bank"
CJK_TEXT = "我们今天去银行"


def _library_rouge_l(candidate, reference, measure, stemmer):
    score = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer).score(reference, candidate)["rougeL"]
    return {"recall": score.recall, "precision": score.precision, "f1": score.fmeasure}[measure]


def test_word_tokens_lowercases_and_drops_punctuation():
    assert word_tokens("Don't stop, NOW!") == ["don", "t", "stop", "now"]
    assert word_tokens("  \n\t ") == []
    assert word_tokens("Über 2 cafés") == ["über", "2", "cafés"]
    with pytest.raises(TypeError):
        word_tokens(None)


def test_rouge_l_on_the_issue_table_equals_rouge_score():
    # Stems: running -> run, runs -> run, banks -> bank: every reference word is matched (by hand: 0.6 unstemmed).
    assert rouge_l(STEMMED_CANDIDATE, STEMMED_REFERENCE, "recall", stemmer=True) == 1.0
    assert rouge_l(STEMMED_CANDIDATE, STEMMED_REFERENCE, "recall", stemmer=False) == pytest.approx(3 / 5)
    # rouge-score's tokenizer keeps only [a-z0-9]: a CJK text has no token, and scores 0 even against itself.
    assert rouge_l(CJK_TEXT, CJK_TEXT, "recall") == 0.0
    assert rouge_l(CJK_TEXT, CJK_TEXT, "f1", stemmer=False) == 0.0
    assert rouge_l("", "", "f1") == 0.0
    cases = [(STEMMED_CANDIDATE, STEMMED_REFERENCE), (CJK_TEXT, CJK_TEXT), ("", ""), ("", "word"),
             ("The cat was on a mat.", "the cat sat on the mat"), ("mat the on sat cat the", "the cat sat on the mat")]
    measures = ("recall", "precision", "f1")
    for (candidate, reference), measure, stemmer in itertools.product(cases, measures, (True, False)):
        expected = _library_rouge_l(candidate, reference, measure, stemmer)
        assert rouge_l(candidate, reference, measure, stemmer) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_by_hand_and_argument_order():
    # LCS of "the dog sat mat" and "the cat sat on the mat" is "the sat mat": P = 3/4, R = 3/6, F = 0.6.
    assert rouge_l("the dog sat mat", "the cat sat on the mat", "precision", stemmer=False) == pytest.approx(3 / 4)
    assert rouge_l("the dog sat mat", "the cat sat on the mat", "recall", stemmer=False) == pytest.approx(3 / 6)
    assert rouge_l("the dog sat mat", "the cat sat on the mat", "f1", stemmer=False) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="measure"):
        rouge_l("a", "a", "rouge1")
    with pytest.raises(TypeError):
        rouge_l(None, "a")


def test_presets():
    assert ROUGE_PRESETS == {"tofu": ("recall", True), "muse": ("f1", False)}
    measure, stemmer = ROUGE_PRESETS["tofu"]
    assert rouge_l(STEMMED_CANDIDATE, STEMMED_REFERENCE, measure, stemmer) == 1.0
    measure, stemmer = ROUGE_PRESETS["muse"]
    # Without the stemmer "he ... to the" (3 words) match; P = R = 3/5.
    assert rouge_l(STEMMED_CANDIDATE, STEMMED_REFERENCE, measure, stemmer) == pytest.approx(
        _library_rouge_l(STEMMED_CANDIDATE, STEMMED_REFERENCE, "f1", False)
    ) == pytest.approx(3 / 5)


def test_bleu_equals_sacrebleu_sentence_bleu():
    cases = [("the cat sat on the mat", "the cat sat on the mat"), ("the cat sat on the mat", "the cat is on the mat"),
             ("Hello, world!", "hello world"), ("", ""), ("completely different", "nothing shared here")]
    for candidate, reference in cases:
        assert bleu(candidate, reference) == pytest.approx(sacrebleu.sentence_bleu(candidate, [reference]).score)
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert bleu("", "") == 0.0


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
    # The stemmer decides whether the issue's pair reproduces at threshold 1.
    assert reproduces(STEMMED_CANDIDATE, STEMMED_REFERENCE, 1.0, "recall", stemmer=True)
    assert not reproduces(STEMMED_CANDIDATE, STEMMED_REFERENCE, 1.0, "recall", stemmer=False)
    # F1 penalises the candidate's extra word: "alpha and beta" has P = 2/3, R = 1, F = 0.8.
    assert reproduction_rate(candidates, references, threshold=0.9, measure="f1") == pytest.approx(0 / 4)
    assert reproduction_rate(candidates, references, threshold=0.8, measure="f1") == pytest.approx(1 / 4)


def test_reproduction_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        reproduction_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        reproduction_rate([], [])
    with pytest.raises(ValueError, match="threshold"):
        reproduces("a", "a", threshold=1.5)


def _exact_percentile_interval(statistic, n, level):
    """The percentile interval of the exact bootstrap distribution: every one of the n**n ordered resamples."""
    resampled = [statistic(list(indices)) for indices in itertools.product(range(n), repeat=n)]
    return tuple(np.percentile(resampled, [50 * (1 - level), 50 * (1 + level)]))


def test_bootstrap_ci_mean_against_the_exact_bootstrap_distribution():
    values = [1.0, 2.0, 4.0, 8.0]
    exact = _exact_percentile_interval(lambda idx: np.mean([values[i] for i in idx]), 4, 0.95)
    assert exact == (1.5, 6.5)
    low, high = bootstrap_ci(values, n_resamples=20000)
    assert (low, high) == pytest.approx(exact)
    exact_80 = _exact_percentile_interval(lambda idx: np.mean([values[i] for i in idx]), 4, 0.8)
    assert bootstrap_ci(values, confidence_level=0.8, n_resamples=20000) == pytest.approx(exact_80)
    # Seeded: the same interval twice; it contains the statistic.
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    low, high = bootstrap_ci(values)
    assert low <= np.mean(values) <= high


def test_bootstrap_ci_ratio_resamples_whole_samples_paired():
    numerators, denominators = [1.0, 2.0, 6.0, 3.0], [1.0, 4.0, 2.0, 5.0]

    def ratio(idx):
        return sum(numerators[i] for i in idx) / sum(denominators[i] for i in idx)

    exact = _exact_percentile_interval(ratio, 4, 0.95)
    assert bootstrap_ci((numerators, denominators), "ratio", n_resamples=20000) == pytest.approx(exact)
    low, high = bootstrap_ci((numerators, denominators), "ratio")
    assert low <= sum(numerators) / sum(denominators) <= high
    # Unpaired resampling would give another interval: the pairing matters.
    unpaired = _exact_percentile_interval(lambda idx: sum(numerators[i] for i in idx) / sum(denominators), 4, 0.95)
    assert exact != pytest.approx(unpaired)


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci(([], []), "ratio") is None
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci(([1.0, 2.0], [2.0, 4.0]), "ratio") == (0.5, 0.5)
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci([1.0, 2.0], statistic="median")
    with pytest.raises(ValueError, match="confidence_level"):
        bootstrap_ci([1.0, 2.0], confidence_level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_ci(([1.0, 2.0], [1.0]), "ratio")


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
