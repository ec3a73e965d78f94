"""Text and likelihood metrics for evaluating unlearning: pure functions, no torch, no distribution.

Tokenisation for every text metric here (ROUGE-L, distinct-n) is :func:`word_tokens`: the text is
lower-cased and split into maximal runs of Unicode word characters (``re.findall(r"\\w+", ...)``),
so punctuation and whitespace separate words and never count as words themselves. Model
tokenizers are deliberately not used, so scores are comparable across models and vocabularies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

DEFAULT_REPRODUCTION_THRESHOLD = 0.5
"""ROUGE-L recall at or above which a generation counts as reproducing the reference response."""

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``: maximal runs of Unicode word characters (``\\w+``).

    ``"Don't stop, NOW!"`` → ``["don", "t", "stop", "now"]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len·len) time, O(len) memory)."""
    if len(first) < len(second):
        first, second = second, first
    # previous[j] = LCS of first[:i-1] and second[:j]; one row suffices.
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0] * (len(second) + 1)
        for j, other in enumerate(second, start=1):
            current[j] = previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_recall(candidate: str, reference: str) -> float:
    """ROUGE-L recall: LCS(candidate, reference) / number of reference words, in [0, 1].

    Words come from :func:`word_tokens`. It measures how much of ``reference`` appears, in order,
    in ``candidate``; extra words in the candidate do not lower it. A reference without any word
    scores 0.0 (nothing can be said to be reproduced).
    """
    reference_words = word_tokens(reference)
    if not reference_words:
        return 0.0
    return lcs_length(word_tokens(candidate), reference_words) / len(reference_words)


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (harmonic mean of LCS precision and recall over :func:`word_tokens`), in [0, 1].

    Symmetric in its arguments; used as the similarity of two generations. Two texts without any
    word score 1.0 (identical); one empty and one non-empty score 0.0.
    """
    candidate_words, reference_words = word_tokens(candidate), word_tokens(reference)
    if not candidate_words and not reference_words:
        return 1.0
    common = lcs_length(candidate_words, reference_words)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def reproduces(candidate: str, reference: str, threshold: float = DEFAULT_REPRODUCTION_THRESHOLD) -> bool:
    """Whether ``candidate`` reproduces ``reference``: ``rouge_l_recall(candidate, reference) >= threshold``.

    With the default threshold 0.5 a generation reproduces a forget response when at least half of
    the response's words appear in it in the same order.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return rouge_l_recall(candidate, reference) >= threshold


def reproduction_rate(
    candidates: Sequence[str], references: Sequence[str], threshold: float = DEFAULT_REPRODUCTION_THRESHOLD
) -> float:
    """Fraction of pairs where the candidate reproduces its reference (see :func:`reproduces`)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise ValueError("reproduction_rate of an empty set is undefined")
    return sum(reproduces(c, r, threshold) for c, r in zip(candidates, references)) / len(candidates)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): distinct word n-grams / all word n-grams over ``texts``.

    n-grams are taken within each text (never across two texts) from :func:`word_tokens`. Texts
    shorter than ``n`` words contribute none; with no n-gram at all the score is 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, distinct = 0, set()
    for text in texts:
        words = word_tokens(text)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


def perplexity(nll_sum: float, token_count: int) -> float:
    """exp(nll_sum / token_count): perplexity from a summed negative log-likelihood (nats) over tokens.

    Returns ``inf`` when the mean NLL is too large to exponentiate in double precision.
    """
    if token_count <= 0:
        raise ValueError(f"perplexity needs at least one token, got token_count={token_count}")
    if nll_sum < 0 or math.isnan(nll_sum):
        raise ValueError(f"a negative log-likelihood sum is >= 0, got {nll_sum}")
    mean_nll = nll_sum / token_count
    # Heavy gradient ascent can push the mean NLL past what a float exponentiates (~709 nats).
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf
