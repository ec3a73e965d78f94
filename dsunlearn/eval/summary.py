"""From per-sample records to a set's summary: means, token-level means, perplexities and their bootstrap intervals;
the rows of samples.jsonl."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict

from dsunlearn.eval import applications, benchmarks, metrics
from dsunlearn.eval.eval_config import MODEL_ROLES, EvalConfig

logger = logging.getLogger(__name__)


def summarize(records: list[dict], role: str, cfg: EvalConfig, set_name: str = "") -> dict:
    """The metrics of one model (``role``) on one set (``set_name``: which truth-ratio aggregate a TOFU-shaped set
    gets), from per-sample records in sample order, with the bootstrap confidence interval of every rate and mean
    under ``"ci"``."""
    tokens = [r["response_tokens"] for r in records]
    nll_sums = [r[role]["nll_sum"] for r in records]
    outputs = [r[role]["output"] for r in records]
    generated = [r[role]["generated_tokens"] for r in records]
    fluency_sums = [r[role]["fluency_nll_sum"] for r in records]
    rouge = [r[role]["rouge_l"] for r in records]
    # Per-sample values of each mean (a 0/1 flag for a rate) and (numerators, denominators) of each token-level mean.
    means = {
        "reproduction_rate": [float(value >= cfg.reproduction_threshold) for value in rouge],
        cfg.rouge_key: rouge,
    }
    ratios = {"nll": (nll_sums, tokens), "kl": ([0.0 if role == "original" else r["kl_sum"] for r in records], tokens)}
    if records[0][role]["harmful"] is not None:  # a harm classifier judged the generations
        means["harmful_rate"] = [float(r[role]["harmful"]) for r in records]
    # The application's rates and means (dsunlearn/eval/applications.py): behaviour_rate, bleu, hallucination_rate.
    means.update(applications.sample_means([r[role] for r in records]))
    # TOFU's answer probability and truth ratio (dsunlearn/eval/benchmarks.py) on a set of its shape.
    means.update(benchmarks.tofu_set_means(records, role, set_name))
    if role == "unlearned":
        means["similarity_to_original"] = [r["similarity_to_original"] for r in records]
    means["generation_tokens"] = generated
    ratios["fluency_nll"] = (fluency_sums, generated)

    result = {
        "nll": sum(nll_sums) / sum(tokens),
        "ppl": metrics.perplexity(sum(nll_sums), sum(tokens)),
        "kl": sum(ratios["kl"][0]) / sum(tokens),
    }
    result.update({name: sum(values) / len(values) for name, values in means.items()})
    result.update(
        distinct_1=metrics.distinct_n(outputs, 1),
        distinct_2=metrics.distinct_n(outputs, 2),
        fluency_ppl=metrics.perplexity(sum(fluency_sums), sum(generated)),
    )
    result["ci"] = intervals(means, ratios, cfg)
    return result


def intervals(means: dict[str, list], ratios: dict[str, tuple[list, list]], cfg: EvalConfig) -> dict:
    """``{metric: [low, high]}``: the bootstrap interval of each mean and token-level mean, and of the perplexities
    (exp of their mean NLL's interval: the percentile interval follows a monotone map exactly)."""
    def interval(values, statistic):
        return metrics.bootstrap_ci(values, statistic, cfg.confidence_level, cfg.bootstrap_resamples)

    found = {name: interval(values, "mean") for name, values in means.items()}
    found.update({name: interval(values, "ratio") for name, values in ratios.items()})
    found["ppl"] = tuple(map(_exp, found["nll"]))
    found["fluency_ppl"] = tuple(map(_exp, found.pop("fluency_nll")))
    return {name: list(bounds) for name, bounds in found.items()}


def _exp(mean_nll: float) -> float:
    # As metrics.perplexity: past ~709 nats exp overflows a double.
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def sample_row(set_name: str, record: dict, rouge_key: str) -> dict:
    row = {
        "set": set_name,
        "index": record["index"],
        "prompt": record["prompt"],
        "response": record["response"],
        "original_output": record["original"]["output"],
        "unlearned_output": record["unlearned"]["output"],
        "original_nll": record["original"]["nll_sum"] / record["response_tokens"],
        "unlearned_nll": record["unlearned"]["nll_sum"] / record["response_tokens"],
        "kl": record["kl_sum"] / record["response_tokens"],
        f"original_{rouge_key}": record["original"]["rouge_l"],
        f"unlearned_{rouge_key}": record["unlearned"]["rouge_l"],
        "similarity_to_original": record["similarity_to_original"],
    }
    if record["unlearned"]["harmful"] is not None:
        row.update(original_harmful=record["original"]["harmful"], unlearned_harmful=record["unlearned"]["harmful"])
    # ---- the application's per-sample scores (dsunlearn/eval/applications.py), TOFU's (benchmarks.py) ----
    for role in MODEL_ROLES:
        row.update({f"{role}_{key}": value for key, value in record[role].items()
                    if key in applications.SAMPLE_KEYS or key in benchmarks.SAMPLE_KEYS})
    return row


def config_record(cfg: EvalConfig) -> dict:
    """The settings as JSON values (nested dataclasses become objects)."""
    return json.loads(json.dumps(asdict(cfg), default=str))
