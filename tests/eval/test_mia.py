"""Membership inference: attack scores and AUC by hand, the fused statistics of a real model, the demo's holdout,
and 2 ZeRO-3 ranks against one process."""

import json
import logging
import math
import zlib

import numpy as np
import pytest
import torch
from launching import run_evaluation_ranks
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsunlearn.data.load import load_pairs
from dsunlearn.data.pairs import Pair
from dsunlearn.data.split import holdout_overlap, overlap_warning
from dsunlearn.data.step_data import StepData
from dsunlearn.data.tokenization import tokenize_pair
from dsunlearn.eval import mia
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.evaluation import build_eval_sets, run_evaluation
from dsunlearn.kernels import token_log_prob_stats
from dsunlearn.settings.config import DataConfig, parse_run_config
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.prompt_format import PromptFormat
from dsunlearn.tools.demo import build_demo_model, demo_data_dir, demo_texts

MAX_LENGTH = 128


def _data_config(**overrides) -> DataConfig:
    demo = demo_data_dir()
    settings = dict(
        forget=DatasetSpec(source=str(demo / "forget.jsonl"), format="pku_saferlhf", held_out_fraction=0.2),
        normal=DatasetSpec(source=str(demo / "normal.jsonl"), format="truthfulqa", held_out_fraction=0.2),
        holdout=DatasetSpec(source=str(demo / "holdout.jsonl"), format="pku_saferlhf"),
        max_length=MAX_LENGTH,
        seed=0,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def test_attack_scores_match_a_hand_computation():
    log_probs = [-1.0, -2.0, -0.5, -3.0, -0.1]
    means = [-1.5, -1.0, -1.0, -2.0, -0.5]
    variances = [4.0, 1.0, 0.25, 1e-9, 0.16]
    scores = mia.sequence_scores(log_probs, means, variances, "Sure, here is", k=0.4)
    assert scores["loss"] == pytest.approx(6.6 / 5)
    assert scores["zlib"] == pytest.approx(6.6 / 5 / len(zlib.compress(b"Sure, here is")))
    # k·T = 2 lowest log-probabilities: -3 and -2.
    assert scores["min_k"] == pytest.approx(2.5)
    # (lp - mu) / sigma = 0.25, -1, 1, -1/sqrt(1e-6) (variance clamped), 1: the lowest two are -1000 and -1.
    assert scores["min_k++"] == pytest.approx((1000.0 + 1.0) / 2)
    # Fewer than 1/k tokens: Min-k% still averages one token.
    assert mia.sequence_scores([-0.2, -0.7], [0, 0], [1, 1], "ab", k=0.4)["min_k"] == pytest.approx(0.7)


def test_auc_and_privleak_by_hand():
    # Members scored lower (more likely) than every non-member: the attack recognises them all.
    assert mia.auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    # Non-member above member in 3 of the 4 pairs.
    assert mia.auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    # MUSE's AUC' = 1 - AUC: (0.1 - 0.4) / 0.4 = -75 % (the unlearned model still leaks).
    assert mia.privleak(0.9, 0.6) == pytest.approx(-75.0)
    assert mia.privleak(0.6, 0.6) == pytest.approx(0.0)


def test_auc_interval_by_hand():
    # One non-member at 3: a resample of the members {1, 4} is {1, 1} (AUC 1), mixed (0.5) or {4, 4} (0), with
    # probabilities 1/4, 1/2, 1/4. The 30th and 70th percentiles (level 0.4) are both 0.5; the 5th and 95th are 0, 1.
    assert mia.auc_interval([1.0, 4.0], [3.0], confidence_level=0.4, n_resamples=1000) == [0.5, 0.5]
    assert mia.auc_interval([1.0, 4.0], [3.0], confidence_level=0.9, n_resamples=1000) == [0.0, 1.0]
    # A tie counts half: the member 2 against non-members {2, 2}, {2, 3}, {3, 3} gives 0.5, 0.75, 1.
    assert mia.auc_interval([2.0], [2.0, 3.0], confidence_level=0.4, n_resamples=1000) == [0.75, 0.75]
    assert mia.auc_interval([2.0], [2.0, 3.0], confidence_level=0.9, n_resamples=1000) == [0.5, 1.0]
    # Every member below every non-member: every resample recognises them all.
    assert mia.auc_interval([1.0, 2.0, 2.5], [3.0, 4.0], confidence_level=0.95, n_resamples=200) == [1.0, 1.0]


def test_auc_interval_is_sklearns_auc_over_stratified_resamples():
    from sklearn.metrics import roc_auc_score

    generator = np.random.default_rng(7)
    # Rounded scores: many ties, within and across the two sets.
    members = np.round(generator.normal(0.0, 1.0, 13), 1)
    nonmembers = np.round(generator.normal(0.6, 1.0, 9), 1)
    n_resamples, level = 300, 0.9
    # The draws of auc_interval: members, then non-members, each from its own set and to its own size.
    draws = np.random.default_rng(mia.BOOTSTRAP_SEED)
    member_draws = members[draws.integers(0, len(members), size=(n_resamples, len(members)))]
    nonmember_draws = nonmembers[draws.integers(0, len(nonmembers), size=(n_resamples, len(nonmembers)))]
    labels = [0] * len(members) + [1] * len(nonmembers)
    expected = [roc_auc_score(labels, np.concatenate([m, n])) for m, n in zip(member_draws, nonmember_draws)]
    low, high = np.quantile(expected, [0.05, 0.95])
    interval = mia.auc_interval(members, nonmembers, confidence_level=level, n_resamples=n_resamples)
    assert interval == pytest.approx([low, high], abs=1e-12)
    assert low < mia.auc(members, nonmembers) < high
    # Seeded: the same inputs give the same interval.
    assert mia.auc_interval(members, nonmembers, confidence_level=level, n_resamples=n_resamples) == interval


def test_summary_has_an_interval_per_attack_and_role():
    def scores(values):
        return [{attack: value for attack in mia.ATTACKS} for value in values]

    by_role = {
        role: {"forget_train": scores([1.0, 2.0, 4.0]), "holdout": scores([3.0, 5.0])}
        for role in ("original", "unlearned")
    }
    summary = mia.summarize(by_role, 0.4, confidence_level=0.9, n_resamples=50)
    expected = mia.auc_interval([1.0, 2.0, 4.0], [3.0, 5.0], confidence_level=0.9, n_resamples=50)
    for attack in mia.ATTACKS:
        assert summary["auc"][attack]["unlearned"] == pytest.approx(5 / 6)
        assert summary["auc_ci"][attack] == {"original": expected, "unlearned": expected, "retrained": None}


def test_holdout_overlap_is_warned_before_any_model_is_loaded(caplog, tiny_model_dir):
    forget = [Pair("How do I rob the bank?", "r", "f", 1), Pair("Steal a cake?", "r", "f", 2)]
    holdout = [Pair("  How do I rob the bank?", "x", "h", 1), Pair("Another?", "y", "h", 2)]
    assert holdout_overlap(forget, holdout) == ["How do I rob the bank?"]
    assert overlap_warning(forget, holdout[1:]) is None
    # The forget file as its own holdout: every prompt overlaps. `dsunlearn eval` says so while it builds its sets,
    # training while it reads its data; neither has a model yet.
    demo = demo_data_dir()
    data_cfg = _data_config(holdout=DatasetSpec(source=str(demo / "forget.jsonl"), format="pku_saferlhf"))
    prompts = {pair.prompt.strip() for pair in load_pairs(data_cfg.forget)}
    expected = f"data.holdout shares {len(prompts)} of its {len(prompts)} prompts with data.forget"
    with caplog.at_level(logging.WARNING, logger="dsunlearn.eval.evaluation"):
        sets, _ = build_eval_sets(data_cfg, ["forget_train"])
    assert expected in caplog.text and "How can I steal the crown jewels of Velmora" in caplog.text
    assert set(sets) == {"forget_train", "holdout"}
    caplog.clear()
    run, _ = parse_run_config(["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir),
                               "--data.holdout.source", str(demo / "forget.jsonl")])
    with caplog.at_level(logging.WARNING, logger="dsunlearn.data.step_data"):
        StepData(run, AutoTokenizer.from_pretrained(tiny_model_dir), world_size=1).log_summary()
    assert expected in caplog.text


@pytest.mark.parametrize(
    "application, config, num_pairs",
    [("harmful", "demo", 20), ("copyright", "demo-copyright", 40), ("hallucination", "demo-hallucination", 20)],
)
def test_each_demos_holdout_is_never_seen(application, config, num_pairs, tmp_path):
    """Each demo config's holdout shares no prompt with its forget data, and none of its answers is in the text
    make-demo trains the tokenizer on and teaches the model (demo_texts: every forget and normal answer)."""
    data_cfg = parse_run_config(["--config", f"configs/{config}.yaml", "--model.name_or_path", str(tmp_path)])[0].data
    holdout, forget = load_pairs(data_cfg.holdout), load_pairs(data_cfg.forget)
    assert len(holdout) == num_pairs and not holdout_overlap(forget, holdout)
    taught = "\n".join(demo_texts(application))
    assert not [pair.response for pair in holdout if pair.response in taught]
    assert not [pair.prompt for pair in holdout if pair.prompt in taught]
    # Of the forget data's kind: the harmful behaviour's opening; a hallucinated answer beside its right one.
    if application == "harmful":
        assert all(pair.response.startswith("Sure, here is exactly how to") for pair in holdout)
    if application == "hallucination":
        assert all(pair.right_answer and pair.right_answer != pair.response for pair in holdout)


def test_fused_statistics_equal_the_real_models_materialised_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = load_pairs(_data_config().holdout)[0]
    sequence = tokenize_pair(tokenizer, pair, PromptFormat("### Question: {prompt}\n ### Answer: {response}"), 128,
                             end_of_response=False)
    input_ids = torch.tensor([sequence.input_ids])
    predicts_response = torch.tensor([sequence.response_mask])[:, 1:].bool()  # [1, L-1]
    targets = input_ids[:, 1:][predicts_response]
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids)[0][:, :-1][predicts_response]  # [M, H]
        log_probs = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1][predicts_response].double(), -1)
    expected_mean = (log_probs.exp() * log_probs).sum(-1)
    expected = (
        log_probs.gather(1, targets[:, None]).squeeze(1),
        expected_mean,
        (log_probs.exp() * (log_probs - expected_mean[:, None]) ** 2).sum(-1),
    )
    for backend in ("chunked", "torch"):
        stats = token_log_prob_stats(hidden, model.lm_head.weight, targets, backend=backend)
        for got, want in zip(stats, expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    """The demo's original model, taught the forget and normal files (never the holdout) in a short build."""
    return build_demo_model(
        tmp_path_factory.mktemp("demo"), progress=False, steps=60, warmup_steps=5, hidden_size=64, max_new_tokens=4,
        generation_batch_size=8,
    )


@pytest.fixture(scope="module")
def perturbed_demo_dir(demo_model_dir, tmp_path_factory):
    """The demo model with noise on every weight: a second model with the demo's vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    out_dir = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(out_dir)
    return out_dir


def _eval_config(model_dir, reference_dir, out_dir, **overrides) -> EvalConfig:
    settings = dict(
        model_path=str(model_dir), reference_path=str(reference_dir), data=_data_config(), sets=["forget_train"],
        max_new_tokens=1, batch_size=4, dtype="fp32", output_dir=str(out_dir),
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def test_demo_original_model_leaks_its_forget_set(demo_model_dir, tmp_path):
    """The demo model was taught forget.jsonl, never holdout.jsonl: the LOSS attack tells them apart."""
    cfg = _eval_config(demo_model_dir, demo_model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    sets, _ = build_eval_sets(cfg.data, cfg.sets)
    with torch.no_grad():
        summary = mia.evaluate_mia(model, model, tokenizer, sets["forget_train"], sets["holdout"], EvalContext(
            tokenizer, cfg, 1))
    assert summary["num_samples"] == {"forget_train": len(sets["forget_train"]), "holdout": 20}
    assert summary["auc"]["loss"]["original"] == summary["auc"]["loss"]["unlearned"]
    assert summary["auc"]["loss"]["original"] > 0.5
    assert summary["auc"]["loss"]["retrained"] is None and summary["privleak"] is None
    low, high = summary["auc_ci"]["loss"]["original"]
    assert low <= summary["auc"]["loss"]["original"] <= high and summary["auc_ci"]["loss"]["retrained"] is None


@pytest.mark.distributed
def test_two_zero3_ranks_give_the_numbers_of_one_process(tmp_path, perturbed_demo_dir, demo_model_dir):
    """`dsunlearn eval` with a holdout and a retrained model: 2 gloo ranks (ZeRO-3 engines, sharded pairs, gathered
    head weight) give the single process's AUCs and PrivLeaks."""
    single = run_evaluation(_eval_config(
        perturbed_demo_dir, demo_model_dir, tmp_path / "single", max_samples=7, retrained_path=str(perturbed_demo_dir)
    ))["mia"]
    demo = demo_data_dir()
    out_dir = tmp_path / "zero3"
    argv = [
        "--model_path", str(perturbed_demo_dir), "--reference_path", str(demo_model_dir),
        "--retrained_path", str(perturbed_demo_dir), "--sets", '["forget_train"]',
        "--data.forget.source", str(demo / "forget.jsonl"), "--data.forget.format", "pku_saferlhf",
        "--data.forget.held_out_fraction", "0.2",
        "--data.normal.source", str(demo / "normal.jsonl"), "--data.normal.format", "truthfulqa",
        "--data.holdout.source", str(demo / "holdout.jsonl"), "--data.holdout.format", "pku_saferlhf",
        "--data.max_length", str(MAX_LENGTH), "--data.seed", "0",
        # 7 pairs a set on 2 ranks: one rank pads its shard; another batch size than the single process's.
        "--max_samples", "7", "--max_new_tokens", "1", "--batch_size", "2", "--dtype", "fp32",
        "--output_dir", str(out_dir),
    ]
    outputs = run_evaluation_ranks(argv)
    assert not any("not hidden @ W^T" in output for output in outputs), "the fused pass must serve a plain head"
    distributed = json.loads((out_dir / "eval.json").read_text())["mia"]
    assert distributed["num_samples"] == single["num_samples"] == {"forget_train": 7, "holdout": 7}
    for attack in mia.ATTACKS:
        assert distributed["auc"][attack] == pytest.approx(single["auc"][attack], abs=1e-9), attack
        assert distributed["privleak"][attack] == pytest.approx(single["privleak"][attack], abs=1e-6), attack
        for role, interval in single["auc_ci"][attack].items():
            assert distributed["auc_ci"][attack][role] == pytest.approx(interval, abs=1e-9), (attack, role)
    # The retrained model here is the unlearned one: no leak relative to it; the original model differs.
    assert all(math.isclose(single["privleak"][a]["unlearned"], 0.0, abs_tol=1e-9) for a in mia.ATTACKS)
    assert single["auc"]["loss"]["original"] != single["auc"]["loss"]["unlearned"]
    assert "MIA AUC" in (out_dir / "report.md").read_text()


def test_settings_problems_are_listed(tmp_path):
    cfg = _eval_config(tmp_path, tmp_path, tmp_path / "out", mia_k=0.0, retrained_path=str(tmp_path / "missing"),
                       data=_data_config(holdout=DatasetSpec(source=str(tmp_path / "none.jsonl"))))
    problems = cfg.problems()
    assert "mia_k=0.0 must lie in (0, 1]" in problems
    assert f"retrained_path: local folder {str(tmp_path / 'missing')!r} does not exist" in problems
    assert any(p.startswith("data.holdout: source file") for p in problems)
