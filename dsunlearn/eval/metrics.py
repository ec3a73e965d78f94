"""Text and likelihood metrics for evaluating unlearning: standard libraries, pure functions, no torch.

* ROUGE-L comes from Google's ``rouge-score`` package (the implementation TOFU, MUSE and open-unlearning
  use), so our numbers compare with theirs: its tokenizer lower-cases, replaces every character outside
  ``[a-z0-9]`` by a space (so non-Latin scripts such as CJK leave no token and score 0) and, with the
  stemmer, Porter-stems words longer than three letters. Which ROUGE-L is reported is a preset
  (:data:`ROUGE_PRESETS`): ``tofu`` (recall, stemmer on, the default) or ``muse`` (F1, stemmer off).
* BLEU comes from ``sacrebleu``'s sentence BLEU with its defaults (see :func:`bleu`).
* Confidence intervals are percentile bootstrap intervals from ``scipy.stats.bootstrap`` (see
  :func:`bootstrap_ci`).
* distinct-n keeps its own word split, :func:`word_tokens` (Unicode word characters, lower-cased): it
  counts n-grams of the generations themselves, compares no texts, so no library convention applies,
  and unlike rouge-score's tokenizer it sees non-Latin words.

Model tokenizers are never used, so scores are comparable across models and vocabularies.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np

DEFAULT_REPRODUCTION_THRESHOLD = 0.5
"""ROUGE-L (the preset's measure) at or above which a generation counts as reproducing the reference response."""

ROUGE_PRESETS = {"tofu": ("recall", True), "muse": ("f1", False)}
"""Named ROUGE-L conventions: ``{preset: (measure, stemmer)}``. TOFU reports ROUGE-L recall with the Porter
stemmer; MUSE reports ROUGE-L F1 without it."""

ROUGE_MEASURES = ("recall", "precision", "f1")


def rouge_settings(preset: str, measure: Optional[str] = None, stemmer: Optional[bool] = None) -> tuple[str, bool]:
    """(measure, stemmer) of a ROUGE-L preset, each overridden when given (not None)."""
    if preset not in ROUGE_PRESETS:
        raise ValueError(f"unknown ROUGE preset {preset!r}; choose from {list(ROUGE_PRESETS)}")
    preset_measure, preset_stemmer = ROUGE_PRESETS[preset]
    return (measure if measure is not None else preset_measure, stemmer if stemmer is not None else preset_stemmer)

BOOTSTRAP_STATISTICS = ("mean", "ratio")

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``: maximal runs of Unicode word characters (``\\w+``), for distinct-n.

    ``"Don't stop, NOW!"`` → ``["don", "t", "stop", "now"]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=None)
def _rouge_scorer(stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)


def rouge_l(candidate: str, reference: str, measure: str = "recall", stemmer: bool = True) -> float:
    """ROUGE-L of ``candidate`` against ``reference`` from ``rouge-score`` (``rougeL``), in [0, 1].

    ``measure``: ``recall`` (LCS / reference tokens: how much of the reference appears, in order, in the
    candidate), ``precision`` (LCS / candidate tokens) or ``f1``. A text without any token scores 0,
    even against another empty text (rouge-score's convention).
    """
    if measure not in ROUGE_MEASURES:
        raise ValueError(f"measure must be one of {list(ROUGE_MEASURES)}, got {measure!r}")
    for name, text in (("candidate", candidate), ("reference", reference)):
        if not isinstance(text, str):
            raise TypeError(f"{name}: expected a str, got {type(text).__name__}")
    # rouge-score takes (target, prediction): the reference comes first.
    score = _rouge_scorer(bool(stemmer)).score(reference, candidate)["rougeL"]
    return float({"recall": score.recall, "precision": score.precision, "f1": score.fmeasure}[measure])


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU of ``candidate`` against one ``reference``, 0-100 as sacrebleu reports it.

    ``sacrebleu.sentence_bleu`` with its defaults: the ``13a`` tokenizer (mteval's), case-sensitive,
    exponential smoothing (``exp``, Chen & Cherry 2014 method 3) and effective n-gram order, so a
    short sentence without any 4-gram match still scores above 0 when it shares words.
    """
    import sacrebleu

    return float(sacrebleu.sentence_bleu(candidate, [reference]).score)


def reproduces(
    candidate: str,
    reference: str,
    threshold: float = DEFAULT_REPRODUCTION_THRESHOLD,
    measure: str = "recall",
    stemmer: bool = True,
) -> bool:
    """Whether ``candidate`` reproduces ``reference``: ``rouge_l(candidate, reference, measure, stemmer) >= threshold``.

    With the defaults (the tofu preset, threshold 0.5) a generation reproduces a forget response when at
    least half of the response's (stemmed) words appear in it in the same order.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return rouge_l(candidate, reference, measure, stemmer) >= threshold


def reproduction_rate(
    candidates: Sequence[str],
    references: Sequence[str],
    threshold: float = DEFAULT_REPRODUCTION_THRESHOLD,
    measure: str = "recall",
    stemmer: bool = True,
) -> float:
    """Fraction of pairs where the candidate reproduces its reference (see :func:`reproduces`)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise ValueError("reproduction_rate of an empty set is undefined")
    flags = [reproduces(c, r, threshold, measure, stemmer) for c, r in zip(candidates, references)]
    return sum(flags) / len(flags)


def bootstrap_ci(
    values,
    statistic: str = "mean",
    confidence_level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Optional[tuple[float, float]]:
    """Percentile bootstrap confidence interval ``(low, high)`` of a statistic over samples, or None without any.

    ``statistic``: ``"mean"`` of ``values`` (one number per sample: a 0/1 flag for a rate), or ``"ratio"``:
    ``values`` is ``(numerators, denominators)``, one pair per sample, and the statistic is
    ``sum(numerators) / sum(denominators)`` (a token-level mean such as NLL per token); a resample draws
    whole samples, keeping each sample's numerator with its denominator (paired).

    ``scipy.stats.bootstrap`` with ``method="percentile"``, seeded with ``seed`` (the same inputs give the
    same interval). Percentile rather than scipy's default BCa: evaluation sets are small and rates are
    0/1 flags, where BCa's jackknife acceleration is noisy and its adjusted levels stretch the bounds (a
    rate of 1/20 gets the upper bound 0.28, the 97.5th percentile of its resampled rates being 0.15), and
    BCa gives NaN when the resamples are degenerate; the percentile interval is always a pair of
    resampled statistics. One sample, or samples all equal (every ratio equal), give ``(v, v)``: there is
    no spread to resample.
    """
    if statistic not in BOOTSTRAP_STATISTICS:
        raise ValueError(f"statistic must be one of {list(BOOTSTRAP_STATISTICS)}, got {statistic!r}")
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"confidence_level must lie in (0, 1), got {confidence_level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if statistic == "mean":
        samples = (np.asarray(values, dtype=np.float64),)
        if samples[0].ndim != 1:
            raise ValueError(f"values must be one number per sample, got shape {samples[0].shape}")

        def compute(x, axis=-1):
            return x.mean(axis=axis)

    else:
        numerators, denominators = (np.asarray(part, dtype=np.float64) for part in values)
        if numerators.shape != denominators.shape or numerators.ndim != 1:
            raise ValueError(f"numerators {numerators.shape} and denominators {denominators.shape} must pair up")
        samples = (numerators, denominators)

        def compute(x, y, axis=-1):
            return x.sum(axis=axis) / y.sum(axis=axis)

    if samples[0].size == 0:
        return None
    observed = float(compute(*samples))
    per_sample = samples[0] if statistic == "mean" else samples[0] / samples[1]
    if per_sample.size == 1 or np.all(per_sample == per_sample[0]):
        return (observed, observed)
    from scipy import stats

    result = stats.bootstrap(
        samples,
        compute,
        n_resamples=n_resamples,
        vectorized=True,
        paired=statistic == "ratio",
        confidence_level=confidence_level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


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
