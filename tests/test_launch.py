"""launch.sh picks the launcher for the place it runs in; --dry-run prints the command."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launching import REPO, as_users_run, free_port

from dsunlearn.runtime.distributed import EXIT_PREEMPTED, EXIT_USAGE


def launch_sh(tmp_path, *args, env=None, cwd=REPO, script=REPO / "launch.sh"):
    """Run launch.sh as a user would, with a fake `scontrol` (SLURM's) on PATH and no GPU (torch here is the CPU
    build); return the finished process."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    (fake_bin / "scontrol").chmod(0o755)
    path = f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "PATH": path, "PYTHON": sys.executable, **(env or {})})


def dry_run(tmp_path, *args, **kwargs):
    done = launch_sh(tmp_path, "--dry-run", *args, **kwargs)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def test_one_node_without_gpu_runs_cpu_ranks(tmp_path):
    [command] = dry_run(tmp_path, "--config", "configs/opt-1.3b-harmful.yaml", "--train.lr", "1e-5")
    assert command[:5] == ["env", "DS_ACCELERATOR=cpu", "deepspeed", "--num_gpus", "2"]
    assert command[-5:] == ["dsunlearn/train.py", "--config", "configs/opt-1.3b-harmful.yaml", "--train.lr", "1e-5"]


def test_no_arguments_builds_the_demo_model_then_trains_on_the_demo_config(tmp_path):
    commands = dry_run(tmp_path, "--nproc", "3")
    train = commands[-1]
    assert train[train.index("--num_gpus") + 1] == "3"
    assert train[-5:] == ["dsunlearn/train.py", "--config", "configs/demo.yaml", "--overwrite", "true"]
    if not (REPO / "outputs/demo/original/config.json").exists():
        assert commands[0][1:] == ["-m", "dsunlearn", "make-demo", "--application", "harmful", "--out",
                                   "outputs/demo/original"]


@pytest.mark.parametrize("application", ["copyright", "hallucination"])
def test_demo_name_picks_its_config_and_model(tmp_path, application):
    commands = dry_run(tmp_path, "--demo", application, "--train.max_steps", "5")
    assert commands[-1][-7:] == ["dsunlearn/train.py", "--config", f"configs/demo-{application}.yaml",
                                 "--overwrite", "true", "--train.max_steps", "5"]
    if not (REPO / f"outputs/demo-{application}/original/config.json").exists():
        assert commands[0][1:] == ["-m", "dsunlearn", "make-demo", "--application", application, "--out",
                                   f"outputs/demo-{application}/original"]


def test_unknown_demo_is_a_usage_error_naming_the_three(tmp_path):
    done = launch_sh(tmp_path, "--dry-run", "--demo", "poetry")
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert "choose harmful, copyright or hallucination" in done.stderr


def test_hostfile_uses_the_deepspeed_multi_node_launcher(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nlocalhost slots=8\n\n127.0.0.1 slots=8\n")
    [command] = dry_run(tmp_path, "--hostfile", str(hosts), "--nproc", "8", "--config", "configs/demo.yaml")
    assert command[:7] == ["env", "DS_ACCELERATOR=cpu", "deepspeed", "--hostfile", str(hosts), "--num_gpus", "8"]
    assert command[command.index("--master_port") + 1] == "29500"  # every node's launcher must agree on it


def test_node_rank_starts_this_nodes_share_without_ssh(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    [command] = dry_run(tmp_path, "--hostfile", str(hosts), "--node-rank", "1", "--config", "configs/demo.yaml")
    at = command.index("--no_ssh")
    assert command[at:at + 5] == ["--no_ssh", "--node_rank", "1", "--master_addr", "localhost"]


def test_hostfile_naming_an_unknown_host_stops_before_launching(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\nno-such-node.invalid slots=1\n")
    done = launch_sh(tmp_path, "--hostfile", str(hosts), "--config", "configs/demo.yaml")
    assert done.returncode == EXIT_USAGE
    assert "no-such-node.invalid" in done.stderr and "does not resolve" in done.stderr
    assert "deepspeed" not in done.stdout + done.stderr.replace("launch.sh", "")


def test_missing_config_is_named_before_launching(tmp_path):
    done = launch_sh(tmp_path, "--config", "nowhere.yaml")
    assert done.returncode == EXIT_USAGE and "--config nowhere.yaml: no such file" in done.stderr


def test_slurm_allocation_uses_srun_with_ranks_from_slurm(tmp_path):
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "4"}
    (tmp_path / "x.yaml").write_text("{}\n")
    [command] = dry_run(tmp_path, "--config", "x.yaml", env=env, cwd=tmp_path)
    srun = command.index("srun")
    assert command[srun:srun + 6] == ["srun", "--nodes", "2", "--ntasks-per-node", "4", "--kill-on-bad-exit=0"]
    inner = command[command.index("-c") + 1]
    for variable in ("RANK=$SLURM_PROCID", "WORLD_SIZE=$SLURM_NTASKS", "LOCAL_RANK=$SLURM_LOCALID", "MASTER_ADDR=node-a"):
        assert variable in inner
    assert command[-2:] == ["--config", str(tmp_path / "x.yaml")]


def test_sbatch_spool_copy_finds_the_checkout_through_the_submit_folder(tmp_path):
    # sbatch runs a copy of the script from slurmd's spool folder, with nothing beside it.
    spool = tmp_path / "spool" / "job00003"
    spool.mkdir(parents=True)
    (spool / "slurm_script").write_text((REPO / "launch.sh").read_text())
    env = {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO)}
    [command] = dry_run(tmp_path, "--config", "configs/demo.yaml", env=env, cwd=spool, script=spool / "slurm_script")
    inner = command[command.index("-c") + 1]
    assert inner.endswith("exec " + shlex.join([sys.executable, "dsunlearn/train.py"]) + ' "$@"')
    assert command[-2:] == ["--config", "configs/demo.yaml"]


def test_sbatch_from_a_folder_without_the_checkout_uses_the_installed_package(tmp_path):
    spool = tmp_path / "spool" / "job00004"
    spool.mkdir(parents=True)
    (spool / "slurm_script").write_text((REPO / "launch.sh").read_text())
    submit = tmp_path / "experiments"
    submit.mkdir()
    (submit / "mine.yaml").write_text("{}\n")
    env = {"SLURM_JOB_ID": "4", "SLURM_JOB_NODELIST": "node-a", "SLURM_SUBMIT_DIR": str(submit)}
    for config, expected in (("mine.yaml", submit / "mine.yaml"), ("configs/demo.yaml", REPO / "configs/demo.yaml")):
        [command] = dry_run(tmp_path, "--config", config, env=env, cwd=submit, script=spool / "slurm_script")
        inner = command[command.index("-c") + 1]
        assert shlex.join([sys.executable, str(REPO / "dsunlearn" / "train.py")]) in inner  # the editable install
        assert command[-2:] == ["--config", str(expected)]


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("nproc", [2, 1])
def test_sigterm_to_launch_sh_reaches_every_rank(tmp_path, tiny_model_dir, nproc):
    # The deepspeed runner dies on SIGTERM and leaves its ranks running: launch.sh must signal the ranks themselves.
    # One process is launch.sh's own child (no launcher).
    out = tmp_path / "run"
    log = (tmp_path / "launch.log").open("w")
    # No thread-count variable, as users run launch.sh: numpy's OpenBLAS starts threads in every rank at import.
    env = dict(as_users_run(os.environ), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    process = subprocess.Popen(
        ["bash", "launch.sh", "--nproc", str(nproc), "--config", "configs/demo.yaml", "--model.name_or_path",
         str(tiny_model_dir), "--output.dir", str(out), "--train.max_steps", "30", "--output.evaluate", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert process.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.2)
        # Ranks: the deepspeed launcher appends --local_rank; one process is `python dsunlearn/train.py ...` itself.
        ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
                 if any(arg.startswith("--local_rank") for arg in child.cmdline())
                 or child.cmdline()[1:2] == ["dsunlearn/train.py"]]
        assert len(ranks) == nproc
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "launch.log").read_text()
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "ranks left running after launch.sh exited"
    stopped_at = len(metrics.read_text().splitlines())
    assert stopped_at < 30, "the signal came after the run had finished"
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()


def test_one_process_starts_the_rank_itself(tmp_path):
    # No deepspeed runner and launch.py (two interpreters that import DeepSpeed) for a single process.
    [command] = dry_run(tmp_path, "--nproc", "1", "--config", "configs/demo.yaml", env={"MASTER_PORT": "29612"})
    assert command[:8] == ["env", "RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "LOCAL_WORLD_SIZE=1",
                           "MASTER_ADDR=127.0.0.1", "MASTER_PORT=29612", sys.executable]
    assert command[8:] == ["dsunlearn/train.py", "--config", "configs/demo.yaml"]


def test_no_gpu_device_files_means_no_interpreter_asks_torch(tmp_path):
    # Every launch.sh call asked torch for the GPU count: an interpreter importing torch (~2 CPU-s) per run.
    if Path("/dev/kfd").exists() or list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has GPU device files")
    calls = tmp_path / "python_calls"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    [command] = dry_run(tmp_path, "--config", "configs/demo.yaml", env={"PYTHON": str(wrapper)})
    assert command[:3] == ["env", "DS_ACCELERATOR=cpu", "deepspeed"]
    assert not calls.exists() or "-" not in calls.read_text().split(), calls.read_text()
