"""Start the trainer the way users do, on CPU ranks (DS_ACCELERATOR=cpu, gloo): as srun starts them, or through the
deepspeed launcher."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warm_start import start_python

REPO = Path(__file__).resolve().parents[1]

# Now and then a rank of the test runs on the CI machines logged "SIGTERM from pid 0 (si_code 0, uid 0)" and the run
# exited 75 with its last step saved. What gives exactly that message (found on 2026-12-07): a process stopped and
# continued (a VM or cgroup freeze, SIGSTOP/SIGCONT) whose watchdog's sigtimedwait ends with EINTR past its time, where
# CPython returns a siginfo it never filled, which the watchdog took for a SIGTERM (test_distributed.py reproduces it).
# The watchdog now checks si_signo. Tests that may meet such a stop still finish the run as a user would, by resuming (the
# resumed run must equal the uninterrupted one), until CI runs show the message no more.
OUTSIDE_STOP = "SIGTERM from pid 0"


def free_port() -> int:
    """A TCP port nobody listens on now (tests run beside each other: fixed port ranges collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def preset_args(preset: str) -> list[str]:
    """The flags that pick a method: ``--config configs/presets/PRESET.yaml`` (absolute), given after the run's own
    config."""
    return ["--config", str(REPO / "configs" / "presets" / f"{preset}.yaml")]


def finish_if_stopped_from_outside(run, args):
    """``run(args) -> (code, output)``, and while it ends stopped from outside (OUTSIDE_STOP, exit 75 with its step
    saved), at most twice, resumed as a user would; returns the last code and every attempt's output."""
    code, output = run(args)
    for _ in range(2):
        if code != 75 or OUTSIDE_STOP not in output:
            break
        code, more = run([*args, "--resume", "true", "--overwrite", "false"])
        output += more
    return code, output


def launch(args, nproc=2, timeout=420, launcher="direct"):
    """Run the trainer on ``nproc`` CPU ranks; return (exit code, output). A run stopped from outside is resumed
    (finish_if_stopped_from_outside).

    ``launcher="direct"``: one process per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in its environment, as
    srun starts them (launch.sh under SLURM); the code is the first non-zero rank code, else 0, and the output is the
    ranks' output, rank 0 first. ``launcher="deepspeed"``: through the deepspeed launcher, as on one node without
    SLURM; it costs two more interpreters that import DeepSpeed (test_launch.py, test_failures.py and the cluster
    tests cover that path).
    """
    return finish_if_stopped_from_outside(lambda run_args: _launch_once(run_args, nproc, timeout, launcher), args)


def _launch_once(args, nproc, timeout, launcher):
    if launcher == "deepspeed":
        deepspeed_bin = Path(sys.executable).with_name("deepspeed")
        command = [str(deepspeed_bin), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                   "dsunlearn/train.py", *args]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PATH=f"{deepspeed_bin.parent}:{os.environ['PATH']}")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr
    with tempfile.TemporaryDirectory() as log_dir:
        processes, logs = start_ranks(args, Path(log_dir), nproc)
        deadline = time.monotonic() + timeout
        try:
            codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes.values()]
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        output = "".join(log_path.read_text(errors="replace") for log_path in logs)
    return next((code for code in codes if code != 0), 0), output


# What sets the threads of OpenBLAS (numpy starts its pool at import), OpenMP and MKL. Most tests set one thread per
# rank (two ranks share the CI machine's cores); tests of signals unset them all, as launch.sh and srun leave them:
# a thread pool started before the entry point blocked SIGTERM is what killed ranks outright (issue 17, item 6).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_NUM_THREADS")


def as_users_run(env: dict) -> dict:
    """``env`` without the thread-count variables (THREAD_VARIABLES)."""
    return {name: value for name, value in env.items() if name not in THREAD_VARIABLES}


def start_ranks(args, log_dir: Path, nproc=2, port=None, prefix=(), ranks=None, extra_env=None, one_thread=True):
    """Start the trainer's ranks (all, or those in ``ranks``) as srun does: one process per rank with
    RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in its environment, its output in ``log_dir/rank{R}.log``; ``prefix`` goes
    before the interpreter (e.g. ``unshare --net``). ``one_thread=False``: no thread-count variable is set, as users
    run (tests of signals). Returns ({rank: process}, [log path per rank])."""
    logs = [log_dir / f"rank{rank}.log" for rank in range(nproc)]
    port = str(port or free_port())
    processes = {}
    base_env = dict(os.environ, OMP_NUM_THREADS="1") if one_thread else as_users_run(os.environ)
    for rank in ranks if ranks is not None else range(nproc):
        env = dict(base_env, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   **(extra_env or {}))
        processes[rank] = start_python(["dsunlearn/train.py", *args], env, REPO, logs[rank], prefix)
    return processes, logs


def run_evaluation_ranks(argv, nproc=2, timeout=300) -> list[str]:
    """``python -m dsunlearn.eval.evaluation ARGV`` as ``nproc`` CPU ranks (the environment a launcher sets); asserts
    every rank exited 0 and returns their outputs."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as log_dir:
        logs = [Path(log_dir) / f"rank{rank}.log" for rank in range(nproc)]
        procs = [
            start_python(["-m", "dsunlearn.eval.evaluation", *argv], dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         REPO, logs[rank])
            for rank in range(nproc)
        ]
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                p.kill()
        outputs = [log.read_text(errors="replace") for log in logs]
    assert all(code == 0 for code in codes), "\n".join(o[-3000:] for o in outputs)
    return outputs
