"""The process group: NCCL on GPUs, gloo on CPU ranks, a world of one without a launcher."""

from __future__ import annotations

import os
import socket

import torch

# Exit codes of every dsunlearn process, the same on every rank and through launch.sh (README: "Exit codes").
EXIT_OK = 0  # finished (also when objective.stop_forget_ce ended the run early)
EXIT_FAILED = 1  # an error on some rank: its message names the rank and the cause
EXIT_USAGE = 2  # bad settings or input (data, model folder, rank count): one message, nothing started
EXIT_DIVERGED = 3  # non-finite or collapsed training: stopped, the last good checkpoint kept, nothing exported
EXIT_PREEMPTED = 75  # SIGTERM (SLURM pre-emption, scancel, time limit): the current step saved; resume with --resume


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPU ranks) and return (rank, world_size, local_rank).

    A plain ``python -m dsunlearn train`` has no launcher variables: it becomes a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks at start-up (minutes on a small machine, and
        # again whenever the environment changes). Only tensor-parallel inference uses it; ZeRO uses the process group.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())
