"""Training on a real two-node SLURM cluster (slurm.py): sbatch, pre-emption, requeue, DeepSpeed's own multi-node
launcher. Every run is compared with the same run on one node with two ranks. The tests train the five methods
between them (configs/presets: yao, graddiff, npo across a pre-emption, simnpo across a requeue, ga)."""

import json
import subprocess
import time
from pathlib import Path

import pytest
from launching import OUTSIDE_STOP, REPO, free_port, preset_args
from safetensors.torch import load_file

from dsunlearn.runtime.distributed import EXIT_PREEMPTED

pytestmark = [pytest.mark.cluster, pytest.mark.distributed, pytest.mark.integration]

LAUNCH_SH = REPO / "launch.sh"


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings (they differ between any two runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in rows]


def assert_same_run(run_dir: Path, reference: Path):
    assert metrics(run_dir) == metrics(reference)
    weights, expected = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].equal(tensor), name


def final_weights(run_dir: Path) -> dict:
    weights = {}
    for shard in sorted((run_dir / "final").glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no exported weights in {run_dir / 'final'}"
    return weights


def finish(slurm_cluster, job_id: str, log: Path, resubmit, restarts: int = 0):
    """Wait for the job (after ``restarts`` requeues); while it was stopped from outside (launching.OUTSIDE_STOP),
    ``resubmit()`` it (up to twice)."""
    job = slurm_cluster.wait(job_id, restarts=restarts)
    for _ in range(2):
        if job.exit_code != EXIT_PREEMPTED or OUTSIDE_STOP not in log.read_text():
            break
        print(f"job {job_id} was stopped from outside ({OUTSIDE_STOP}): resubmitting it with --resume true")
        job = slurm_cluster.wait(resubmit())
    return job



def submit_folder(tmp_path: Path) -> Path:
    """Jobs are submitted from a folder that is not the repository."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    return folder


def wait_for_steps(run_dir: Path, steps: int, ended, timeout: float = 300):
    """Block until metrics.jsonl holds ``steps`` rows (the run is mid-way); ``ended()`` says the job is over."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        if ended():
            raise AssertionError(f"the run ended before step {steps}")
        time.sleep(0.2)
    raise AssertionError(f"no step {steps} in {path} after {timeout} s")


def test_sbatch_launch_sh_trains_across_both_nodes(slurm_cluster, job_env, run_args, one_node_runs, tmp_path):
    run_args = [*run_args, *preset_args("yao")]
    one_node_run = one_node_runs("yao")
    folder = submit_folder(tmp_path)
    out = tmp_path / "run"
    submit = ["--nodes", "2", "--ntasks-per-node", "1", "--open-mode=append", "--output", str(tmp_path / "job.out"),
              str(LAUNCH_SH), *run_args, "--output.dir", str(out)]
    job_id = slurm_cluster.sbatch(*submit, cwd=folder, env=job_env)
    job = finish(slurm_cluster, job_id, tmp_path / "job.out",
                 lambda: slurm_cluster.sbatch(*submit, "--resume", "true", cwd=folder, env=job_env))
    log = (tmp_path / "job.out").read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", 0), log[-4000:]
    assert job.nodes == "node[1-2]"
    assert_same_run(out, one_node_run)


def test_sbatch_wrap_trains_across_both_nodes(slurm_cluster, job_env, run_args, one_node_runs, tmp_path):
    run_args = [*run_args, *preset_args("graddiff")]
    one_node_run = one_node_runs("graddiff")
    folder = submit_folder(tmp_path)
    out = tmp_path / "run"
    command = ["bash", str(LAUNCH_SH), *run_args, "--output.dir", str(out)]
    submit = ["--nodes", "2", "--ntasks-per-node", "1", "--open-mode=append", "--output", str(tmp_path / "job.out")]
    job_id = slurm_cluster.sbatch(*submit, "--wrap", subprocess.list2cmdline(command), cwd=folder, env=job_env)
    job = finish(slurm_cluster, job_id, tmp_path / "job.out", lambda: slurm_cluster.sbatch(
        *submit, "--wrap", subprocess.list2cmdline([*command, "--resume", "true"]), cwd=folder, env=job_env))
    assert (job.state, job.exit_code) == ("COMPLETED", 0), (tmp_path / "job.out").read_text()[-4000:]
    assert_same_run(out, one_node_run)


def test_scancel_term_saves_the_step_and_a_resubmitted_job_finishes_bit_equal(
    slurm_cluster, users_job_env, run_args, one_node_runs, tmp_path
):
    run_args = [*run_args, *preset_args("npo")]
    one_node_run = one_node_runs("npo")
    job_env = users_job_env
    folder = submit_folder(tmp_path)
    out = tmp_path / "run"
    first_log = tmp_path / "first.out"
    job_id = slurm_cluster.sbatch("--nodes", "2", "--ntasks-per-node", "1", "--output", str(first_log),
                                  str(LAUNCH_SH), *run_args, "--output.dir", str(out), cwd=folder, env=job_env)
    wait_for_steps(out, 2, lambda: slurm_cluster.job(job_id).finished)
    slurm_cluster.command("scancel", "--signal=TERM", job_id)
    job = slurm_cluster.wait(job_id)
    log = first_log.read_text()
    assert job.exit_code == EXIT_PREEMPTED, log[-4000:]
    for task, node in enumerate(slurm_cluster.nodes):  # srun names every task that exited non-zero
        assert f"{node}: task {task}: Exited with exit code {EXIT_PREEMPTED}" in log, log[-4000:]
    stopped_at = len(metrics(out))
    assert 2 <= stopped_at < len(metrics(one_node_run)), "the signal came after the run had finished"
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()

    resume = ["--nodes", "2", "--ntasks-per-node", "1", "--open-mode=append", "--output", str(tmp_path / "second.out"),
              str(LAUNCH_SH), *run_args, "--output.dir", str(out), "--resume", "true"]
    job_id = slurm_cluster.sbatch(*resume, cwd=folder, env=job_env)
    job = finish(slurm_cluster, job_id, tmp_path / "second.out",
                 lambda: slurm_cluster.sbatch(*resume, cwd=folder, env=job_env))
    assert (job.state, job.exit_code) == ("COMPLETED", 0), (tmp_path / "second.out").read_text()[-4000:]
    assert_same_run(out, one_node_run)


def test_signal_to_the_batch_script_reaches_every_rank(slurm_cluster, users_job_env, run_args, tmp_path):
    run_args = [*run_args, *preset_args("yao")]
    job_env = users_job_env
    # What `#SBATCH --signal=B:TERM@300` does before the time limit: SIGTERM to the batch shell only, which runs
    # launch.sh (the README's script); launch.sh passes the stop on to the ranks.
    out = tmp_path / "run"
    script = tmp_path / "unlearn.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
                      f"exec {subprocess.list2cmdline(['bash', str(LAUNCH_SH), *run_args, '--output.dir', str(out)])}\n")
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch("--output", str(log), str(script), cwd=submit_folder(tmp_path), env=job_env)
    wait_for_steps(out, 2, lambda: slurm_cluster.job(job_id).finished)
    slurm_cluster.command("scancel", "--batch", "--signal=TERM", job_id)
    job = slurm_cluster.wait(job_id)
    assert job.exit_code == EXIT_PREEMPTED, log.read_text()[-4000:]
    for task, node in enumerate(slurm_cluster.nodes):
        assert f"{node}: task {task}: Exited with exit code {EXIT_PREEMPTED}" in log.read_text(), log.read_text()[-4000:]
    stopped_at = len(metrics(out))
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()


def test_requeued_job_resumes_by_itself(slurm_cluster, job_env, run_args, one_node_runs, tmp_path):
    run_args = [*run_args, *preset_args("simnpo")]
    one_node_run = one_node_runs("simnpo")
    folder = submit_folder(tmp_path)
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch("--requeue", "--open-mode=append", "--nodes", "2", "--ntasks-per-node", "1",
                                  "--output", str(log), str(LAUNCH_SH), *run_args, "--output.dir", str(out),
                                  cwd=folder, env=job_env)
    wait_for_steps(out, 2, lambda: slurm_cluster.job(job_id).finished)
    slurm_cluster.command("scontrol", "requeue", job_id)
    # SLURM holds a requeued job back for two minutes (its BeginTime): release it as soon as it is pending again.
    deadline = time.monotonic() + 120
    while slurm_cluster.job(job_id).state != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    stopped_at = len(metrics(out))
    assert stopped_at < len(metrics(one_node_run)), "the requeue came after the run had finished"
    slurm_cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = finish(slurm_cluster, job_id, log, lambda: slurm_cluster.sbatch(
        "--open-mode=append", "--nodes", "2", "--ntasks-per-node", "1", "--output", str(log), str(LAUNCH_SH),
        *run_args, "--output.dir", str(out), "--resume", "true", cwd=folder, env=job_env), restarts=1)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), log.read_text()[-4000:]
    assert_same_run(out, one_node_run)


def test_deepspeed_multi_node_launcher_without_ssh(slurm_cluster, job_env, run_args, one_node_runs, tmp_path):
    run_args = [*run_args, *preset_args("ga")]
    one_node_run = one_node_runs("ga")
    # One launcher per node, each started inside that node's namespaces, as a site without ssh between nodes would.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in slurm_cluster.nodes))
    out = tmp_path / "run"
    env = dict(job_env, MASTER_PORT=str(free_port()))
    launchers = []
    for rank, node in enumerate(slurm_cluster.nodes):
        command = subprocess.list2cmdline(["bash", str(LAUNCH_SH), "--hostfile", str(hostfile), "--node-rank",
                                           str(rank), *run_args, "--output.dir", str(out)])
        launchers.append(subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{node}", "unshare", "--uts", "sh", "-c", f"hostname {node} && {command}"],
            cwd=tmp_path, env=env,
            stdout=(tmp_path / f"{node}.out").open("w"), stderr=subprocess.STDOUT,
        ))
    for launcher in launchers:
        launcher.wait(timeout=420)
    logs = "\n".join((tmp_path / f"{node}.out").read_text()[-3000:] for node in slurm_cluster.nodes)
    assert [launcher.returncode for launcher in launchers] == [0, 0], logs
    assert_same_run(out, one_node_run)
