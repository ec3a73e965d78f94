"""Evaluation during training (dsunlearn/eval/eval_during.py): its settings, the best-step choice, and on 2 ranks the
must-show: the in-loop evaluation of a step equals the evaluation of that step's export, keep_best exports the step
its constraint picks, TensorBoard gets the same numbers, and a resume neither duplicates nor loses rows."""

import json
import math
import shutil
import signal
import time

import pytest
from launching import launch

from dsunlearn.eval.eval_during import KeepBest, read_log
from dsunlearn.runtime import distributed
from dsunlearn.settings.config import ConfigError, parse_constraint, parse_run_config

MAX_STEPS = 4
KL_BOUND = 4e-5  # between the normal KL of steps 2 and 3 of this run: the constraint excludes the last steps


def _problems(*flags):
    try:
        parse_run_config(["--config", "configs/demo.yaml", "--model.name_or_path", "some/model", *flags])
    except ConfigError as err:
        return err.problems
    return []


def test_bad_settings_are_named_before_anything_runs():
    assert any("eval_every=9 is larger than train.max_steps=4" in p
               for p in _problems("--train.max_steps", "4", "--output.eval_every", "9"))
    assert any("keep_best needs output.eval_every" in p
               for p in _problems("--output.keep_best", "forget_train/reproduction_rate"))
    assert any("unknown metric 'recall'" in p
               for p in _problems("--output.eval_every", "2", "--output.keep_best", "forget_train/recall"))
    assert any("unknown set 'train'" in p
               for p in _problems("--output.eval_every", "2", "--output.keep_best", "train/kl"))
    assert any("fluency_ppl is not measured during training" in p
               for p in _problems("--output.eval_every", "2", "--output.keep_best", "forget_train/fluency_ppl"))
    assert any("is not SET/METRIC OP NUMBER" in p
               for p in _problems("--output.eval_every", "2", "--output.keep_best", "forget_train/kl",
                                  "--output.keep_best_constraint", "normal_held_out/kl == 0.1"))
    assert any("keep_best_constraint is set but output.keep_best is not" in p
               for p in _problems("--output.keep_best_constraint", "normal_held_out/kl <= 0.1"))
    assert _problems("--output.eval_every", "2", "--output.keep_best", "forget_train/reproduction_rate",
                     "--output.keep_best_constraint", "normal_held_out/kl <= 0.1 and forget_held_out/nll > 1e-3",
                     "--output.tensorboard", "true") == []


def test_parse_constraint():
    assert parse_constraint("normal_held_out/kl <= 0.1 and forget_train/nll>2e1") == [
        ("normal_held_out/kl", "<=", 0.1), ("forget_train/nll", ">", 20.0)]
    with pytest.raises(ValueError):
        parse_constraint("normal_held_out/kl <= ")


def test_keep_best_takes_the_best_step_that_meets_the_constraint():
    best = KeepBest("forget_train/reproduction_rate", "min", "normal_held_out/kl <= 0.1")
    evaluations = {  # step: (forget reproduction, normal kl)
        1: (0.9, 0.01), 2: (0.5, 0.05), 3: (0.1, 0.3), 4: (0.5, 0.02), 5: (math.nan, 0.0), 6: (0.2, 0.1),
    }
    chosen = []
    for step, (forget, kl) in evaluations.items():
        if best.consider(step, {"forget_train": {"reproduction_rate": forget}, "normal_held_out": {"kl": kl}}):
            chosen.append(step)
    # 3 breaks the constraint, 4 only ties 2 (the earlier step stays), 5 is not a number, 6 sits on the bound.
    assert chosen == [1, 2, 6] and (best.step, best.value) == (6, 0.2)


@pytest.fixture(scope="module")
def during_run(tiny_model_dir, tmp_path_factory):
    """A 4-step run on 2 ranks evaluated at every step, keep_best on the forget NLL under a KL bound, TensorBoard
    on, evaluated at the end."""
    run_dir = tmp_path_factory.mktemp("during") / "run"
    args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir", str(run_dir),
            "--train.max_steps", str(MAX_STEPS), "--train.checkpoint_every", "2", "--train.keep_checkpoints", "0",
            "--output.eval_every", "1", "--output.eval_max_samples", "4", "--output.eval_during_max_samples", "null",
            "--output.eval_max_new_tokens", "8", "--output.keep_best", "forget_train/nll",
            "--output.keep_best_mode", "max", "--output.keep_best_constraint", f"normal_held_out/kl <= {KL_BOUND}",
            "--output.tensorboard", "true", "--output.evaluate", "true"]
    code, output = launch(args)
    assert code == 0, output[-4000:]
    return run_dir, args


def _values(rows, step):
    return {(row["set"], row["metric"]): row["value"] for row in rows if row["step"] == step}


def _assert_same(in_loop: dict, summary: dict):
    expected = {(set_name, metric): value for set_name, values in summary.items() for metric, value in values.items()
                if metric != "fluency_ppl" and not isinstance(value, dict)}  # dict: a record such as the CIs
    assert set(in_loop) == set(expected)
    for key, value in expected.items():
        assert in_loop[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.distributed
@pytest.mark.integration
def test_in_loop_evaluation_equals_the_evaluation_of_the_steps_export(during_run):
    from dsunlearn.eval.eval_config import EvalConfig
    from dsunlearn.eval.evaluation import run_evaluation

    run_dir, _ = during_run
    rows = read_log(run_dir / "eval_during.jsonl")
    keys = [(row["step"], row["set"], row["metric"]) for row in rows]
    assert len(keys) == len(set(keys)) and {row["step"] for row in rows} == set(range(1, MAX_STEPS + 1))

    # The last step: the end-of-run evaluation of final/ (the same processes, after training).
    final = json.loads((run_dir / "eval" / "eval.json").read_text())
    _assert_same(_values(rows, MAX_STEPS), final["unlearned"])

    # keep_best: the highest forget NLL among the steps whose normal KL is within the bound, chosen here from the rows.
    allowed = [s for s in range(1, MAX_STEPS + 1) if _values(rows, s)[("normal_held_out", "kl")] <= KL_BOUND]
    expected_best = max(allowed, key=lambda s: (_values(rows, s)[("forget_train", "nll")], -s))
    unconstrained = max(range(1, MAX_STEPS + 1), key=lambda s: _values(rows, s)[("forget_train", "nll")])
    assert expected_best != unconstrained, "the bound should exclude the step the metric alone would pick"
    best = json.loads((run_dir / "best_step.json").read_text())
    assert best["step"] == expected_best
    assert best["value"] == _values(rows, expected_best)[("forget_train", "nll")]

    # The best step's export, evaluated afresh in one process as `dsunlearn eval` does, gives the in-loop numbers.
    run, _ = parse_run_config(["--config", str(run_dir / "config.yaml")])
    cfg = EvalConfig.from_run(run, model_path=str(run_dir / "final_best"))
    cfg.output_dir, cfg.metrics_jsonl = str(run_dir.parent / "eval_best"), None
    _assert_same(_values(rows, expected_best), run_evaluation(cfg)["unlearned"])

    report = (run_dir / "eval" / "report.md").read_text()
    assert "## Evaluation during training" in report
    for family in ("behaviour", "likelihood", "generation"):
        assert (run_dir / "eval" / f"eval_during_{family}.png").is_file() and f"eval_during_{family}.png" in report


@pytest.mark.distributed
@pytest.mark.integration
def test_tensorboard_holds_the_training_rows_and_the_evaluations(during_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = during_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    forget_ce = [(event.step, event.value) for event in events.Scalars("train/forget_ce")]
    assert forget_ce == [(row["step"], pytest.approx(row["forget_ce"], rel=1e-6)) for row in metrics_rows]
    rows = read_log(run_dir / "eval_during.jsonl")
    kl = [(event.step, event.value) for event in events.Scalars("eval/normal_held_out/kl")]
    assert kl == [(row["step"], pytest.approx(row["value"], rel=1e-6, abs=1e-12)) for row in rows
                  if row["set"] == "normal_held_out" and row["metric"] == "kl"]


@pytest.fixture(scope="module")
def interrupted_run(during_run, tmp_path_factory):
    """during_run's settings on 2 ranks stopped by SIGTERM once step 1's evaluation is logged, then left as a kill while
    step 4's checkpoint was written would leave it, then resumed once: the one interrupted run both resume tests read.

    The signal lands around step 1's keep_best export, in step 2 or in its evaluation: the run saves that step and exits
    75, its evaluation logged if it had begun. Then, as the resume test's state: the saved step's evaluation rows
    removed (a stop before that evaluation: the resume must make it), and the steps after it added as a run that went
    on would have left them: the uninterrupted run's rows of those steps in eval_during.jsonl and metrics.jsonl, and
    its step 4 checkpoint without the completion marker (a kill while it was written), named by ``latest``."""
    from launching import start_ranks

    run_dir, args = during_run
    work = tmp_path_factory.mktemp("interrupted")
    stopped = work / "run"
    run_args = [*args, "--output.dir", str(stopped), "--output.evaluate", "false"]
    processes, logs = start_ranks(run_args, work)
    try:
        deadline = time.monotonic() + 300  # only stops a hung test
        while "evaluation at step 1:" not in logs[0].read_text(errors="replace"):
            assert all(p.poll() is None for p in processes.values()), logs[0].read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        codes = {rank: process.wait(timeout=300) for rank, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    stop_output = "".join(log.read_text(errors="replace") for log in logs)
    assert codes == {0: distributed.EXIT_PREEMPTED, 1: distributed.EXIT_PREEMPTED}, stop_output[-4000:]
    saved = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()][-1]["step"]
    assert saved < MAX_STEPS, stop_output[-4000:]
    at_stop = {"saved": saved, "latest": (stopped / "checkpoints" / "latest").read_text().strip(),
               "logged_steps": [row["step"] for row in read_log(stopped / "eval_during.jsonl")]}

    log = stopped / "eval_during.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] != saved))
    for name in ("eval_during.jsonl", "metrics.jsonl"):
        later = [line for line in (run_dir / name).read_text().splitlines() if json.loads(line)["step"] > saved]
        with open(stopped / name, "a") as handle:
            handle.write("".join(line + "\n" for line in later))
    killed = stopped / "checkpoints" / f"step_{MAX_STEPS:08d}"
    shutil.copytree(run_dir / "checkpoints" / killed.name, killed)
    (killed / "complete.json").unlink()
    (stopped / "checkpoints" / "latest").write_text(killed.name)

    code, output = launch([*run_args, "--resume", "true"])
    assert code == 0, output[-4000:]
    return stopped, at_stop, output


@pytest.mark.distributed
@pytest.mark.integration
def test_sigterm_around_an_evaluation_saves_the_step_and_the_resume_completes_the_rows(during_run, interrupted_run):
    """SIGTERM once step 1's evaluation is logged: it lands in step 2 or in its evaluation (most of a step's time);
    either way the run saves the step and exits 75 (interrupted_run checks the codes), an evaluation that finished is
    kept, one that had not begun is made by the resumed run, and the rows end as the uninterrupted run's."""
    run_dir, _ = during_run
    stopped, at_stop, _ = interrupted_run
    saved = at_stop["saved"]
    assert at_stop["latest"] == f"step_{saved:08d}"
    assert set(at_stop["logged_steps"]) in ({*range(1, saved + 1)}, {*range(1, saved)})

    before, after = read_log(run_dir / "eval_during.jsonl"), read_log(stopped / "eval_during.jsonl")
    assert sorted((r["step"], r["set"], r["metric"]) for r in after) == sorted(
        (r["step"], r["set"], r["metric"]) for r in before)
    for step in range(1, MAX_STEPS + 1):
        original, again = _values(before, step), _values(after, step)
        for key, value in original.items():
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.distributed
@pytest.mark.integration
def test_a_resume_neither_duplicates_nor_loses_evaluations(during_run, interrupted_run):
    """The kill while step 4's checkpoint was written (no completion marker) resumes from the saved step and replays
    the steps after it: their rows, logged before the kill, are written once; the saved step, whose rows are missing
    (a stop before its evaluation), is evaluated at the resume."""
    run_dir, _ = during_run
    stopped, at_stop, output = interrupted_run
    saved = at_stop["saved"]
    assert f"resumed from {stopped / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in output

    before, after = read_log(run_dir / "eval_during.jsonl"), read_log(stopped / "eval_during.jsonl")
    keys = [(row["step"], row["set"], row["metric"]) for row in after]
    assert sorted(keys) == sorted((row["step"], row["set"], row["metric"]) for row in before)
    assert len(keys) == len(set(keys))
    for step in range(1, MAX_STEPS + 1):
        original, again = _values(before, step), _values(after, step)
        for key, value in original.items():
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    assert json.loads((stopped / "best_step.json").read_text())["step"] == json.loads(
        (run_dir / "best_step.json").read_text())["step"]
