"""Short 2-rank runs end cleanly (distributed.py: the process group is torn down on the way out, so no rank aborts
in C++ at exit: "terminate called without an active exception", exit -6) and print none of the third-party
deprecation noise that noise.py silences; a rank's threads leave SIGTERM to its watchdog (issue 17, item 6).

The ranks are started directly, as srun starts them, so each rank's own exit code is seen.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import OUTSIDE_STOP, REPO, as_users_run, start_ranks

from dsunlearn.runtime.distributed import EXIT_OK, EXIT_PREEMPTED

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

RUNS = 2  # the abort was seen about once in 25 runs: a cheap loop in CI, run more by hand (the issue note says how many)
HANG_LIMIT_S = 300  # only stops a hung run; nothing is timed


def run_two_ranks(args, log_dir):
    """Start ranks 0 and 1 of one run; return ({rank: exit code}, their output)."""
    processes, logs = start_ranks(args, log_dir)
    try:
        codes = {rank: process.wait(timeout=HANG_LIMIT_S) for rank, process in processes.items()}
    finally:
        for process in processes.values():
            kill_if_running(process)
    return codes, "".join(log.read_text() for log in logs)


@pytest.fixture(scope="module")
def short_runs(tiny_model_dir, tmp_path_factory):
    """[(exit codes, output)] of RUNS runs of one step each, without export or evaluation."""
    runs = []
    for i in range(RUNS):
        run_dir = tmp_path_factory.mktemp(f"short_run{i}")
        args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir",
                str(run_dir / "out"), "--train.max_steps", "1", "--output.export", "false",
                "--output.evaluate", "false"]
        runs.append(run_two_ranks(args, run_dir))
    return runs


def test_every_short_run_ends_cleanly(short_runs):
    for codes, output in short_runs:
        # A stop from outside (launching.OUTSIDE_STOP) is an exit path too: every rank 75, and no abort either.
        stopped_from_outside = codes == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED} and OUTSIDE_STOP in output
        assert codes == {0: EXIT_OK, 1: EXIT_OK} or stopped_from_outside, output[-4000:]
        assert "terminate called" not in output, output[-4000:]


def test_deepspeed_collective_deprecations_are_silent(short_runs):
    """DeepSpeed's ZeRO-3 calls torch's deprecated all-gather / reduce-scatter names; each rank printed a
    FutureWarning about them (noise.KNOWN_NOISE)."""
    for _, output in short_runs:
        assert "all_gather_into_tensor` is deprecated" not in output, output[-4000:]
        assert "reduce_scatter_tensor` is deprecated" not in output, output[-4000:]


# ---- SIGTERM and the threads of a rank (issue 17 item 6) ----
#
# `import torch` imports numpy, whose OpenBLAS starts worker threads at import (one per core but one) unless
# OMP_NUM_THREADS/OPENBLAS_NUM_THREADS say 1. A process-directed SIGTERM goes to a thread that does not block it; with
# the default action that thread ends the whole process (-15, no checkpoint). These processes run with the thread
# variables unset, as launch.sh and srun run ranks.
_SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def kill_if_running(process) -> None:
    """SIGKILL ``process`` if it still runs, and reap it (a failed assertion must leave no rank behind)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def users_env(**variables) -> dict:
    """This environment as users run ranks (no thread-count variable: launching.THREAD_VARIABLES), on CPU."""
    return dict(as_users_run(os.environ), DS_ACCELERATOR="cpu", **variables)


def thread_states(pid: int) -> dict[int, tuple[bool, str]]:
    """{thread id: (blocks SIGTERM, the kernel function it sleeps in)} of every thread of ``pid``."""
    states = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            wchan = (task / "wchan").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        states[int(task.name)] = (bool(blocked & _SIGTERM_BIT), wchan)
    return states


def watchdog_waiting(process, log_path: Path, deadline: float) -> dict[int, tuple[bool, str]]:
    """``thread_states`` of ``process`` once its watchdog's thread waits for SIGTERM (fails if it ends or the deadline
    passes first)."""
    while True:
        states = thread_states(process.pid)
        if any(wchan.startswith("do_sigtimedwait") for _, wchan in states.values()):
            return states
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.05)


@pytest.mark.distributed
@pytest.mark.parametrize("entry", ["script", "module"])
def test_every_thread_but_the_watchdog_blocks_sigterm(entry, tiny_model_dir, tmp_path):
    """A rank started as users start it (``python dsunlearn/train.py`` under launch.sh, srun or the deepspeed launcher;
    ``python -m dsunlearn train``), here rank 1 of 2 whose "rank 0" is this test, holding MASTER_PORT and never
    answering: once the rank connects (torch, numpy and DeepSpeed imported, the watchdog running), every thread but
    the watchdog's blocks SIGTERM, and a SIGTERM ends the rank with 75 at once (it is outside the training loop)."""
    command = ["dsunlearn/train.py"] if entry == "script" else ["-m", "dsunlearn", "train"]
    args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir),
            "--output.dir", str(tmp_path / "run"), "--train.collective_timeout_s", "120"]
    log_path = tmp_path / "rank1.log"
    with socket.socket() as store:
        store.bind(("127.0.0.1", 0))
        store.listen()
        store.settimeout(1)
        env = users_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(store.getsockname()[1]))
        with open(log_path, "w") as log:
            rank = subprocess.Popen([sys.executable, *command, *args], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + HANG_LIMIT_S
            while True:  # until the rank connects, then until its watchdog's thread waits for SIGTERM
                assert rank.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
                try:
                    connection = store.accept()[0]
                    break
                except socket.timeout:
                    continue
            with connection:
                states = watchdog_waiting(rank, log_path, deadline)
                unblocked = [wchan for blocks, wchan in states.values() if not blocks]
                assert len(states) > 2, states  # numpy's OpenBLAS threads (and torch's) are there
                assert [wchan for wchan in unblocked if not wchan.startswith("do_sigtimedwait")] == [], states
                rank.send_signal(signal.SIGTERM)
                code = rank.wait(timeout=60)
        finally:
            kill_if_running(rank)
    output = log_path.read_text()
    assert code == EXIT_PREEMPTED, output[-4000:]
    assert "outside a training step: stopped at once" in output, output[-4000:]


SAFETY_NET = """
import signal, sys, threading, time
stray = threading.Thread(target=threading.Event().wait, daemon=True)  # started with SIGTERM unblocked
stray.start()
from dsunlearn.runtime import distributed
watchdog = distributed.Watchdog()
signal.pthread_kill(stray.ident, signal.SIGTERM)  # delivered to that thread, as the kernel may pick it
for _ in range(600):
    time.sleep(0.05)
sys.exit(9)
"""


@pytest.mark.distributed
def test_a_thread_that_takes_sigterm_requests_a_stop_instead_of_killing(tmp_path):
    """The safety net: a thread started before the entry point blocked SIGTERM (an embedding program, a library
    imported first) is named, and a SIGTERM it takes requests a stop (75) rather than killing the process (-15)."""
    done = subprocess.run([sys.executable, "-c", SAFETY_NET], cwd=tmp_path, env=users_env(), capture_output=True,
                          text=True, timeout=HANG_LIMIT_S)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_PREEMPTED, output[-4000:]
    assert "SIGTERM unblocked" in output and "outside a training step: stopped at once" in output, output[-4000:]


STOPPED_AND_CONTINUED = """
import signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as the entry points do first
from dsunlearn.runtime import distributed
watchdog = distributed.Watchdog()
print("watching", flush=True)
for _ in range(1200):
    time.sleep(0.05)
sys.exit(9)
"""


@pytest.mark.distributed
def test_a_rank_stopped_and_continued_is_not_stopped_by_a_sigterm_nobody_sent(tmp_path):
    """SIGSTOP then SIGCONT (``scontrol suspend``/``resume``, Ctrl-Z and ``fg``, py-spy, a frozen VM) for longer than
    the watchdog's wait: the wait ends with EINTR past its time, and CPython hands back a siginfo it never filled. The
    watchdog read that as "SIGTERM from pid 0" and stopped the run with 75; it must go on, and still stop on a real
    SIGTERM."""
    log_path = tmp_path / "watchdog.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", STOPPED_AND_CONTINUED], cwd=tmp_path, env=users_env(),
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        watchdog_waiting(process, log_path, time.monotonic() + HANG_LIMIT_S)
        for _ in range(2):
            process.send_signal(signal.SIGSTOP)
            time.sleep(1.5)  # past the watchdog's 1 s wait
            process.send_signal(signal.SIGCONT)
            time.sleep(0.5)
        time.sleep(1.0)  # a stop request ends the process at once
        assert process.poll() is None, log_path.read_text()[-4000:]
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        kill_if_running(process)
    output = log_path.read_text()
    assert code == EXIT_PREEMPTED, output[-4000:]
    assert f"SIGTERM from pid {os.getpid()}" in output and "pid 0" not in output, output[-4000:]
