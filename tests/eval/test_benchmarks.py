"""TOFU's and MUSE's metrics (eval/benchmarks.py): each against numbers derived by hand, the truth ratios of a model
against a float64 computation from its logits, and one evaluation of the tiny model on the bundled TOFU-shaped files."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsunlearn.data.pairs import Pair
from dsunlearn.data.tokenization import tokenize_pair
from dsunlearn.eval import benchmarks
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.evaluation import run_evaluation
from dsunlearn.settings.config import DataConfig, RunConfig
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.paths import resolve_path


def _tofu_data(**forget) -> DataConfig:
    folder = resolve_path("dsunlearn/assets/tofu_shaped")
    return DataConfig(
        forget=DatasetSpec(source=str(folder / "forget.jsonl"), format="tofu", held_out_fraction=0.25, **forget),
        normal=DatasetSpec(source=str(folder / "retain.jsonl"), format="tofu", held_out_fraction=0.25),
        max_length=96,
    )


# ----------------------------------------------------------------------------------------------------
# Pure functions against hand computations
# ----------------------------------------------------------------------------------------------------


def test_answer_probability_is_exp_of_minus_the_mean_nll():
    assert benchmarks.answer_probability(3.0, 2) == pytest.approx(math.exp(-1.5), rel=1e-15)
    with pytest.raises(ValueError, match="at least one token"):
        benchmarks.answer_probability(1.0, 0)


def test_truth_ratio_averages_the_wrong_answers_in_log_space():
    """Paraphrased answer: mean NLL ln 2 (P = 1/2). Perturbed: ln 4 and ln 16 (P = 1/4, 1/16): their geometric mean is
    exp(−(ln 4 + ln 16)/2) = 1/8, not the arithmetic mean 5/32. R = (1/8) / (1/2) = 1/4."""
    ratio = benchmarks.truth_ratio(math.log(2), [math.log(4), math.log(16)])
    assert ratio == pytest.approx(0.25, rel=1e-9)
    assert benchmarks.truth_ratio(math.log(2), [math.log(2)]) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="at least one perturbed answer"):
        benchmarks.truth_ratio(1.0, [])


def test_truth_ratio_scores_of_forget_and_retain_questions():
    # Forget: min(R, 1/R), the same for R and 1/R; retain: max(0, 1 − R).
    assert benchmarks.forget_truth_ratio_score(0.25) == pytest.approx(0.25)
    assert benchmarks.forget_truth_ratio_score(4.0) == pytest.approx(0.25)
    assert benchmarks.forget_truth_ratio_score(1.0) == pytest.approx(1.0)
    assert benchmarks.retain_truth_ratio_score(0.25) == pytest.approx(0.75)
    assert benchmarks.retain_truth_ratio_score(4.0) == 0.0


def test_forget_quality_is_the_ks_p_value():
    """Two samples of 3 with no overlap: D = 1, and the exact two-sided p-value is 2 / C(6, 3) = 0.1 (the two
    orderings that separate them, of the 20 equally likely). Equal samples: p = 1."""
    assert benchmarks.forget_quality([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx(0.1)
    assert benchmarks.forget_quality([0.1, 0.2, 0.3], [0.3, 0.1, 0.2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both sides"):
        benchmarks.forget_quality([], [0.5])


def test_model_utility_is_the_harmonic_mean():
    # 2 / (1/0.5 + 1/0.25) = 1/3; a zero makes it zero.
    assert benchmarks.model_utility({"a": 0.5, "b": 0.25}) == pytest.approx(1 / 3)
    assert benchmarks.model_utility({"a": 0.5, "b": 0.0}) == 0.0


def _records(ratios, probs):
    return [{"unlearned": {"answer_prob": p, "truth_ratio": r}} for r, p in zip(ratios, probs)]


def test_set_means_use_the_set_s_aggregate():
    records = _records([0.5, 2.0, None], [0.1, 0.2, 0.3])
    forget = benchmarks.tofu_set_means(records, "unlearned", "forget_train")
    retain = benchmarks.tofu_set_means(records, "unlearned", "normal_held_out")
    assert forget == {"answer_prob": [0.1, 0.2, 0.3], "forget_truth_ratio": pytest.approx([0.5, 0.5])}
    assert retain == {"answer_prob": [0.1, 0.2, 0.3], "retain_truth_ratio": pytest.approx([0.5, 0.0])}
    assert benchmarks.tofu_set_means([{"unlearned": {"nll_sum": 1.0}}], "unlearned", "forget_train") == {}


def test_tofu_section_forget_quality_and_model_utility():
    ratios = {"forget_train": {"original": [0.4, 0.5, 0.6], "unlearned": [0.1, 0.2, 0.3]}}
    summary = {
        "original": {"normal_held_out": {"answer_prob": 0.5, "rouge_l_recall": 0.25, "retain_truth_ratio": 1.0}},
        "unlearned": {"normal_held_out": {"answer_prob": 0.5, "rouge_l_recall": 0.5}},  # no truth ratio there
    }
    section = benchmarks.tofu_section(summary, ratios, ("retain_eval: r.json", [0.45, 0.55, 0.65]))
    # Original vs retain: interleaved (D = 1/3, p = 1); unlearned vs retain: separated (p = 0.1).
    assert section["forget_quality"] == {"original": pytest.approx(1.0), "unlearned": pytest.approx(0.1)}
    assert section["retain_model"] == "retain_eval: r.json"
    # 3 / (2 + 4 + 1) and 2 / (2 + 2).
    assert section["model_utility"]["original"] == {
        "value": pytest.approx(3 / 7),
        "from": ["answer_prob", "retain_truth_ratio", "rouge_l_recall"],
    }
    assert section["model_utility"]["unlearned"] == {
        "value": pytest.approx(0.5),
        "from": ["answer_prob", "rouge_l_recall"],
    }
    assert benchmarks.tofu_section(summary, ratios, None)["forget_quality"] is None


def test_retain_ratios_from_a_saved_evaluation(tmp_path):
    saved = tmp_path / "eval.json"
    saved.write_text(json.dumps({"tofu": {"truth_ratios": {"forget_train": {"unlearned": [0.5, 2]}}}}))
    assert benchmarks.retain_ratios_from_eval(str(saved)) == [0.5, 2.0]
    saved.write_text(json.dumps({"original": {}}))
    with pytest.raises(ValueError, match=r"has no truth ratios of forget_train \(tofu.truth_ratios.forget_train"):
        benchmarks.retain_ratios_from_eval(str(saved))
    with pytest.raises(ValueError, match="does not exist"):
        benchmarks.retain_ratios_from_eval(str(tmp_path / "none.json"))


def test_muse_section_names_the_sets_rouge_l_f1():
    summary = {
        role: {"forget_train": {"rouge_l_f1": value}, "normal_held_out": {"rouge_l_f1": value / 2}}
        for role, value in (("original", 0.8), ("unlearned", 0.2))
    }
    section = benchmarks.muse_section(summary, {"forget_train": "muse_verbmem", "normal_held_out": "muse_knowmem"})
    assert section == {
        "original": {"verbmem_f": 0.8, "knowmem_r": 0.4},
        "unlearned": {"verbmem_f": 0.2, "knowmem_r": 0.1},
    }
    assert benchmarks.muse_section(summary, {"forget_train": "tofu", "normal_held_out": "pairs"}) is None


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------


def test_a_benchmark_s_data_needs_its_rouge_convention(tmp_path):
    folder = resolve_path("dsunlearn/assets/muse_shaped")
    data = DataConfig(
        forget=DatasetSpec(source=str(folder / "verbmem.jsonl"), format="muse_verbmem"),
        normal=DatasetSpec(source=str(folder / "knowmem.jsonl"), format="muse_knowmem"),
    )
    problems = EvalConfig(data=data).evaluation_problems()
    assert (
        "data.forget.format='muse_verbmem' is scored with ROUGE-L f1, stemmer off (rouge: 'muse'), but the ROUGE "
        "settings give recall, stemmer on"
    ) in problems
    assert not EvalConfig(data=data, rouge="muse").evaluation_problems()
    assert EvalConfig.from_run(RunConfig(data=data), "run/final").rouge == "muse"
    assert EvalConfig.from_run(RunConfig(data=_tofu_data()), "run/final").rouge == "tofu"
    mixed = DataConfig(forget=_tofu_data().forget, normal=data.normal)
    assert (
        "data.forget.format='tofu' and data.normal.format='muse_knowmem' are scored with different ROUGE-L "
        "conventions (TOFU's recall, MUSE's F1), and one evaluation reports one"
    ) in mixed.problems()


def test_retain_eval_settings(tmp_path):
    problems = EvalConfig(
        data=_tofu_data(), retain_eval=str(tmp_path / "none.json"), retrained_path=str(tmp_path)
    ).evaluation_problems()
    assert "retain_eval and retrained_path both give the retain model of forget quality: give one" in problems
    assert f"retain_eval: file {str(tmp_path / 'none.json')!r} does not exist" in problems
    saved = tmp_path / "eval.json"
    saved.write_text("{}")
    other = DataConfig(forget=DatasetSpec(source=str(saved), format="pairs"))
    assert (
        "retain_eval gives TOFU's forget quality, which needs data.forget.format=tofu (got 'pairs')"
        in EvalConfig(data=other, retain_eval=str(saved)).evaluation_problems()
    )


# ----------------------------------------------------------------------------------------------------
# With a model
# ----------------------------------------------------------------------------------------------------


def _mean_nll_float64(model, tokenizer, pair, answer, context) -> float:
    """Mean NLL per token of ``answer`` after ``pair``'s prompt, from the model's logits in float64."""
    sequence = tokenize_pair(tokenizer, Pair(pair.prompt, answer, "t", 1), context.prompt_format, 96)
    ids = torch.tensor([sequence.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # [L-1, V]: position t predicts token t+1
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)  # [L-1]
    scored = torch.tensor(sequence.response_mask[1:], dtype=torch.bool)
    return float(-log_probs[scored].mean())


def test_truth_ratios_of_a_model_match_a_float64_computation(tiny_model_dir):
    """Pairs with 2 and 3 wrong answers and one without any: each ratio equals the float64 one, the short list's
    padding and the bare pair's stand-ins change nothing."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = EvalContext(tokenizer, EvalConfig(data=DataConfig(max_length=96), batch_size=3), 1)
    pairs = [
        Pair(
            "Where was Ada born?",
            "In Fenmouth.",
            "t",
            1,
            paraphrased_answer="Fenmouth, it was.",
            perturbed_answers=("In Harwick.", "In Lowdell."),
        ),
        Pair("What does Bo write?", "Bo writes poems.", "t", 2),
        Pair(
            "Who taught Cy?",
            "A clockmaker did.",
            "t",
            3,
            paraphrased_answer="Cy learnt from a clockmaker.",
            perturbed_answers=("A baker did.", "A ferryman did.", "A cartographer did."),
        ),
    ]
    with torch.no_grad():
        measured = benchmarks.truth_ratios(model, pairs, benchmarks.num_wrong_answers(pairs), context)
    assert measured[1] is None
    for pair, ratio in zip(pairs[::2], measured[::2]):
        right = _mean_nll_float64(model, tokenizer, pair, pair.paraphrased_answer, context)
        wrong = [_mean_nll_float64(model, tokenizer, pair, answer, context) for answer in pair.perturbed_answers]
        expected = math.exp(-sum(wrong) / len(wrong)) / (math.exp(-right) + 1e-10)
        assert ratio == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def tofu_evaluation(tiny_model_dir, tmp_path_factory, bpe_tokenizer):
    """`dsunlearn eval`'s entry on the bundled TOFU-shaped files: the tiny model as unlearned, another tiny model as
    original and as retain model (retrained_path). Returns (settings, summary)."""
    from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model

    other = save_tiny_model(
        build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1),
        bpe_tokenizer,
        tmp_path_factory.mktemp("other"),
    )
    cfg = EvalConfig(
        model_path=str(tiny_model_dir),
        reference_path=str(other),
        retrained_path=str(other),
        data=_tofu_data(),
        max_new_tokens=2,
        batch_size=8,
        dtype="fp32",
        bootstrap_resamples=20,
        output_dir=str(tmp_path_factory.mktemp("tofu_eval")),
    )
    return cfg, run_evaluation(cfg)


def test_tofu_evaluation_end_to_end(tofu_evaluation, tmp_path):
    """Every TOFU number of the evaluation follows from its per-question values; the retain model's ratios given as
    a saved evaluation give the same forget quality as the model itself."""
    cfg, summary = tofu_evaluation
    tofu = summary["tofu"]
    ratios = tofu["truth_ratios"]
    assert set(ratios) == {"forget_train", "forget_held_out", "normal_held_out"}
    # The original model is the retain model here: its ratios are the retain side, and its forget quality is 1.
    assert tofu["retain_model"] == f"retrained_path: {cfg.retrained_path}"
    assert tofu["forget_quality"]["original"] == pytest.approx(1.0)
    retain = ratios["forget_train"]["original"]
    assert tofu["forget_quality"]["unlearned"] == pytest.approx(
        benchmarks.forget_quality(ratios["forget_train"]["unlearned"], retain)
    )
    for role in ("original", "unlearned"):
        forget, normal = summary[role]["forget_train"], summary[role]["normal_held_out"]
        assert forget["forget_truth_ratio"] == pytest.approx(
            sum(min(r, 1 / r) for r in ratios["forget_train"][role]) / len(ratios["forget_train"][role])
        )
        assert normal["retain_truth_ratio"] == pytest.approx(
            sum(max(0.0, 1 - r) for r in ratios["normal_held_out"][role]) / len(ratios["normal_held_out"][role])
        )
        present = [normal["answer_prob"], normal["rouge_l_recall"], normal["retain_truth_ratio"]]
        expected = 0.0 if 0.0 in present else len(present) / sum(1 / value for value in present)
        assert tofu["model_utility"][role]["value"] == pytest.approx(expected)
    out_dir = Path(cfg.output_dir)
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    forget_samples = [row for row in samples if row["set"] == "forget_train"]
    assert [row["unlearned_truth_ratio"] for row in forget_samples] == ratios["forget_train"]["unlearned"]
    assert [row["unlearned_answer_prob"] for row in forget_samples] == pytest.approx(
        [math.exp(-row["unlearned_nll"]) for row in forget_samples]
    )
    assert "## TOFU" in (out_dir / "report.md").read_text()

    # The retain model as a saved evaluation: an eval.json whose evaluated model has the retain model's ratios.
    saved = tmp_path / "retain_eval.json"
    saved.write_text(json.dumps({"tofu": {"truth_ratios": {"forget_train": {"unlearned": retain}}}}))
    again = run_evaluation(
        EvalConfig(
            **{
                **cfg.__dict__,
                "retrained_path": None,
                "retain_eval": str(saved),
                "sets": ["forget_train"],
                "output_dir": str(tmp_path / "again"),
            }
        )
    )
    assert again["tofu"]["forget_quality"] == pytest.approx(tofu["forget_quality"])
