"""Every failure ends every rank within seconds, with one message and the documented exit code (distributed.py).

The ranks are started the way srun starts them (one process per rank, RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the
environment), so each rank's exit code and pid are visible. Faults are real: a token id the model lacks, SIGSTOP,
SIGTERM, a process without a network, a port somebody else holds, a learning rate that wrecks the model.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import OUTSIDE_STOP, REPO, free_port, start_ranks

from dsunlearn.runtime.distributed import EXIT_DIVERGED, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, RunDiverged
from dsunlearn.runtime.guards import StepGuards
from dsunlearn.settings.config import ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
from dsunlearn.settings.strict_json import to_json

HANG_LIMIT_S = 300  # only stops a hung test; nothing is timed


class Ranks:
    """Rank processes of one run, each with its own log file."""

    def __init__(self, args, log_dir: Path, nproc=2, port=None, prefix=(), ranks=None, extra_env=None,
                 one_thread=True):
        self.processes, self.logs = start_ranks(args, log_dir, nproc, port, prefix, ranks, extra_env, one_thread)

    def wait(self) -> dict:
        deadline = time.monotonic() + HANG_LIMIT_S
        try:
            return {rank: p.wait(timeout=max(1, deadline - time.monotonic())) for rank, p in self.processes.items()}
        finally:
            self.kill()

    def kill(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    def output(self) -> str:
        return "".join(log.read_text() for log in self.logs if log.exists())

    def send(self, signum):
        for process in self.processes.values():
            process.send_signal(signum)


def wait_for(condition, ranks: Ranks, resume=None) -> Ranks:
    """Block until ``condition()``; returns the ranks then running. A run stopped from outside (OUTSIDE_STOP) before
    that is resumed with ``resume()`` (up to twice), as a user would; any other early end fails the test."""
    deadline = time.monotonic() + HANG_LIMIT_S
    resumes = 2 if resume else 0
    while not condition():
        if any(p.poll() is not None for p in ranks.processes.values()):
            if resumes and stopped_from_outside(ranks):
                resumes -= 1
                ranks = resume()
                continue
            raise AssertionError(ranks.output()[-4000:])
        assert time.monotonic() < deadline, ranks.output()[-4000:]
        time.sleep(0.2)
    return ranks


def stopped_from_outside(ranks: Ranks) -> bool:
    """The run ended with EXIT_PREEMPTED because of a SIGTERM the test did not send (see launching.OUTSIDE_STOP)."""
    codes = ranks.wait()
    return set(codes.values()) == {EXIT_PREEMPTED} and OUTSIDE_STOP in ranks.output()


def metric_rows(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_args(model_dir, out_dir, *extra, steps=6):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", str(steps), "--train.checkpoint_every", "1", "--train.keep_checkpoints", "0",
            "--output.evaluate", "false", "--train.collective_timeout_s", "30", *extra]


def failure_lines(output: str) -> list[str]:
    """dsunlearn's own messages (after a progress bar's carriage return, they may share its line)."""
    return [line[line.index("dsunlearn: "):] for line in output.splitlines() if "dsunlearn: " in line]


# ---- the guards and the JSON, without processes ----


def guarded(precision="fp32", stop_forget_ce=None, **train_settings):
    return StepGuards(RunConfig(model=ModelConfig(precision=precision), train=TrainConfig(**train_settings),
                                objective=ObjectiveConfig(stop_forget_ce=stop_forget_ce)))


def row(step, **values):
    return {"step": step, "forget_ce": 6.0, "random_ce": 6.0, "normal_kl": 0.1, "total": 3.0, "grad_norm": 1.0,
            **values}


def test_guards_stop_a_diverged_or_collapsed_run():
    with pytest.raises(RunDiverged, match="step 3: total not finite"):
        guarded().check(row(3, total=float("nan")), skipped=False)
    with pytest.raises(RunDiverged, match="gradient norm is not finite"):
        guarded().check(row(2, grad_norm=float("inf")), skipped=True)
    with pytest.raises(RunDiverged, match="normal KL 7.5 > train.max_normal_kl=5"):
        guarded(max_normal_kl=5.0).check(row(4, normal_kl=7.5), skipped=False)
    assert not guarded(max_normal_kl=None).check(row(4, normal_kl=70.0), skipped=False)

    zero = guarded(max_zero_grad_steps=2)
    assert not zero.check(row(1, grad_norm=0.0), skipped=False)
    assert not zero.check(row(2, grad_norm=0.5), skipped=False)  # only consecutive zeros count
    assert not zero.check(row(3, grad_norm=0.0), skipped=False)
    with pytest.raises(RunDiverged, match="gradient norm was 0 for 2 steps"):
        zero.check(row(4, grad_norm=0.0), skipped=False)

    fp16 = guarded(precision="fp16", max_fp16_skips=2)
    for step in (1, 2):  # DeepSpeed lowers the loss scale and skips: allowed twice in a row
        assert not fp16.check(row(step, grad_norm=float("inf")), skipped=True)
    assert not fp16.check(row(3), skipped=False)
    fp16.check(row(4, grad_norm=float("inf")), skipped=True)
    fp16.check(row(5, grad_norm=float("inf")), skipped=True)
    with pytest.raises(RunDiverged, match="3 steps in a row skipped"):
        fp16.check(row(6, grad_norm=float("inf")), skipped=True)


def test_stop_forget_ce_is_a_normal_end():
    guards = guarded(stop_forget_ce=8.0)
    assert not guards.check(row(1, forget_ce=7.9), skipped=False)
    assert guards.check(row(2, forget_ce=8.1), skipped=False)
    # What the checkpoint of that step records, and what a resume makes of it: done with the same bound (or a lower
    # one); a bound raised above the recorded CE, or the rule off, goes on unlearning.
    record = guards.done_record(row(2, forget_ce=8.1))
    assert record == {"rule": "objective.stop_forget_ce", "forget_ce": 8.1, "stop_forget_ce": 8.0}
    assert guards.done_before(record) and guarded(stop_forget_ce=7.0).done_before(record)
    assert not guarded(stop_forget_ce=9.0).done_before(record) and not guarded().done_before(record)
    assert not guards.done_before(None)


def test_json_writes_null_for_non_finite_values():
    text = to_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}, "e": "x"})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": "x"}


# ---- whole runs ----

@pytest.mark.distributed
@pytest.mark.integration
def test_error_on_one_rank_ends_every_rank_with_one_message(tiny_model_dir, tmp_path):
    """One forget response holds a token the model's embedding lacks: only the rank whose batch holds it raises."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<beyond-the-vocabulary>"])
    tokenizer.save_pretrained(model_dir)
    forget = tmp_path / "forget.jsonl"
    pairs = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(8)]
    pairs[5]["response"] = "An answer with <beyond-the-vocabulary> inside."
    forget.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    args = run_args(model_dir, tmp_path / "run", "--data.forget.source", str(forget), "--data.forget.format", "pairs",
                    "--data.forget.prompt_field", "prompt", "--data.forget.response_field", "response",
                    "--data.forget.held_out_fraction", "0", steps=4)
    ranks = Ranks(args, tmp_path)
    codes = ranks.wait()
    output = ranks.output()
    assert codes == {0: EXIT_FAILED, 1: EXIT_FAILED}, output[-4000:]
    assert output.count("index out of range") >= 1 and output.count("failed: IndexError") == 1, output[-4000:]
    [failed] = [line for line in failure_lines(output) if "failed: IndexError" in line]
    # the other rank says one short line pointing at it
    source = failed.split(" failed:")[0].removeprefix("dsunlearn: ")
    assert sum(f"{source} ended the run" in line for line in failure_lines(output)) == 1, output[-4000:]


@pytest.mark.distributed
@pytest.mark.integration
def test_a_stopped_rank_ends_the_run_at_the_collective_timeout(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = run_args(tiny_model_dir, run_dir, steps=500)
    args[args.index("--train.collective_timeout_s") + 1] = "10"
    ranks = Ranks(args, tmp_path)
    try:
        wait_for(lambda: len(metric_rows(run_dir)) >= 1, ranks)
        stopped = ranks.processes[1]
        stopped.send_signal(signal.SIGSTOP)
        code = ranks.processes[0].wait(timeout=HANG_LIMIT_S)
    finally:
        ranks.kill()  # SIGKILL ends the stopped rank too
    output = ranks.output()
    assert code == EXIT_FAILED, output[-4000:]
    assert f"rank 1 ({socket.gethostname()}, pid {stopped.pid}) has not answered for 10 s" in output, output[-4000:]


@pytest.mark.distributed
@pytest.mark.integration
def test_sigterm_in_training_saves_the_step_and_resume_is_bit_exact(straight_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"

    # No thread-count variable, as users run: numpy's OpenBLAS starts its threads at import (launching.THREAD_VARIABLES).
    def resumed(*extra):
        return Ranks(run_args(tiny_model_dir, run_dir, "--resume", "true", *extra), tmp_path, one_thread=False)

    ranks = Ranks(run_args(tiny_model_dir, run_dir), tmp_path, one_thread=False)
    ranks = wait_for(lambda: len(metric_rows(run_dir)) >= 2, ranks, resume=resumed)
    ranks.send(signal.SIGTERM)
    assert ranks.wait() == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, ranks.output()[-4000:]
    # Without OMP_NUM_THREADS each rank takes its share of the cores, not all of them (distributed.share_the_cores).
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    if share < torch.get_num_threads():  # torch's own default in a rank, as in this process
        assert f"2 ranks share this host's cores: {share} torch thread(s) per rank" in ranks.output()
    saved = metric_rows(run_dir)[-1]["step"]
    assert 2 <= saved < 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{saved:08d}"
    assert not (run_dir / "final").exists()

    # Resume and finish; SIGTERM once the export is there, during the evaluation: it ends at once.
    evaluating = ("--output.evaluate", "true", "--output.eval_max_samples", "8")
    ranks = wait_for(lambda: (run_dir / "final" / "tokenizer_config.json").exists(), resumed(*evaluating),
                     resume=lambda: resumed(*evaluating))
    ranks.send(signal.SIGTERM)
    assert ranks.wait() == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, ranks.output()[-4000:]
    assert "outside a training step: stopped at once" in ranks.output()
    assert not (run_dir / "eval" / "eval.json").exists()

    # Every step is saved: a resume goes straight to the export.
    ranks = resumed()
    for _ in range(2):
        if not stopped_from_outside(ranks):
            break
        ranks = resumed()
    assert ranks.wait() == {0: EXIT_OK, 1: EXIT_OK}, ranks.output()[-4000:]
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in metric_rows(run_dir)] == [
        {k: v for k, v in r.items() if k not in drop} for r in metric_rows(straight_run)
    ]
    from safetensors.torch import load_file

    resumed, straight = load_file(run_dir / "final" / "model.safetensors"), load_file(
        straight_run / "final" / "model.safetensors"
    )
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.distributed
@pytest.mark.integration
def test_stop_forget_ce_ends_the_run_normally(straight_run, tiny_model_dir, tmp_path):
    # Each step's forget CE is measured on other examples, so it need not rise every step: the bound sits between
    # the highest CE before the first step that exceeds it and that step's, and the run must end right there.
    forget_ce = [row["forget_ce"] for row in metric_rows(straight_run)]
    last = next(step for step in range(2, len(forget_ce) + 1) if forget_ce[step - 1] > max(forget_ce[:step - 1]))
    bound = (max(forget_ce[:last - 1]) + forget_ce[last - 1]) / 2
    run_dir = tmp_path / "run"
    args = run_args(tiny_model_dir, run_dir, "--objective.stop_forget_ce", str(bound))
    ranks = Ranks(args, tmp_path)
    for _ in range(2):  # a stop from outside is finished as users would: resumed (launching.OUTSIDE_STOP)
        if not stopped_from_outside(ranks):
            break
        ranks = Ranks([*args, "--resume", "true"], tmp_path)
    assert ranks.wait() == {0: EXIT_OK, 1: EXIT_OK}, ranks.output()[-4000:]
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, last + 1))
    # (or, when the outside stop landed in that very step, the resume says it was done there)
    assert any(f"unlearning {said} at step {last}" in ranks.output() for said in ("done", "was done"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.integration
def test_a_run_ended_by_stop_forget_ce_stays_done_when_resumed(straight_run, tiny_model_dir, tmp_path):
    """The step where objective.stop_forget_ce fires is saved as the end of unlearning: a resume goes straight to the
    export. SIGTERM is sent as soon as the step before it is logged, so it lands in that very step (or, on a slow
    poll, later: either way the run ends 75 or 0 with that step saved, and no step of ascent follows it)."""
    forget_ce = [row["forget_ce"] for row in metric_rows(straight_run)]
    last = next(step for step in range(2, len(forget_ce) + 1) if forget_ce[step - 1] > max(forget_ce[:step - 1]))
    bound = (max(forget_ce[:last - 1]) + forget_ce[last - 1]) / 2
    run_dir = tmp_path / "run"
    args = run_args(tiny_model_dir, run_dir, "--objective.stop_forget_ce", str(bound))

    def resumed():
        return Ranks([*args, "--resume", "true"], tmp_path, one_thread=False)

    ranks = wait_for(lambda: len(metric_rows(run_dir)) >= last - 1, Ranks(args, tmp_path, one_thread=False),
                     resume=resumed)
    ranks.send(signal.SIGTERM)
    codes = ranks.wait()
    assert codes in ({0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, {0: EXIT_OK, 1: EXIT_OK}), ranks.output()[-4000:]
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, last + 1)), ranks.output()[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"

    ranks = resumed()
    assert ranks.wait() == {0: EXIT_OK, 1: EXIT_OK}, ranks.output()[-4000:]
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, last + 1)), ranks.output()[-4000:]
    assert f"unlearning was done at step {last}" in ranks.output(), ranks.output()[-4000:]
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, bpe_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsunlearn.data.tiny import save_tiny_model

    config = Qwen2Config(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=bpe_tokenizer.bos_token_id,
                         eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    torch.manual_seed(0)
    return save_tiny_model(Qwen2ForCausalLM(config).float().eval(), bpe_tokenizer, tmp_path_factory.mktemp("qwen2"))


@pytest.mark.distributed
@pytest.mark.integration
def test_a_wrecking_learning_rate_stops_the_run_as_diverged(tiny_qwen2_dir, tmp_path):
    run_dir = tmp_path / "run"
    ranks = Ranks(run_args(tiny_qwen2_dir, run_dir, "--train.lr", "1e6"), tmp_path)
    codes = ranks.wait()
    output = ranks.output()
    assert codes == {0: EXIT_DIVERGED, 1: EXIT_DIVERGED}, output[-4000:]
    assert output.count("training diverged at step 2") == 1, output[-4000:]
    assert not (run_dir / "final").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run_dir / "checkpoints" / "step_00000002").exists()
    text = (run_dir / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert metric_rows(run_dir)[-1]["grad_norm"] is None


@pytest.mark.distributed
def test_bad_settings_and_too_many_ranks_exit_usage_with_one_message(tiny_model_dir, tmp_path):
    ranks = Ranks(run_args(tiny_model_dir, tmp_path / "a", "--train.lr", "-1"), tmp_path)
    assert ranks.wait() == {0: EXIT_USAGE, 1: EXIT_USAGE}
    assert ranks.output().count("train.lr=-1.0 must be > 0") == 1, ranks.output()[-4000:]

    forget = tmp_path / "one.jsonl"
    forget.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    ranks = Ranks(run_args(tiny_model_dir, tmp_path / "b", "--data.forget.source", str(forget),
                           "--data.forget.format", "pairs", "--data.forget.prompt_field", "prompt",
                           "--data.forget.response_field", "response", "--data.forget.held_out_fraction", "0"),
                  tmp_path)
    assert ranks.wait() == {0: EXIT_USAGE, 1: EXIT_USAGE}, ranks.output()[-4000:]
    assert ranks.output().count("every rank needs at least one") == 1, ranks.output()[-4000:]


@pytest.mark.distributed
def test_unreachable_master_ends_at_the_timeout(tiny_model_dir, tmp_path):
    """Rank 1 alone in a network namespace of its own (`unshare -n`: no interface is up) cannot reach MASTER_ADDR."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n needs root (CI runs as root)")
    args = run_args(tiny_model_dir, tmp_path / "run")
    args[args.index("--train.collective_timeout_s") + 1] = "5"
    ranks = Ranks(args, tmp_path, ranks=[1], prefix=["unshare", "-n"])
    assert ranks.wait() == {1: EXIT_FAILED}, ranks.output()[-4000:]
    assert "could not join the process group at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" in ranks.output()
    assert "within 5 s" in ranks.output()


@pytest.mark.distributed
def test_master_port_in_use_is_named(tiny_model_dir, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = run_args(tiny_model_dir, tmp_path / "run")
        args[args.index("--train.collective_timeout_s") + 1] = "5"
        ranks = Ranks(args, tmp_path, port=port)
        codes = ranks.wait()
    output = ranks.output()
    assert codes == {0: EXIT_FAILED, 1: EXIT_FAILED}, output[-4000:]
    assert f"MASTER_PORT: 127.0.0.1:{port} is already in use" in output, output[-4000:]


@pytest.mark.distributed
@pytest.mark.integration
def test_ranks_stop_when_the_deepspeed_runner_dies(tiny_model_dir, tmp_path):
    """The runner does not forward SIGTERM to the ranks: they notice it is gone, save the step and exit."""
    import psutil

    run_dir = tmp_path / "run"
    deepspeed_bin = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen([str(deepspeed_bin), "--num_gpus", "2", "--master_port", str(free_port()),
                                   "dsunlearn/train.py", *run_args(tiny_model_dir, run_dir, steps=500)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    runner_tree = []
    try:
        deadline = time.monotonic() + HANG_LIMIT_S
        while len(metric_rows(run_dir)) < 2:
            assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "runner.log").read_text()[-4000:]
            time.sleep(0.2)
        runner_tree = psutil.Process(runner.pid).children(recursive=True)
        ranks = [p for p in runner_tree if any(arg.startswith("--local_rank") for arg in p.cmdline())]
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=HANG_LIMIT_S)
        gone, alive = psutil.wait_procs(ranks, timeout=HANG_LIMIT_S)
    finally:
        # This run's processes only: the pytest process has others (tests/warm_start.py's server).
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for process in runner_tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert len(ranks) == 2 and not alive  # the ranks are launch.py's children: their codes are not ours to read
    saved = metric_rows(run_dir)[-1]["step"]
    assert f"stopped by SIGTERM after step {saved}" in (tmp_path / "runner.log").read_text()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{saved:08d}"
