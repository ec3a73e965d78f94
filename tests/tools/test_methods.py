"""python -m dsunlearn methods: the learning-rate choice, which runs it starts with which settings, its report, and
resuming. Training runs are replaced by a recorder that writes their evaluation (each preset's training is tested in
test_objective_terms and test_topology); the relearning is real, on the tiny model."""

import json

import pytest
import yaml

from dsunlearn.tools import methods
from dsunlearn.tools.methods import select_lr


def test_select_lr_forgets_most_within_the_kl_limit():
    results = {1e-4: {"forgetting": 0.5, "normal_kl": 0.01}, 3e-4: {"forgetting": 0.1, "normal_kl": 0.05},
               1e-3: {"forgetting": 0.0, "normal_kl": 0.4}}
    assert select_lr(results, kl_limit=0.1) == 3e-4
    assert select_lr(results, kl_limit=1.0) == 1e-3
    # A tie on forgetting goes to the lower KL; nothing within the limit: the lowest KL.
    results[3e-4]["forgetting"] = 0.0
    assert select_lr(results, kl_limit=1.0) == 3e-4
    assert select_lr(results, kl_limit=0.001) == 1e-4


def _evaluation(forgetting: float, normal_kl: float) -> dict:
    def side(rate, kl):
        sets = {
            "forget_train": {"behaviour_rate": rate, "fluency_ppl": 9.0, "ci": {"behaviour_rate": [rate / 2, rate]}},
            "forget_held_out": {"behaviour_rate": rate, "ci": {"behaviour_rate": [0.0, 1.0]}},
            "normal_held_out": {"kl": kl, "reproduction_rate": 0.75, "ci": {"kl": [kl / 2, kl * 2]}},
        }
        return sets

    mia = {"auc": {"min_k": {"original": 0.9, "unlearned": 0.6}}, "auc_ci": {"min_k": {"unlearned": [0.5, 0.7]}}}
    return {"original": side(0.9, 0.0), "unlearned": side(forgetting, normal_kl), "mia": mia}


# (forget_train behaviour rate, normal KL) each fake run reports, by (method, lr).
OUTCOMES = {("npo", 1e-4): (0.25, 0.02), ("npo", 1e-3): (0.0, 0.05)}


@pytest.fixture
def recorded_launches(monkeypatch, tiny_model_dir):
    """Replace launch.sh with a recorder: it writes the run's config.yaml, an export (the tiny model) and an
    evaluation from OUTCOMES; returns the list of recorded launches."""
    launches = []
    demo_data = yaml.safe_load(open(methods.REPO / "configs" / "demo.yaml"))["data"]

    def launch_run(train_args, run_dir, nproc):
        launches.append((list(train_args), run_dir.relative_to(run_dir.parents[1]).as_posix(), nproc))
        method = next(arg.split("/")[-1].removesuffix(".yaml") for arg in train_args if "/presets/" in arg)
        lr = float(train_args[train_args.index("--train.lr") + 1])
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": demo_data}))
        (run_dir / "final").symlink_to(tiny_model_dir)
        (run_dir / "eval" / "eval.json").write_text(json.dumps(_evaluation(*OUTCOMES[(method, lr)])))
        return 0

    monkeypatch.setattr(methods, "launch_run", launch_run)
    return launches


def test_tunes_each_method_then_reports_and_resumes(recorded_launches, tiny_model_dir, tmp_path):
    argv = ["--out_dir", str(tmp_path / "out"), "--methods", "npo", "--applications", "harmful",
            "--lrs", "1e-4", "1e-3", "--kl_limit", "0.1", "--relearn_steps", "2", "--relearn_eval_every", "2",
            "--relearn_max_samples", "4", "--nproc", "1", "--", "--model.name_or_path", str(tiny_model_dir)]
    report = methods.main(argv)

    # The method at each rate of the grid, once, with its preset over the application's config.
    assert [run_dir for _, run_dir, _ in recorded_launches] == ["harmful/npo-lr0.0001", "harmful/npo-lr0.001"]
    train_args = recorded_launches[0][0]
    assert train_args[:4] == ["--config", str(methods.REPO / "configs/demo.yaml"),
                              "--config", str(methods.REPO / "configs/presets/npo.yaml")]
    assert train_args[4:] == ["--model.name_or_path", str(tiny_model_dir), "--train.lr", "0.0001"]
    assert {nproc for _, _, nproc in recorded_launches} == {1}

    result = json.loads((tmp_path / "out" / "methods.json").read_text())
    assert result["chosen_lr"] == {"npo": 1e-3}  # forgets most within the KL limit
    npo = result["applications"]["harmful"]["npo"]
    assert npo["forget_train"] == {"value": 0.0, "ci": [0.0, 0.0]} and npo["mia"] == {"value": 0.6, "ci": [0.5, 0.7]}
    relearned = json.loads((tmp_path / "out" / "harmful" / "npo-lr0.001" / "relearn" / "relearn.json").read_text())
    assert relearned["model"] == str(tmp_path / "out" / "harmful" / "npo-lr0.001" / "final")
    assert [point["step"] for point in relearned["curve"]] == [0, 2] and relearned["num_measured_pairs"] == 4
    assert npo["relearn"]["last_rate"]["value"] == relearned["curve"][-1]["behaviour_rate"]

    text = report.read_text()
    assert "| original | – | 0.9 [0.45, 0.9] |" in text
    assert "| npo | 0.001 | 0 [0, 0] | 0 [0, 1] | 0.05 [0.025, 0.1] | 0.75 | 9 | 0.6 [0.5, 0.7] |" in text
    assert "| npo | 0.25 / 0.02 | 0 / 0.05 | 0.001 |" in text

    # The same command again launches and relearns nothing and writes the same report.
    relearned_at = (tmp_path / "out" / "harmful" / "npo-lr0.001" / "relearn" / "relearn.json").stat().st_mtime_ns
    assert methods.main(argv).read_text() == text
    assert len(recorded_launches) == 2
    assert (tmp_path / "out" / "harmful" / "npo-lr0.001" / "relearn" / "relearn.json").stat().st_mtime_ns == \
        relearned_at


def test_a_stopped_run_stops_the_command_and_a_failed_one_is_reported(monkeypatch, tiny_model_dir, tmp_path):
    codes = iter([75])
    monkeypatch.setattr(methods, "launch_run", lambda *args: next(codes))
    argv = ["--out_dir", str(tmp_path), "--methods", "ga", "--applications", "harmful", "--lrs", "1e-4", "--",
            "--model.name_or_path", str(tiny_model_dir)]
    with pytest.raises(SystemExit) as stopped:
        methods.main(argv)
    assert stopped.value.code == 75
    monkeypatch.setattr(methods, "launch_run", lambda *args: 1)
    with pytest.raises(SystemExit) as failed:
        methods.main(argv)
    assert failed.value.code == 1
    assert "Failed: " in (tmp_path / "methods.md").read_text()


@pytest.mark.parametrize("bad, message", [
    (["--tune_on", "copyright", "--applications", "harmful"], "is not among --applications"),
    (["--lrs", "0"], "every learning rate must be > 0"),
    (["--", "--train.lr", "1e-3"], "the command sets the config"),
])
def test_bad_input_stops_before_any_run(bad, message, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "launch_run", lambda *args: pytest.fail("launched"))
    with pytest.raises(SystemExit) as stopped:
        methods.main(["--out_dir", str(tmp_path), *bad])
    assert message in str(stopped.value.code)
