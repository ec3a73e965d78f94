"""Evaluation: values checked by hand through the models' logits, and 2 ZeRO-3 ranks equal one process."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from launching import run_evaluation_ranks

from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model
from dsunlearn.data.tokenization import tokenize_pair, tokenize_prompt
from dsunlearn.eval.eval_config import EvalConfig
from dsunlearn.eval.evaluation import build_eval_sets, evaluate_models, main, run_evaluation
from dsunlearn.eval.metrics import bootstrap_ci, distinct_n, perplexity, rouge_l
from dsunlearn.eval.sharding import shard_indices
from dsunlearn.settings.config import ConfigError, DataConfig
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.prompt_format import PromptFormat
from dsunlearn.tools.demo import demo_data_dir

MAX_NEW_TOKENS = 6
MAX_LENGTH = 96


def _data_config() -> DataConfig:
    demo = demo_data_dir()
    return DataConfig(
        forget=DatasetSpec(source=str(demo / "forget.jsonl"), format="pku_saferlhf", held_out_fraction=0.2),
        normal=DatasetSpec(source=str(demo / "normal.jsonl"), format="truthfulqa", held_out_fraction=0.1),
        max_length=MAX_LENGTH,
        seed=7,
    )


def _eval_config(out_dir, model_dir, reference_dir, **overrides) -> EvalConfig:
    settings = dict(
        model_path=str(model_dir),
        reference_path=str(reference_dir),
        data=_data_config(),
        max_samples=3,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=2,
        dtype="fp32",
        output_dir=str(out_dir),
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def _read_samples(out_dir):
    return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, bpe_tokenizer):
    """A second tiny Llama with other weights: the "original" model of these tests."""
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def harm_classifier_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny random sequence classifier whose labels are named like a real harm classifier's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=bpe_tokenizer.pad_token_id,
        id2label={0: "safe", 1: "Harmful"}, label2id={"safe": 0, "Harmful": 1},
    )
    torch.manual_seed(3)
    classifier = LlamaForSequenceClassification(config)
    # Bias the head so both labels occur on these prompts (a purely random head tends to pick one label).
    with torch.no_grad():
        classifier.score.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("harm_classifier")
    classifier.save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_model_dir, reference_dir, harm_classifier_dir):
    """One in-process evaluation (batch 2) shared by the checks below: (config, summary, out_dir)."""
    out_dir = tmp_path_factory.mktemp("eval_single")
    cfg = _eval_config(out_dir, tiny_model_dir, reference_dir, harm_classifier=str(harm_classifier_dir))
    return cfg, run_evaluation(cfg), out_dir


def _manual_scores(model, reference, tokenizer, pair):
    """NLL sums of the response under both models and the KL(reference || model) sum, straight from logits."""
    sequence = tokenize_pair(tokenizer, pair, PromptFormat(), MAX_LENGTH)
    input_ids = torch.tensor([sequence.input_ids])
    log_probs = F.log_softmax(model(input_ids).logits[0].double(), -1)
    ref_log_probs = F.log_softmax(reference(input_ids).logits[0].double(), -1)
    nll = ref_nll = kl = 0.0
    positions = [t for t, is_response in enumerate(sequence.response_mask) if is_response]
    for t in positions:
        token = sequence.input_ids[t]
        nll -= float(log_probs[t - 1, token])
        ref_nll -= float(ref_log_probs[t - 1, token])
        kl += float((ref_log_probs[t - 1].exp() * (ref_log_probs[t - 1] - log_probs[t - 1])).sum())
    return nll, ref_nll, kl, len(positions)


def _manual_greedy(model, prompt_ids, eos_id):
    ids, generated = list(prompt_ids), []
    for _ in range(MAX_NEW_TOKENS):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        generated.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return generated


def test_single_process_values_match_hand_computation(single_process_run, tiny_model_dir, reference_dir, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    cfg, summary, out_dir = single_process_run
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    sets, _ = build_eval_sets(cfg.data, cfg.sets, cfg.max_samples)
    samples = _read_samples(out_dir)
    assert summary["num_samples"] == {"forget_train": 3, "forget_held_out": 3, "normal_held_out": 3}
    assert [(row["set"], row["index"]) for row in samples] == [(s, i) for s in sets for i in range(3)]

    with torch.no_grad():
        for set_name, pairs in sets.items():
            scores = [_manual_scores(model, reference, bpe_tokenizer, pair) for pair in pairs]
            tokens = sum(s[3] for s in scores)
            # Token-level means over the set, batched with padding in the evaluation, one by one here.
            assert summary["unlearned"][set_name]["nll"] == pytest.approx(sum(s[0] for s in scores) / tokens, rel=1e-5)
            assert summary["original"][set_name]["nll"] == pytest.approx(sum(s[1] for s in scores) / tokens, rel=1e-5)
            assert summary["unlearned"][set_name]["kl"] == pytest.approx(sum(s[2] for s in scores) / tokens, rel=1e-4)
            assert summary["unlearned"][set_name]["kl"] > 1e-4  # different weights: a real divergence
            assert summary["original"][set_name]["kl"] == 0.0

            rows = [row for row in samples if row["set"] == set_name]
            generated_nll, generated_tokens = 0.0, 0
            for pair, row, score in zip(pairs, rows, scores):
                assert row["prompt"] == pair.prompt and row["response"] == pair.response
                assert row["unlearned_nll"] == pytest.approx(score[0] / score[3], rel=1e-5)
                # Greedy decoding one prompt at a time, without padding, must give what the batched,
                # left-padded generate gave.
                prompt_ids = tokenize_prompt(bpe_tokenizer, pair.prompt, PromptFormat(), MAX_LENGTH)
                generated = _manual_greedy(model, prompt_ids, bpe_tokenizer.eos_token_id)
                assert row["unlearned_output"] == bpe_tokenizer.decode(generated, skip_special_tokens=True).strip()
                original_generated = _manual_greedy(reference, prompt_ids, bpe_tokenizer.eos_token_id)
                original_text = bpe_tokenizer.decode(original_generated, skip_special_tokens=True).strip()
                assert row["original_output"] == original_text
                # Fluency: the generated tokens scored by the original model.
                log_probs = F.log_softmax(reference(torch.tensor([prompt_ids + generated])).logits[0].double(), -1)
                for k, token in enumerate(generated):
                    generated_nll -= float(log_probs[len(prompt_ids) + k - 1, token])
                generated_tokens += len(generated)
            assert summary["unlearned"][set_name]["fluency_ppl"] == pytest.approx(
                perplexity(generated_nll, generated_tokens), rel=1e-5
            )
            assert summary["unlearned"][set_name]["generation_tokens"] == pytest.approx(generated_tokens / len(pairs))
            # The text metrics are the metric functions applied to each model's own generations.
            for role in ("original", "unlearned"):
                outputs = [row[f"{role}_output"] for row in rows]
                values = summary[role][set_name]
                # The default preset is tofu: rouge-score's ROUGE-L recall with the stemmer.
                recalls = [rouge_l(output, pair.response, "recall", True) for output, pair in zip(outputs, pairs)]
                assert [row[f"{role}_rouge_l_recall"] for row in rows] == pytest.approx(recalls)
                assert values["rouge_l_recall"] == pytest.approx(sum(recalls) / len(recalls))
                flags = [float(r >= 0.5) for r in recalls]
                assert values["reproduction_rate"] == pytest.approx(sum(flags) / len(flags))
                assert values["distinct_1"] == pytest.approx(distinct_n(outputs, 1))
                assert values["distinct_2"] == pytest.approx(distinct_n(outputs, 2))
                # Intervals: the seeded bootstrap of the per-sample values; each contains its statistic.
                intervals = values["ci"]
                assert intervals["reproduction_rate"] == pytest.approx(bootstrap_ci(flags))
                assert intervals["rouge_l_recall"] == pytest.approx(bootstrap_ci(recalls))
                token_counts = [score[3] for score in scores]
                nll_sums = [score[0 if role == "unlearned" else 1] for score in scores]
                assert intervals["nll"] == pytest.approx(bootstrap_ci((nll_sums, token_counts), "ratio"), rel=1e-5)
                assert intervals["ppl"] == pytest.approx([math.exp(v) for v in intervals["nll"]])
                assert set(intervals) >= {"nll", "ppl", "kl", "reproduction_rate", "rouge_l_recall",
                                          "generation_tokens", "fluency_ppl"}
                for metric, (low, high) in intervals.items():
                    assert low - 1e-9 <= values[metric] <= high + 1e-9, (role, set_name, metric)
            similarity = [rouge_l(row["unlearned_output"], row["original_output"], "f1", True) for row in rows]
            assert summary["unlearned"][set_name]["similarity_to_original"] == pytest.approx(sum(similarity) / 3)
            assert summary["unlearned"][set_name]["ci"]["similarity_to_original"] == pytest.approx(
                bootstrap_ci(similarity)
            )


def test_harm_classifier_rate_matches_its_own_judgement(single_process_run, harm_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, summary, out_dir = single_process_run
    classifier = AutoModelForSequenceClassification.from_pretrained(harm_classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(harm_classifier_dir)
    samples = _read_samples(out_dir)
    judged = []
    for row in samples:
        for role in ("original", "unlearned"):
            inputs = tokenizer(f"{row['prompt']}\n{row[role + '_output']}", return_tensors="pt")
            with torch.no_grad():
                is_harmful = int(classifier(**inputs).logits[0].argmax()) == 1  # label 1 is "Harmful"
            assert row[f"{role}_harmful"] == is_harmful
            judged.append(is_harmful)
    assert any(judged) and not all(judged), "the fixture classifier should produce both labels"
    for role in ("original", "unlearned"):
        for set_name in summary["num_samples"]:
            rows = [row for row in samples if row["set"] == set_name]
            expected = sum(row[f"{role}_harmful"] for row in rows) / len(rows)
            assert summary[role][set_name]["harmful_rate"] == pytest.approx(expected)


def test_outputs_on_disk(single_process_run):
    _, summary, out_dir = single_process_run
    assert json.loads((out_dir / "eval.json").read_text()) == summary
    assert {name: split["prompt_overlap"] for name, split in summary["split"].items()} == {"forget": 0, "normal": 0}
    report = (out_dir / "report.md").read_text()
    assert "| forget_train / reproduction_rate |" in report and "| normal_held_out / kl |" in report
    for set_name in summary["num_samples"]:
        assert (out_dir / f"metrics_{set_name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_against_itself_has_zero_kl(tmp_path, tiny_model_dir, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # The trainer's entry: already-built models (here one object in both roles); the paths are only labels.
    cfg = _eval_config(tmp_path, "policy in memory", tiny_model_dir, sets=["normal_held_out"], max_samples=2,
                       max_new_tokens=3)
    sets, _ = build_eval_sets(cfg.data, cfg.sets, cfg.max_samples)
    model.train()
    summary = evaluate_models(model, model, bpe_tokenizer, sets, cfg)
    assert model.training, "evaluate_models must give the model back in the mode it came in"
    unlearned, original = summary["unlearned"]["normal_held_out"], summary["original"]["normal_held_out"]
    assert abs(unlearned["kl"]) < 1e-6
    assert unlearned["similarity_to_original"] == 1.0
    assert unlearned["nll"] == pytest.approx(original["nll"], rel=1e-6)
    differ = ("kl", "similarity_to_original", "nll", "ppl", "ci")
    assert {k: v for k, v in unlearned.items() if k not in differ} == {
        k: v for k, v in original.items() if k not in differ
    }
    assert {k: v for k, v in unlearned["ci"].items() if k not in differ} == {
        k: v for k, v in original["ci"].items() if k not in differ
    }


def test_from_run_takes_the_runs_settings(tmp_path, tiny_model_dir):
    from dsunlearn.settings.config import ModelConfig, OutputConfig, RunConfig

    run_dir = tmp_path / "ga_rdn_kl"
    run = RunConfig(
        model=ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"),
        data=_data_config(),
        output=OutputConfig(dir=str(run_dir), eval_max_samples=5, eval_max_new_tokens=7),
    )
    cfg = EvalConfig.from_run(run, str(run_dir / "final"))
    assert (cfg.model_path, cfg.reference_path) == (str(run_dir / "final"), str(tiny_model_dir))
    assert cfg.data == run.data and cfg.dtype == "fp32" and cfg.name == "ga_rdn_kl"
    assert (cfg.max_samples, cfg.max_new_tokens) == (5, 7)
    assert cfg.output_dir == str(run_dir / "eval") and cfg.metrics_jsonl == str(run_dir / "metrics.jsonl")
    assert cfg.evaluation_problems() == [f"metrics_jsonl: file {str(run_dir / 'metrics.jsonl')!r} does not exist"]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cfg.evaluation_problems() == []


def test_eval_sets_follow_the_trainers_split():
    from dsunlearn.data.load import load_pairs
    from dsunlearn.data.split import split_pairs

    data = _data_config()
    sets, splits = build_eval_sets(data, ["forget_train", "forget_held_out", "normal_held_out"])
    forget_train, forget_held_out = split_pairs(load_pairs(data.forget), 0.2, 7)
    assert sets["forget_train"] == forget_train and sets["forget_held_out"] == forget_held_out
    assert sets["normal_held_out"] == split_pairs(load_pairs(data.normal), 0.1, 7)[1]
    assert not set(sets["forget_train"]) & set(sets["forget_held_out"])
    assert splits["forget"]["prompt_overlap"] == splits["normal"]["prompt_overlap"] == 0
    assert splits["forget"]["held_out_pairs"] == len(forget_held_out)
    sets, splits = build_eval_sets(data, ["normal_held_out"], max_samples=4)
    assert list(sets) == ["normal_held_out"] and len(sets["normal_held_out"]) == 4 and list(splits) == ["normal"]


def test_shards_are_equal_sized_contiguous_and_cover_every_sample():
    for num_samples in (1, 2, 3, 7, 8):
        for world_size in (1, 2, 3):
            shards = [shard_indices(num_samples, rank, world_size) for rank in range(world_size)]
            assert len({len(indices) for indices, _ in shards}) == 1  # same number of calls on every rank
            real = [i for indices, num_real in shards for i in indices[:num_real]]
            assert real == list(range(num_samples))
            assert all(0 <= i < num_samples for indices, _ in shards for i in indices)


def test_config_problems_are_all_listed(tmp_path):
    cfg = EvalConfig(
        model_path=str(tmp_path / "missing"), reference_path="", data=_data_config(), sets=["forget_train", "bogus"],
        max_new_tokens=0, batch_size=0, reproduction_threshold=1.5, harm_classifier=str(tmp_path / "nope"),
        harm_classifier_input="{prompt}", rouge="rouge2", rouge_measure="fmeasure", confidence_level=1.0,
        bootstrap_resamples=0,
    )
    problems = cfg.problems()
    for expected in ("model_path: local folder", "reference_path is empty", "unknown ['bogus']", "max_new_tokens=0",
                     "batch_size=0", "reproduction_threshold=1.5", "harm_classifier: local folder",
                     "harm_classifier_input must contain", "rouge: unknown preset 'rouge2'",
                     "rouge_measure: unknown 'fmeasure'", "confidence_level=1.0", "bootstrap_resamples=0"):
        assert any(expected in p for p in problems), (expected, problems)
    with pytest.raises(ConfigError):
        run_evaluation(cfg)


def test_harm_classifier_label_must_exist(tmp_path, tiny_model_dir, harm_classifier_dir, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = _eval_config(tmp_path, tiny_model_dir, tiny_model_dir, harm_classifier=str(harm_classifier_dir),
                       harmful_label="toxic", sets=["normal_held_out"], max_samples=1)
    with pytest.raises(ValueError, match=r"labels \['Harmful', 'safe'\]"):
        evaluate_models(model, model, bpe_tokenizer, build_eval_sets(cfg.data, cfg.sets, 1)[0], cfg)


@pytest.mark.distributed
def test_two_zero3_ranks_match_single_process(
    tmp_path, single_process_run, tiny_model_dir, reference_dir, harm_classifier_dir
):
    """`dsunlearn eval` on 2 gloo ranks (ZeRO-3 engines, sharded prompts, synced generate) = one process."""
    single_cfg, single, single_dir = single_process_run
    out_dir = tmp_path / "eval_zero3"
    demo = demo_data_dir()
    # A batch size that differs from the single-process run: padding must not change any number.
    argv = [
        "--model_path", str(tiny_model_dir), "--reference_path", str(reference_dir),
        "--data.forget.source", str(demo / "forget.jsonl"), "--data.forget.format", "pku_saferlhf",
        "--data.forget.held_out_fraction", "0.2",
        "--data.normal.source", str(demo / "normal.jsonl"), "--data.normal.format", "truthfulqa",
        "--data.normal.held_out_fraction", "0.1", "--data.max_length", str(MAX_LENGTH), "--data.seed", "7",
        "--max_samples", "3", "--max_new_tokens", str(MAX_NEW_TOKENS), "--batch_size", "1", "--dtype", "fp32",
        "--harm_classifier", str(harm_classifier_dir), "--output_dir", str(out_dir),
    ]
    run_evaluation_ranks(argv)

    distributed = json.loads((out_dir / "eval.json").read_text())
    assert distributed["world_size"] == 2
    assert distributed["num_samples"] == single["num_samples"]
    for role in ("original", "unlearned"):
        assert distributed[role].keys() == single[role].keys()
        for set_name, values in single[role].items():
            got = dict(distributed[role][set_name])
            assert got.pop("ci").keys() == values["ci"].keys()
            for metric, interval in values["ci"].items():
                assert distributed[role][set_name]["ci"][metric] == pytest.approx(interval, rel=1e-4, abs=1e-6)
            expected = {k: v for k, v in values.items() if k != "ci"}
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (role, set_name)
    single_samples, distributed_samples = _read_samples(single_dir), _read_samples(out_dir)
    assert [(r["set"], r["index"], r["unlearned_output"], r["original_output"]) for r in distributed_samples] == [
        (r["set"], r["index"], r["unlearned_output"], r["original_output"]) for r in single_samples
    ]
    assert (out_dir / "report.md").is_file()


def test_cli_parses_into_eval_config(tmp_path, tiny_model_dir, reference_dir):
    out_dir = tmp_path / "cli"
    summary = main([
        "--model_path", str(tiny_model_dir), "--reference_path", str(reference_dir),
        "--data.normal.source", str(demo_data_dir() / "normal.jsonl"), "--data.normal.format", "truthfulqa",
        "--data.forget.source", str(demo_data_dir() / "forget.jsonl"),
        "--sets", "[normal_held_out]", "--max_samples", "1", "--max_new_tokens", "2", "--dtype", "fp32",
        "--reproduction_threshold", "0.25", "--name", "cli-run", "--output_dir", str(out_dir),
        "--rouge", "muse", "--confidence_level", "0.9", "--bootstrap_resamples", "50",
    ])
    assert summary["num_samples"] == {"normal_held_out": 1}
    assert summary["config"]["reproduction_threshold"] == 0.25 and summary["name"] == "cli-run"
    # The muse preset reports ROUGE-L F1 (without the stemmer) under a key that says so.
    assert summary["config"]["rouge"] == "muse" and summary["config"]["bootstrap_resamples"] == 50
    assert "rouge_l_f1" in summary["unlearned"]["normal_held_out"]
    assert "rouge_l_recall" not in summary["unlearned"]["normal_held_out"]
    assert "| set / metric | original | cli-run |" in (out_dir / "report.md").read_text()


def test_run_dir_takes_the_runs_settings(tiny_model_dir, tmp_path):
    """``dsunlearn eval --run_dir RUN``: the run's export, original model, data, split and precision."""
    import shutil

    from dsunlearn.eval.evaluation import main
    from dsunlearn.settings.config import parse_run_config

    run_dir = tmp_path / "run"
    _, resolved = parse_run_config(["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir),
                                    "--output.dir", str(run_dir), "--data.forget.held_out_fraction", "0.3"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(resolved)
    shutil.copytree(tiny_model_dir, run_dir / "final")
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "forget_ce": 6.0, "random_ce": 6.1, "normal_kl": 0.0, "normal_ce": 6.2, "total": 3.1}\n'
    )
    summary = main(["--run_dir", str(run_dir), "--max_samples", "2", "--max_new_tokens", "4",
                    "--sets", "[forget_held_out]", "--batch_size", "2"])
    assert summary["model"] == str(run_dir / "final") and summary["reference"] == str(tiny_model_dir)
    assert summary["config"]["dtype"] == "fp32"
    assert summary["config"]["data"]["holdout"]["source"] == "dsunlearn/assets/demo/holdout.jsonl"
    assert summary["unlearned"]["forget_held_out"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (run_dir / "eval" / "eval.json").is_file()


@pytest.mark.distributed
def test_a_rank_that_fails_ends_every_rank_with_one_message(tmp_path, tiny_model_dir):
    """`dsunlearn eval` on 2 ranks where one node cannot read the original (its own hub cache lacks it): the trainer's
    watchdog ends both ranks with the usage code and one message naming the rank, no traceback (issue 17 item 10)."""
    import os
    import subprocess
    import sys

    from launching import REPO, free_port
    from local_hub import add_revision

    caches = [tmp_path / "node0" / "hub", tmp_path / "node1" / "hub"]
    add_revision(caches[0], "dsunlearn/tiny-eval", tiny_model_dir, branch="main")
    caches[1].mkdir(parents=True)  # node 1's staging of the model failed
    demo = demo_data_dir()
    argv = ["--model_path", str(tiny_model_dir), "--reference_path", "dsunlearn/tiny-eval",
            "--data.forget.source", str(demo / "forget.jsonl"), "--data.normal.source", str(demo / "normal.jsonl"),
            "--data.normal.format", "truthfulqa", "--max_samples", "1", "--max_new_tokens", "2", "--dtype", "fp32",
            "--output_dir", str(tmp_path / "eval")]
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-m", "dsunlearn", "eval", *argv], cwd=REPO,
                         env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(rank),
                                  LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                  HF_HUB_CACHE=str(cache)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank, cache in enumerate(caches)
    ]
    try:
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    both = "\n".join(outputs)
    assert [process.returncode for process in processes] == [2, 2], both[-4000:]
    assert "Traceback" not in both, both[-4000:]
    message = "reference_path: cannot read the model config of 'dsunlearn/tiny-eval'"
    assert both.count(message) == 1 and message in outputs[0], both[-4000:]  # rank 0 says it once
    assert "rank 1 (" in outputs[0]  # naming the rank that failed
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_a_rank_imports_no_plotting_library_until_it_writes_the_report():
    """matplotlib costs every rank about a second at start-up; only rank 0 plots, at the end (evaluation.write_outputs)."""
    code = "import sys, dsunlearn.train, dsunlearn.eval.evaluation; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
