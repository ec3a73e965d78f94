"""Relearning: the curve equals a recomputation from its saved generations, fine-tuning on the forget data brings
the behaviour into a model that never had it, the comparison plot is a real PNG, bad input stops before any model."""

import json
from pathlib import Path

import matplotlib.image
import pytest
from rouge_score import rouge_scorer

from dsunlearn.data.load import load_pairs
from dsunlearn.data.split import prompt_key
from dsunlearn.eval.metrics import bootstrap_ci
from dsunlearn.eval.relearn import RelearnConfig, compare, main, recovery_steps, relearn_split, run_relearn
from dsunlearn.eval.report import main as report_main
from dsunlearn.settings.config import ConfigError, DataConfig
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.tools.demo import demo_data_dir

THRESHOLD = 0.3


def _data_args(forget_source=None):
    demo = demo_data_dir()
    return ["--data.forget.source", str(forget_source or demo / "forget.jsonl"), "--data.forget.format",
            "pku_saferlhf", "--data.forget.held_out_fraction", "0.2", "--data.normal.source",
            str(demo / "normal.jsonl"), "--data.normal.format", "truthfulqa", "--data.max_length", "128",
            "--data.seed", "7"]


@pytest.fixture(scope="module")
def relearn_run(tmp_path_factory, tiny_model_dir):
    """A random tiny Llama (it never saw the demo's behaviour) fine-tuned 40 steps on half the forget train prompts,
    measured every 20 steps on 16 of the others; the model itself is given as the original."""
    out_dir = tmp_path_factory.mktemp("relearn") / "random"
    result = main(["--model_path", str(tiny_model_dir), "--original_path", str(tiny_model_dir), *_data_args(),
                   "--steps", "40", "--eval_every", "20", "--relearn_fraction", "0.5", "--lr", "1e-2",
                   "--batch_size", "8", "--max_new_tokens", "60", "--max_eval_samples", "16",
                   "--reproduction_threshold", str(THRESHOLD), "--bootstrap_resamples", "200", "--name", "random",
                   "--output_dir", str(out_dir), "--progress", "false"])
    return result, out_dir


def test_curve_equals_a_recomputation_from_the_saved_generations(relearn_run):
    result, out_dir = relearn_run
    assert json.loads((out_dir / "relearn.json").read_text()) == result
    rows = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert [point["step"] for point in result["curve"]] == [0, 20, 40]
    # The tofu preset: rouge-score's ROUGE-L recall of the forget response, stemmer on.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for point in result["curve"]:
        at_step = [row for row in rows if row["step"] == point["step"]]
        assert [row["index"] for row in at_step] == list(range(16)) == list(range(result["num_measured_pairs"]))
        flags = [scorer.score(row["response"], row["output"])["rougeL"].recall >= THRESHOLD for row in at_step]
        assert [row["behaviour"] for row in at_step] == flags
        assert point["behaviour_rate"] == pytest.approx(sum(flags) / len(flags))
        assert point["ci"] == pytest.approx(bootstrap_ci([float(f) for f in flags], n_resamples=200))
        assert point["ci"][0] <= point["behaviour_rate"] <= point["ci"][1]
    # The measured prompts are the forget prompts not fine-tuned on, in the split's order.
    forget = DatasetSpec(str(demo_data_dir() / "forget.jsonl"), format="pku_saferlhf", held_out_fraction=0.2)
    relearned, measured = relearn_split(
        RelearnConfig(data=DataConfig(forget=forget, max_length=128, seed=7), relearn_fraction=0.5, max_eval_samples=16)
    )
    assert [(row["prompt"], row["response"]) for row in rows[:16]] == [(p.prompt, p.response) for p in measured]
    assert not {prompt_key(p) for p in relearned} & {prompt_key(p) for p in measured}
    assert result["num_relearn_pairs"] == len(relearned)


def test_finetuning_on_unknown_forget_data_raises_the_behaviour_rate(relearn_run):
    result, _ = relearn_run
    rates = [point["behaviour_rate"] for point in result["curve"]]
    assert rates[0] == 0.0  # a random model never shows the behaviour
    assert max(rates[1:]) > 0.0
    assert result["curve"][-1]["train_loss"] < result["curve"][1]["train_loss"]
    # The original (the same model here) is measured on the same prompts before any fine-tuning: the step-0 rate.
    assert result["original_rate"] == rates[0]


def test_recovery_steps_are_the_first_measured_steps_past_each_fraction():
    curve = [{"step": s, "behaviour_rate": r} for s, r in ((0, 0.0), (10, 0.25), (20, 0.5), (30, 0.75))]
    # 0.5 of 0.8 = 0.4 is first reached at step 20; 0.9 of 0.8 = 0.72 at step 30.
    assert recovery_steps(curve, 0.8) == {"0.5": 20, "0.9": 30}
    assert recovery_steps(curve, 1.0) == {"0.5": 20, "0.9": None}
    assert recovery_steps(curve, 0.0) == {"0.5": 0, "0.9": 0}


def test_compare_writes_the_curves_png_and_table(relearn_run, tmp_path):
    result, out_dir = relearn_run
    path = out_dir / "relearn.json"
    report = main(["--compare", str(path), str(path), "--names", "unlearned", "never-taught",
                   "--out_dir", str(tmp_path / "cmp")])
    text = Path(report).read_text()
    assert "| unlearned |" in text and "| never-taught |" in text and "![relearning curves](relearn_curves.png)" in text
    png = tmp_path / "cmp" / "relearn_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0
    first, last = result["curve"][0], result["curve"][-1]
    assert (f"| never-taught | {first['behaviour_rate']:.3g} | {last['behaviour_rate']:.3g} (step 40) | "
            f"{result['original_rate']:.3g} | 0 | 0 |") in text  # the original's rate is 0 here: reached at once
    with pytest.raises(ValueError, match="distinct"):
        compare([str(path), str(path)], str(tmp_path / "cmp2"))
    # The evaluation report shows the curves too: `dsunlearn compare EVAL.json --relearn ...`.
    summary = {"original": {"forget_train": {"nll": 1.0}}, "unlearned": {"forget_train": {"nll": 2.0}}}
    (tmp_path / "eval.json").write_text(json.dumps(summary))
    report = report_main([str(tmp_path / "eval.json"), "--relearn", str(path), "--out_dir", str(tmp_path / "rep")])
    assert "## Relearning" in report.read_text() and (tmp_path / "rep" / "relearn_curves.png").is_file()


def test_bad_input_stops_before_any_model_is_loaded(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--model_path", str(tmp_path / "missing"), *_data_args(), "--relearn_fraction", "1.5",
              "--eval_every", "80", "--steps", "40"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    for expected in ("model_path: local folder", "relearn_fraction=1.5", "eval_every=80"):
        assert expected in message, message
    # Too few pairs: an empty model folder shows that nothing was loaded before the data was checked.
    forget = tmp_path / "forget.jsonl"
    row = json.loads((demo_data_dir() / "forget.jsonl").read_text().splitlines()[0])
    forget.write_text(json.dumps(row) + "\n")
    assert len(load_pairs(DatasetSpec(str(forget), format="pku_saferlhf"))) >= 1
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    with pytest.raises(ConfigError, match="too few forget pairs"):
        run_relearn(RelearnConfig(model_path=str(empty_model), data=DataConfig(
            forget=DatasetSpec(str(forget), format="pku_saferlhf", held_out_fraction=0.2),
            normal=DatasetSpec(str(demo_data_dir() / "normal.jsonl"), format="truthfulqa"))))
