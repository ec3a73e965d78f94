"""Start the trainer the way users do: the deepspeed launcher with CPU ranks (DS_ACCELERATOR=cpu, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A SIGTERM whose sender is outside this machine's PID namespace (si_pid 0: not SLURM, launch.sh or the test) now and
# then stops a rank of the test runs on the CI machines; the rank logs "SIGTERM from pid 0" and the run exits 75 with
# its last step saved. Such a run is a real pre-emption: tests that may meet one finish it as a user would, by
# resuming (the resumed run must still equal the uninterrupted one).
OUTSIDE_STOP = "SIGTERM from pid 0"


def free_port() -> int:
    """A TCP port nobody listens on now (tests run beside each other: fixed port ranges collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, nproc=2, timeout=420):
    """Run the trainer through the deepspeed launcher on CPU ranks; return (returncode, output)."""
    deepspeed_bin = Path(sys.executable).with_name("deepspeed")
    command = [str(deepspeed_bin), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "dsunlearn/train.py", *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{deepspeed_bin.parent}:{os.environ['PATH']}")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr
