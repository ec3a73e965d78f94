"""launch.sh picks the launcher for the place it runs in; --dry-run prints the command."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from launching import REPO


def dry_run(tmp_path, *args, env=None):
    # A fake `scontrol` (SLURM's) and no GPU: torch here is the CPU build.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    (fake_bin / "scontrol").chmod(0o755)
    path = f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "launch.sh", "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(clean, PATH=path, PYTHON=sys.executable, **(env or {})), check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def test_one_node_without_gpu_runs_cpu_ranks(tmp_path):
    [command] = dry_run(tmp_path, "--config", "configs/opt-1.3b-harmful.yaml", "--train.lr", "1e-5")
    assert command[:5] == ["env", "DS_ACCELERATOR=cpu", "deepspeed", "--num_gpus", "2"]
    assert command[-5:] == ["dsunlearn/train.py", "--config", "configs/opt-1.3b-harmful.yaml", "--train.lr", "1e-5"]


def test_no_arguments_builds_the_demo_model_then_trains_on_the_demo_config(tmp_path):
    commands = dry_run(tmp_path, "--nproc", "3")
    train = commands[-1]
    assert train[train.index("--num_gpus") + 1] == "3"
    assert train[-3:] == ["dsunlearn/train.py", "--config", "configs/demo.yaml"]
    if not (REPO / "outputs/demo/original/config.json").exists():
        assert commands[0][1:] == ["-m", "dsunlearn", "make-demo", "--out", "outputs/demo/original"]


def test_hostfile_uses_the_deepspeed_multi_node_launcher(tmp_path):
    [command] = dry_run(tmp_path, "--hostfile", "hosts", "--nproc", "8", "--config", "x.yaml")
    assert command[:5] == ["deepspeed", "--hostfile", "hosts", "--num_gpus", "8"]


def test_slurm_allocation_uses_srun_with_ranks_from_slurm(tmp_path):
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "4"}
    [command] = dry_run(tmp_path, "--config", "x.yaml", env=env)
    srun = command.index("srun")
    assert command[srun:srun + 6] == ["srun", "--nodes", "2", "--ntasks-per-node", "4", "--kill-on-bad-exit=1"]
    inner = command[command.index("-c") + 1]
    for variable in ("RANK=$SLURM_PROCID", "WORLD_SIZE=$SLURM_NTASKS", "LOCAL_RANK=$SLURM_LOCALID", "MASTER_ADDR=node-a"):
        assert variable in inner
    assert command[-2:] == ["--config", "x.yaml"]
