"""Start the trainer the way users do: the deepspeed launcher with CPU ranks (DS_ACCELERATOR=cpu, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
