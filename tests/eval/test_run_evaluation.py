"""The evaluations of a training run (end of training, and in the loop) read the run's own settings: the original is
the model at the run's revision, loaded as the trainer loads its reference (issue 17 item 2), and the run's harm
classifier judges the generations of both (item 11). One 2-rank run pinned to the second revision of a local hub
repository, with the reference cache on (the default: the reference is freed before the end-of-run evaluation)."""

import json
import os
from pathlib import Path

import pytest
import torch
from launching import launch
from local_hub import add_revision, save_harm_classifier

from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model
from dsunlearn.eval.eval_config import EvalConfig
from dsunlearn.eval.evaluation import reference_load_kwargs, run_evaluation
from dsunlearn.settings.config import ConfigError, ModelConfig, OutputConfig, RunConfig, parse_run_config

REPO_ID = "dsunlearn/tiny-revisions"
SAMPLES = 2


@pytest.fixture(scope="module")
def harm_classifier(tmp_path_factory, bpe_tokenizer):
    return save_harm_classifier(tmp_path_factory.mktemp("harm_classifier"), bpe_tokenizer)


@pytest.fixture(scope="module")
def pinned_run(tiny_model_dir, bpe_tokenizer, harm_classifier, tmp_path_factory):
    """A hub repository whose main is the tiny model and whose v2 is another model of its shape; a run pinned to
    v2 (model.revision), evaluated at its end and after its one step, with a harm classifier. Returns (run folder,
    hub cache, the v2 snapshot folder, the main snapshot folder)."""
    root = tmp_path_factory.mktemp("pinned")
    hub = root / "hub"
    other = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    with torch.no_grad():
        other.lm_head.weight.mul_(30.0)  # far from uniform, unlike main's random model: every number differs
    other = save_tiny_model(other, bpe_tokenizer, root / "v2_model")
    main_commit = add_revision(hub, REPO_ID, tiny_model_dir, branch="main")
    v2_commit = add_revision(hub, REPO_ID, other, branch="v2")
    snapshots = hub / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"
    run_dir = root / "run"
    args = ["--config", "configs/demo.yaml", "--model.name_or_path", REPO_ID, "--model.revision", "v2",
            "--output.dir", str(run_dir), "--train.max_steps", "1", "--output.evaluate", "true",
            "--output.eval_max_samples", str(SAMPLES), "--output.eval_max_new_tokens", "4",
            "--output.eval_every", "1", "--output.eval_during_max_samples", str(SAMPLES),
            "--output.harm_classifier", str(harm_classifier), "--output.harmful_label", "harmful"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(hub))  # the ranks' hub cache; HF_HUB_OFFLINE=1 comes from conftest
        code, output = launch(args)
    assert code == 0, output[-4000:]
    return run_dir, hub, snapshots / v2_commit, snapshots / main_commit


def _eval_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "eval.json").read_text())


def _evaluate_in_process(run_dir: Path, reference: Path, out_dir: Path) -> dict:
    """The run's end-of-run evaluation in this process, with ``reference`` (a snapshot folder) as the original."""
    run, _ = parse_run_config(["--config", str(run_dir / "config.yaml")])
    cfg = EvalConfig.from_run(run, model_path=str(run_dir / "final"))
    cfg.reference_path, cfg.reference_revision, cfg.output_dir = str(reference), None, str(out_dir)
    return run_evaluation(cfg)


# ---- item 2: the original is the run's revision ----


def test_from_run_loads_the_original_as_the_trainer_does():
    pinned = RunConfig(model=ModelConfig(name_or_path="org/model", revision="v2", trust_remote_code=True))
    cfg = EvalConfig.from_run(pinned, "run/final")
    assert (cfg.reference_path, cfg.reference_revision, cfg.trust_remote_code) == ("org/model", "v2", True)
    assert reference_load_kwargs(cfg) == ({"trust_remote_code": True}, {"trust_remote_code": True, "revision": "v2"})
    # Another repository as reference: its own revision, never the policy's.
    other = RunConfig(model=ModelConfig(name_or_path="org/model", revision="v2", reference_path="org/base"))
    assert (EvalConfig.from_run(other, "f").reference_path, EvalConfig.from_run(other, "f").reference_revision) == (
        "org/base", None)
    pinned_reference = RunConfig(model=ModelConfig(name_or_path="org/model", reference_path="org/base",
                                                   reference_revision="r1"))
    assert EvalConfig.from_run(pinned_reference, "f").reference_revision == "r1"


@pytest.mark.distributed
@pytest.mark.integration
def test_the_evaluations_original_is_the_runs_revision(pinned_run, tmp_path):
    run_dir, _, v2_snapshot, main_snapshot = pinned_run
    evaluated = _eval_json(run_dir)
    assert evaluated["reference"] == REPO_ID and evaluated["reference_revision"] == "v2"
    at_v2 = _evaluate_in_process(run_dir, v2_snapshot, tmp_path / "v2")
    at_main = _evaluate_in_process(run_dir, main_snapshot, tmp_path / "main")
    for set_name, expected in at_v2["original"].items():
        got = evaluated["original"][set_name]
        assert got["nll"] != pytest.approx(at_main["original"][set_name]["nll"], rel=1e-3), set_name
        for metric in ("nll", "fluency_ppl", "rouge_l_recall", "harmful_rate"):
            assert got[metric] == pytest.approx(expected[metric], rel=1e-4, abs=1e-6), (set_name, metric)
        # The KL and the similarity of the unlearned model are measured against that original too.
        for metric in ("kl", "similarity_to_original"):
            assert evaluated["unlearned"][set_name][metric] == pytest.approx(
                at_v2["unlearned"][set_name][metric], rel=1e-4, abs=1e-6), (set_name, metric)
    for attack, by_role in at_v2["mia"]["auc"].items():  # the membership inference's original too
        assert evaluated["mia"]["auc"][attack]["original"] == pytest.approx(by_role["original"], rel=1e-4), attack


# ---- item 11: the run's classifiers judge its evaluations ----


def test_classifiers_are_settings_of_the_run(tmp_path, harm_classifier):
    run = RunConfig(output=OutputConfig(harm_classifier=str(harm_classifier), harmful_label="Harmful"))
    cfg = EvalConfig.from_run(run, "run/final")
    assert (cfg.harm_classifier, cfg.harmful_label) == (str(harm_classifier), "Harmful")
    with pytest.raises(ConfigError) as refused:
        RunConfig(output=OutputConfig(harm_classifier=str(tmp_path / "none"), judge_classifier=str(harm_classifier),
                                      harm_classifier_input="{prompt}"))
    problems = "\n".join(refused.value.problems)
    assert "output.harm_classifier: local folder" in problems
    assert "output.harm_classifier_input must contain {response}" in problems
    assert "output.judge_classifier judges hallucinations, but data.application is 'harmful'" in problems
    assert "output.judge_classifier: " in problems  # its labels have no "hallucinated"


@pytest.mark.distributed
@pytest.mark.integration
def test_the_runs_harm_classifier_judges_both_evaluations(pinned_run):
    run_dir = pinned_run[0]
    evaluated = _eval_json(run_dir)
    in_loop = [json.loads(line) for line in (run_dir / "eval_during.jsonl").read_text().splitlines()]
    for set_name in ("forget_train", "forget_held_out", "normal_held_out"):
        for role in ("original", "unlearned"):
            assert evaluated[role][set_name]["harmful_rate"] is not None, (role, set_name)
        (rate,) = [row["value"] for row in in_loop
                   if (row["step"], row["set"], row["metric"]) == (1, set_name, "harmful_rate")]
        # Step 1 is the exported model: the in-loop judgement is the end-of-run one.
        assert rate == pytest.approx(evaluated["unlearned"][set_name]["harmful_rate"]), set_name
    assert os.path.isdir(run_dir / "final")
