"""TOFU's and MUSE's metrics on files of their shape (``data.forget.format: tofu``, ``muse_verbmem``,
``muse_knowmem``), with open-unlearning's definitions (github.com/locuslab/open-unlearning; the files named below).

TOFU, per question (``tofu`` sets):

* answer probability (``answer_prob``): exp(−mean NLL of the answer's tokens), the answer's tokens teacher-forced after
  its question (``src/evals/metrics/utils.py``, ``evaluate_probability``: ``exp(-avg_loss)``); a set reports the mean.
* truth ratio R = P̄(perturbed) / P(paraphrased), P = exp(−mean NLL per token) of an answer, and P̄ over the perturbed
  answers aggregated in log space: exp(−mean over the answers of their mean NLLs), the geometric mean of their
  length-normalised probabilities (``src/evals/metrics/memorization.py``, ``truth_ratio``: ``aggregate_to_1D`` of the
  ``avg_loss`` values, then ``exp``, then ``wrong / (correct + 1e-10)``). A forget set reports
  ``forget_truth_ratio`` = mean(min(R, 1/R)) (aggregator ``closer_to_1_better``: 1 when the model cannot tell the
  right answer from wrong ones), the normal (retain) set ``retain_truth_ratio`` = mean(max(0, 1 − R))
  (``true_better``); ``configs/eval/tofu_metrics/{forget,retain}_Truth_Ratio.yaml``.
* ROUGE-L recall of the greedy answer against the answer (rouge-score, Porter stemmer: the ``tofu`` ROUGE preset,
  ``rouge_l_recall`` of every set; ``eval_text_similarity``'s ``rougeL_recall``).
* forget quality: the p-value of the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) between the truth
  ratios R of the forget set (``forget_train``) under the evaluated model and under a retain model, one trained
  without the forget set (``src/evals/metrics/privacy.py``, ``ks_test``; ``configs/eval/tofu_metrics/
  forget_quality.yaml``). High (near 1) when the two cannot be told apart.
* model utility: the harmonic mean (``scipy.stats.hmean``) of the retain set's numbers that are present: answer
  probability, ROUGE-L recall and ``retain_truth_ratio`` (``src/evals/metrics/utility.py``, ``hm_aggregate``;
  open-unlearning adds its real-authors and world-facts sets, which files of TOFU's shape do not have).

MUSE (``muse_verbmem``: a text and its ground-truth continuation; ``muse_knowmem``: a question and its answer): the
ROUGE-L F1 of the greedy continuation or answer against the ground truth (rouge-score without the stemmer, as
MUSE's ``verbmem/get_rouge.py`` scores it: the ``muse`` ROUGE preset, ``rouge_l_f1`` of every set), reported as
VerbMem and KnowMem on the forget set and KnowMem on the retain set; PrivLeak is :mod:`dsunlearn.eval.mia`'s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional

from dsunlearn.data.pairs import Pair
from dsunlearn.data.tokenization import tokenize_pair
from dsunlearn.eval.eval_config import EvalContext
from dsunlearn.eval.likelihood import nll_sums

logger = logging.getLogger(__name__)

EPSILON = 1e-10
"""open-unlearning's guard against a division by zero, kept so that the numbers are theirs."""

FORGET_SET = "forget_train"
"""The set whose truth ratios forget quality compares: the forget set the model was trained to forget."""
RETAIN_SET = "normal_held_out"
"""The set model utility is read from: normal (retain) questions the model was not trained on."""
MODEL_UTILITY_INPUTS = ("answer_prob", "rouge_l_recall", "retain_truth_ratio")
MUSE_METRICS = {
    "verbmem_f": ("muse_verbmem", FORGET_SET),
    "knowmem_f": ("muse_knowmem", FORGET_SET),
    "knowmem_r": ("muse_knowmem", RETAIN_SET),
}
"""MUSE's names of its ROUGE-L F1 numbers: ``{name: (format, set)}``."""
SAMPLE_KEYS = ("answer_prob", "truth_ratio")
"""Per-question values written to samples.jsonl, as ``original_<key>`` and ``unlearned_<key>``."""


# ----------------------------------------------------------------------------------------------------
# Per-question values and their aggregates (pure functions)
# ----------------------------------------------------------------------------------------------------


def answer_probability(nll_sum: float, num_tokens: int) -> float:
    """exp(−nll_sum / num_tokens): an answer's probability normalised by its length (``evaluate_probability``)."""
    if num_tokens <= 0:
        raise ValueError(f"an answer probability needs at least one token, got num_tokens={num_tokens}")
    return math.exp(-nll_sum / num_tokens)


def truth_ratio(paraphrased_mean_nll: float, perturbed_mean_nlls: Sequence[float]) -> float:
    """R = exp(−mean(perturbed_mean_nlls)) / (exp(−paraphrased_mean_nll) + 1e-10), from each answer's mean NLL per
    token (open-unlearning's ``truth_ratio``: the wrong answers averaged in log space)."""
    if not perturbed_mean_nlls:
        raise ValueError("the truth ratio needs at least one perturbed answer")
    wrong = math.exp(-sum(perturbed_mean_nlls) / len(perturbed_mean_nlls))
    return wrong / (math.exp(-paraphrased_mean_nll) + EPSILON)


def forget_truth_ratio_score(ratio: float) -> float:
    """min(R, 1/R) of one forget question (``closer_to_1_better``): 1 when the right and wrong answers are alike."""
    return min(ratio, 1.0 / (ratio + EPSILON))


def retain_truth_ratio_score(ratio: float) -> float:
    """max(0, 1 − R) of one retain question (``true_better``): 1 when the right answer is far likelier."""
    return max(0.0, 1.0 - ratio)


def forget_quality(ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """The p-value of the two-sample KS test between the forget set's truth ratios under the evaluated model and
    under the retain model (``ks_test``)."""
    from scipy.stats import ks_2samp

    if not ratios or not retain_ratios:
        raise ValueError(f"forget quality needs truth ratios on both sides, got {len(ratios)} and {len(retain_ratios)}")
    return float(ks_2samp(list(ratios), list(retain_ratios)).pvalue)


def model_utility(values: dict[str, float]) -> float:
    """The harmonic mean of ``values`` (``hm_aggregate``); 0 when one of them is 0."""
    from scipy.stats import hmean

    if not values:
        raise ValueError("model utility needs at least one retain value")
    return float(hmean(list(values.values())))


# ----------------------------------------------------------------------------------------------------
# Measuring truth ratios
# ----------------------------------------------------------------------------------------------------


def num_wrong_answers(pairs: Sequence[Pair]) -> int:
    """The most perturbed answers a pair of the set has: every pair is measured on this many, so that every rank
    makes the same number of forward calls (the evaluation's sets are the same on every rank)."""
    return max((len(pair.perturbed_answers) for pair in pairs), default=0)


def truth_ratios(model, pairs: Sequence[Pair], num_wrong: int, context: EvalContext) -> list[Optional[float]]:
    """The truth ratio of each pair under ``model`` (None for a pair without a paraphrased answer).

    Each pair gives 1 + ``num_wrong`` teacher-forced answers after its prompt: the paraphrased answer, then its
    perturbed answers (a shorter list padded with repeats of its last answer, a pair without them with its own answer:
    their results are dropped). With ZeRO-3 a collective: call it on every rank with shards of equal length.
    """
    cfg = context.cfg
    answers = []
    for pair in pairs:
        if pair.paraphrased_answer is None:
            answers += [pair.response] * (1 + num_wrong)
        else:
            wrong = list(pair.perturbed_answers)
            answers += [pair.paraphrased_answer] + wrong + [wrong[-1]] * (num_wrong - len(wrong))
    sequences = [
        tokenize_pair(
            context.tokenizer,
            replace(pair, response=answer),
            context.prompt_format,
            cfg.data.max_length,
            context.prefix_ids,
        )
        for pair, answer in zip((pair for pair in pairs for _ in range(1 + num_wrong)), answers)
    ]
    sums = nll_sums(model, sequences, context)
    mean_nlls = [nll_sum / sum(sequence.response_mask) for nll_sum, sequence in zip(sums, sequences)]
    ratios = []
    for i, pair in enumerate(pairs):
        if pair.paraphrased_answer is None:
            ratios.append(None)
            continue
        block = mean_nlls[i * (1 + num_wrong) : (i + 1) * (1 + num_wrong)]  # [paraphrased, wrong..., repeats]
        ratios.append(truth_ratio(block[0], block[1 : 1 + len(pair.perturbed_answers)]))
    return ratios


# ----------------------------------------------------------------------------------------------------
# The evaluation's benchmark sections
# ----------------------------------------------------------------------------------------------------


def tofu_set_means(records: Sequence[dict], role: str, set_name: str) -> dict[str, list[float]]:
    """The per-question values of a TOFU set's means (summary.py adds their means and bootstrap intervals):
    ``answer_prob``, and ``forget_truth_ratio`` (a forget set) or ``retain_truth_ratio`` (the normal set) over the
    questions that have a truth ratio. Empty for a set that is not TOFU-shaped."""
    if "answer_prob" not in records[0][role]:
        return {}
    means = {"answer_prob": [record[role]["answer_prob"] for record in records]}
    ratios = [record[role]["truth_ratio"] for record in records if record[role].get("truth_ratio") is not None]
    if ratios:
        if set_name.startswith("forget"):
            means["forget_truth_ratio"] = [forget_truth_ratio_score(ratio) for ratio in ratios]
        else:
            means["retain_truth_ratio"] = [retain_truth_ratio_score(ratio) for ratio in ratios]
    return means


def tofu_section(
    summary: dict, ratios: dict[str, dict[str, list[float]]], retain: Optional[tuple[str, list[float]]]
) -> dict:
    """``summary["tofu"]``: the truth ratios of each set and model (``{set: {role: [R, ...]}}``, sample order,
    questions without one left out), forget quality of the original and the unlearned model against the retain
    model's forget-set ratios (``retain``: (where they come from, ratios); None: no retain model), and model utility
    of both from the retain set's means."""
    section = {"truth_ratios": ratios, "retain_model": None, "forget_quality": None, "model_utility": None}
    forget = ratios.get(FORGET_SET, {})
    if retain is not None and forget:
        source, retain_ratios = retain
        if len(retain_ratios) != len(forget["unlearned"]):
            logger.warning(
                "forget quality: the retain model has %d truth ratios on %s, this evaluation %d (another "
                "split or max_samples?)",
                len(retain_ratios),
                FORGET_SET,
                len(forget["unlearned"]),
            )
        section["retain_model"] = source
        section["forget_quality"] = {role: forget_quality(values, retain_ratios) for role, values in forget.items()}
    utility = {}
    for role in ("original", "unlearned"):
        measured = summary[role].get(RETAIN_SET, {})
        present = {name: measured[name] for name in MODEL_UTILITY_INPUTS if name in measured}
        if "answer_prob" in present:  # a TOFU-shaped retain set
            utility[role] = {"value": model_utility(present), "from": sorted(present)}
    section["model_utility"] = utility or None
    return section


def retain_ratios_from_eval(path: str) -> list[float]:
    """The forget set's truth ratios of the retain model from its saved evaluation (an ``eval.json`` of ``dsunlearn
    eval`` with the retain model as ``model_path``: its ``unlearned`` side). Raises ValueError naming what is
    missing."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"retain_eval: file {path!r} does not exist")
    try:
        saved = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"retain_eval: {path!r} is not JSON: {err}") from None
    ratios = ((saved.get("tofu") or {}).get("truth_ratios") or {}).get(FORGET_SET, {}).get("unlearned")
    if not ratios:
        raise ValueError(
            f"retain_eval: {path!r} has no truth ratios of {FORGET_SET} (tofu.truth_ratios.{FORGET_SET}.unlearned): "
            "give the eval.json of `dsunlearn eval --model_path RETAIN_MODEL` on the same TOFU-shaped forget data"
        )
    return [float(ratio) for ratio in ratios]


def muse_section(summary: dict, formats: dict[str, str]) -> Optional[dict]:
    """``summary["muse"]``: MUSE's ROUGE-L F1 numbers present (``verbmem_f``, ``knowmem_f``, ``knowmem_r``) of the
    original and the unlearned model, from the sets' ``rouge_l_f1``; ``formats``: ``{set name: its data's format}``.
    None when no set is MUSE-shaped."""
    section = {}
    for role in ("original", "unlearned"):
        values = {
            name: summary[role][set_name]["rouge_l_f1"]
            for name, (fmt, set_name) in MUSE_METRICS.items()
            if formats.get(set_name) == fmt and "rouge_l_f1" in summary[role].get(set_name, {})
        }
        if values:
            section[role] = values
    return section or None
