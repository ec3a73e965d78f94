"""Membership inference: can an attacker still tell the forget set from never-seen samples of the same kind?

The attacks are those of MUSE and open-unlearning, with their sign convention (a higher score says "not a
member"), computed per sequence from the log-probabilities of its scored tokens:

* ``loss``: mean NLL of the tokens (Yeom et al. 2018);
* ``zlib``: that mean NLL divided by the zlib-compressed length in bytes of the scored text (Carlini et al. 2021);
* ``min_k``: minus the mean log-probability of the k·T least likely tokens (at least one; Shi et al. 2024);
* ``min_k++``: the same over z_t = (log p(x_t) − μ_t) / σ_t, where μ_t and σ_t² are the mean and variance of
  log p(v) for v drawn from the model's own next-token distribution at position t (Zhang et al. 2024); σ_t² is
  clamped at 1e-6 as open-unlearning does. μ_t and σ_t² come from the fused head pass
  (``dsunlearn.kernels.token_log_prob_stats``), never from an [tokens × vocabulary] tensor.

The scored tokens are the response's own tokens without its end-of-answer token: the tokens the forget term
unlearns (``objective.forget_eos`` is off by default), teacher-forced after the prompt in the run's template.

AUC (scikit-learn ``roc_auc_score``) between the forget set the model was trained to forget (``forget_train``,
the members) and a never-seen set (``data.holdout``), labels 0 for members and 1 for non-members against the
scores, as open-unlearning computes it: 1 when the attack recognises every forget sample as a member, 0.5 when
forget and never-seen samples look alike (the goal of unlearning; a retrained model is the reference).
Each AUC has a stratified percentile bootstrap interval (``auc_ci``): members and non-members are resampled
separately, each to its own size, so every resample keeps both classes (seeded; the evaluation's
``confidence_level`` and ``bootstrap_resamples``).
PrivLeak is MUSE's: (AUC'_unlearned − AUC'_retrained) / AUC'_retrained × 100 with MUSE's AUC' = 1 − AUC (its AUC
counts the other way round; open-unlearning converts the same way): about 0 is good, strongly negative means the
forget set still leaks (under-unlearning), strongly positive that it now stands out the other way (over-unlearning).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from dsunlearn.data.pairs import Pair
from dsunlearn.data.tokenization import pad_batch, tokenize_pair, tokenize_pairs

logger = logging.getLogger(__name__)

ATTACKS = ("loss", "zlib", "min_k", "min_k++")
ATTACK_DESCRIPTIONS = {
    "loss": "mean NLL of the response tokens",
    "zlib": "mean NLL / zlib-compressed length (bytes) of the response text",
    "min_k": "minus the mean log-probability of the k·T least likely response tokens",
    "min_k++": "Min-k% over (log p(token) − μ) / σ, μ and σ² the mean and variance of log p under the model's own "
    "next-token distribution",
}
MEMBER_SET, NONMEMBER_SET = "forget_train", "holdout"
ROLES = ("original", "unlearned", "retrained")
MIN_VARIANCE = 1e-6
BOOTSTRAP_SEED = 0
"""Seed of the AUC intervals' resampling, as every other interval of the evaluation (``metrics.bootstrap_ci``)."""
# Tokens of the probe that checks the head is hidden @ W^T (as engines' head probe).
HEAD_PROBE_TOKENS = 8


# ----------------------------------------------------------------------------------------------------
# Scores and their summaries
# ----------------------------------------------------------------------------------------------------


def sequence_scores(
    target_log_probs: Sequence[float],
    means: Sequence[float],
    variances: Sequence[float],
    text: str,
    k: float,
) -> dict[str, float]:
    """Every attack's score of one sequence (higher: less likely a member) from its per-token statistics."""
    log_probs = torch.tensor(target_log_probs, dtype=torch.float64)  # [T]
    num_k = max(1, int(len(log_probs) * k))
    loss = float(-log_probs.mean())
    normalised = (log_probs - torch.tensor(means, dtype=torch.float64)) / torch.tensor(
        variances, dtype=torch.float64
    ).clamp_min(MIN_VARIANCE).sqrt()  # [T]
    return {
        "loss": loss,
        "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
        "min_k": float(-log_probs.sort().values[:num_k].mean()),
        "min_k++": float(-normalised.sort().values[:num_k].mean()),
    }


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by the score (1: every member recognised; 0.5: chance)."""
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(member_scores) + [1] * len(nonmember_scores)
    return float(roc_auc_score(labels, [*member_scores, *nonmember_scores]))


def auc_interval(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    confidence_level: float,
    n_resamples: int,
    seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """``[low, high]``: the stratified percentile bootstrap interval of :func:`auc`.

    Each resample draws ``len(member_scores)`` members and ``len(nonmember_scores)`` non-members with replacement,
    each class from its own scores, so no resample lacks a class. All resamples at once from ranks: the AUC with
    non-members as the positive class (labels 1) is (rank sum of the non-members − n0(n0+1)/2) / (n1·n0), ties
    taking their average rank as ``roc_auc_score`` counts them half.
    """
    from scipy.stats import rankdata

    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    num_members, num_nonmembers = len(members), len(nonmembers)
    rng = np.random.default_rng(seed)
    resampled = np.concatenate(
        [
            members[rng.integers(0, num_members, size=(n_resamples, num_members))],
            nonmembers[rng.integers(0, num_nonmembers, size=(n_resamples, num_nonmembers))],
        ],
        axis=1,
    )  # [resamples, members + non-members]
    nonmember_rank_sums = rankdata(resampled, axis=1)[:, num_members:].sum(axis=1)  # [resamples]
    aucs = (nonmember_rank_sums - num_nonmembers * (num_nonmembers + 1) / 2) / (num_members * num_nonmembers)
    alpha = 1.0 - confidence_level
    low, high = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def privleak(auc_unlearned: float, auc_retrained: float) -> Optional[float]:
    """MUSE's PrivLeak in percent (module docstring); None when the retrained AUC leaves nothing to divide by."""
    muse_unlearned, muse_retrained = 1.0 - auc_unlearned, 1.0 - auc_retrained
    if muse_retrained == 0.0:
        return None
    return (muse_unlearned - muse_retrained) / muse_retrained * 100.0


def summarize(
    scores: dict[str, dict[str, list[dict[str, float]]]], k: float, *, confidence_level: float, n_resamples: int
) -> dict:
    """``summary["mia"]`` from ``{role: {set: [per-sequence scores]}}`` (roles: original, unlearned, retrained):
    per attack and role the AUC (``auc``) and its interval (``auc_ci``, :func:`auc_interval`; None for a role
    without scores), and the PrivLeaks against the retrained model."""

    def per_role(measure) -> dict[str, dict]:
        return {
            attack: {
                role: (
                    measure(
                        [s[attack] for s in scores[role][MEMBER_SET]], [s[attack] for s in scores[role][NONMEMBER_SET]]
                    )
                    if role in scores
                    else None
                )
                for role in ROLES
            }
            for attack in ATTACKS
        }

    aucs = per_role(auc)
    privleaks = None
    if "retrained" in scores:
        privleaks = {
            attack: {
                role: privleak(aucs[attack][role], aucs[attack]["retrained"]) for role in ("original", "unlearned")
            }
            for attack in ATTACKS
        }
    return {
        "k": k,
        "member_set": MEMBER_SET,
        "nonmember_set": NONMEMBER_SET,
        "num_samples": {name: len(scores["unlearned"][name]) for name in (MEMBER_SET, NONMEMBER_SET)},
        "auc": aucs,
        "auc_ci": per_role(
            lambda members, nonmembers: auc_interval(members, nonmembers, confidence_level, n_resamples)
        ),
        "privleak": privleaks,
    }


def evaluate_mia(
    model, reference, tokenizer, member_pairs, nonmember_pairs, context, rank: int = 0, world_size: int = 1,
    retrained=None,
) -> dict:
    """``summary["mia"]``: every attack's AUC for the original (``reference``), the unlearned (``model``) and the
    ``retrained`` model (:func:`load_retrained` of ``retrained_path``; None: none), and PrivLeak against the latter.
    Sharded over the ranks as the evaluation's sets are (a collective with several ranks); the numbers do not depend
    on the rank count."""
    from dsunlearn.eval.sharding import gather_records, shard_indices

    cfg = context.cfg
    models = {"original": reference, "unlearned": model}
    if retrained is not None:
        models["retrained"] = retrained
    scores: dict[str, dict[str, list]] = {role: {} for role in models}
    for set_name, pairs in ((MEMBER_SET, member_pairs), (NONMEMBER_SET, nonmember_pairs)):
        # Pairs whose prompt leaves no room for a response are left out, as training and the other sets leave them.
        pairs = tokenize_pairs(
            tokenizer, list(pairs), context.prompt_format, cfg.data.max_length, end_of_response=False, name=set_name
        ).pairs
        shard, num_real = shard_indices(len(pairs), rank, world_size)
        for role, scored in models.items():
            mine = score_pairs(scored, tokenizer, [pairs[i] for i in shard], context, cfg.mia_k)
            records = [{"index": index, "scores": s} for index, s in zip(shard[:num_real], mine[:num_real])]
            scores[role][set_name] = [record["scores"] for record in gather_records(records, world_size)]
    return summarize(scores, cfg.mia_k, confidence_level=cfg.confidence_level, n_resamples=cfg.bootstrap_resamples)


def load_retrained(cfg, world_size: int):
    """(the model of ``retrained_path``, the engines to keep alive while it is used): a ZeRO-3 inference engine
    with several ranks (PrivLeak's reference AUC; TOFU's retain model)."""
    from dsunlearn.eval.eval_config import DTYPES

    dtype = DTYPES[cfg.dtype]
    if world_size > 1:
        from dsunlearn.runtime import engines
        from dsunlearn.runtime.ds_config import inference_ds_config

        ds_config = inference_ds_config(dtype, offload=cfg.offload_param)
        engine = engines.load_inference_engine(cfg.retrained_path, ds_config, dtype)
        return engine.module, (engine,)
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(cfg.retrained_path, dtype=dtype).to(device).eval(), ()


# ----------------------------------------------------------------------------------------------------
# Per-token statistics from a model
# ----------------------------------------------------------------------------------------------------


def score_pairs(model, tokenizer, pairs: Sequence[Pair], context, k: float) -> list[dict[str, float]]:
    """Every attack's score of each pair under ``model`` (plain, or the ``.module`` of a ZeRO-3 engine: then a
    collective, with the same number of pairs on every rank). ``context``: evaluation's ``_Context``."""
    cfg = context.cfg
    sequences = [
        tokenize_pair(
            tokenizer, pair, context.prompt_format, cfg.data.max_length, context.prefix_ids, end_of_response=False
        )
        for pair in pairs
    ]
    device = context.device(model)
    head = model.get_output_embeddings()
    softcap = _head_softcap(model)
    fused = _head_is_linear(model, softcap, device)
    scores = []
    for start in range(0, len(sequences), cfg.batch_size):
        chunk = sequences[start : start + cfg.batch_size]
        batch = pad_batch(chunk, context.pad_id)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        # Position t predicts token t+1: the positions that predict scored tokens.
        predicts_response = batch["response_mask"][:, 1:].to(device).bool()  # [B, L-1]
        targets = input_ids[:, 1:][predicts_response]  # [M]
        if fused:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            hidden = hidden[:, :-1][predicts_response]  # [B, L, H] -> [M, H]
            stats = _fused_stats(head, hidden, targets, softcap)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            stats = _stats_from_logits(logits[:, :-1][predicts_response], targets)  # [B, L, V] -> [M, V]
        row = predicts_response.nonzero()[:, 0]  # [M]: the sequence of each scored token
        per_token = [value.double().cpu() for value in stats]
        row = row.cpu()
        for i, sequence in enumerate(chunk):
            mine = row == i
            response_ids = [t for t, r in zip(sequence.input_ids, sequence.response_mask) if r]
            text = tokenizer.decode(response_ids, skip_special_tokens=True)
            scores.append(sequence_scores(*(value[mine].tolist() for value in per_token), text, k))
    return scores


def _fused_stats(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float]):
    """The statistics from the head's weight, gathered where it is a ZeRO-3 shard (on every rank at once)."""
    import deepspeed

    from dsunlearn.kernels import token_log_prob_stats

    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None, enabled=hasattr(head.weight, "ds_id")):
        return token_log_prob_stats(hidden, head.weight, targets, softcap=softcap)


def _stats_from_logits(logits: torch.Tensor, targets: torch.Tensor):
    """The statistics from logits [M, V] the model made itself (a head the fused pass cannot stand in for)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [M, V]
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)  # [M]
    variance = (probs * (log_probs - mean.unsqueeze(1)).square()).sum(-1)
    return log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), mean, variance


def _head_softcap(model) -> Optional[float]:
    from dsunlearn.runtime.engines import head_softcap

    return head_softcap(model.config)


def _head_is_linear(model, softcap: Optional[float], device: torch.device) -> bool:
    """Whether the model's logits are softcap(hidden @ W^T) (no bias, no logit multiplier), checked as the trainer
    checks its head: the same few tokens on every rank, so every rank takes the same path."""
    from dsunlearn.runtime.engines import HEAD_PROBE_TOLERANCE, head_structure_problem

    head = model.get_output_embeddings()
    if head_structure_problem(model):
        return False
    input_ids = torch.linspace(0, head.out_features // 2, HEAD_PROBE_TOKENS, device=device).long()[None]  # [1, T]
    logits = model(input_ids=input_ids, use_cache=False).logits[0].float()  # [T, V]
    hidden = model.base_model(input_ids=input_ids, use_cache=False)[0][0]  # [T, H]
    fused = head(hidden).float()  # the head module's own call, so ZeRO-3 gathers its weight
    if softcap:
        fused = softcap * torch.tanh(fused / softcap)
    scale = float(logits.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
    linear = float((logits - fused).abs().max()) / scale <= HEAD_PROBE_TOLERANCE[head.weight.dtype]
    if not linear:
        logger.warning("MIA: the output head is not hidden @ W^T; the statistics come from the model's own logits")
    return linear

