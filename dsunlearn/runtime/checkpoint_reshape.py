"""Resume a ZeRO-3 checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO-3 step folder holds one optimizer shard per rank (``zero_pp_rank_R_mp_rank_00_optim_states.pt``): the flat
fp32 master weights and Adam moments of rank R's slice of every parameter, so it loads only on the world size that
wrote it. DeepSpeed's universal checkpoint stores each parameter whole (``zero/<parameter name>/{fp32,exp_avg,
exp_avg_sq}.pt``), and its ZeRO-3 loader slices that for any world size. A step folder is converted once, by rank 0,
into ``<step folder>/universal`` (inside the step folder, so rotation removes both together), and every later
resume on another world size reuses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

UNIVERSAL_SUBDIR = "universal"
_PARTIAL_SUFFIX = ".partial"
# DeepSpeed's name for rank R's optimizer shard (no tensor parallelism: model-parallel rank 00).
_OPTIM_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_MODEL_STATES_RANK0 = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def saved_world_size(step_dir: Path) -> int:
    """The data-parallel world size that wrote the ZeRO-3 checkpoint in ``step_dir``.

    Read from rank 0's model states (DeepSpeed records ``dp_world_size`` there), and checked against the number of
    optimizer shards on disk, so a step folder that lost a shard is refused here rather than loaded half-way.
    """
    model_states = step_dir / _MODEL_STATES_RANK0
    if not model_states.is_file():
        raise FileNotFoundError(f"{step_dir} is not a ZeRO-3 checkpoint: {model_states.name} is missing")
    # mmap: with frozen parameters (LoRA) this file also holds rank 0's shard of them, which is not needed here.
    world_size = int(torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)["dp_world_size"])
    shard_ranks = {int(m.group(1)) for p in step_dir.iterdir() if (m := _OPTIM_SHARD.match(p.name))}
    if shard_ranks != set(range(world_size)):
        raise RuntimeError(
            f"{step_dir} was written by {world_size} ranks but holds optimizer shards of ranks {sorted(shard_ranks)}"
        )
    return world_size


def load_resharded(engine, checkpoint_dir: Path, tag: str) -> dict:
    """Load the ZeRO-3 checkpoint ``checkpoint_dir/tag`` into ``engine`` whatever world size wrote it: fp32 master
    weights, Adam moments and step, the lr scheduler; return the client state. A collective: call it on every rank.

    Rank 0 converts the step folder to a universal checkpoint unless an earlier resume did; the other ranks wait,
    and a conversion error is raised on every rank, not only on rank 0.
    """
    step_dir = checkpoint_dir / tag
    universal_dir = step_dir / UNIVERSAL_SUBDIR
    error = None
    if torch.distributed.get_rank() == 0 and not universal_dir.is_dir():
        try:
            convert_to_universal(step_dir, universal_dir)
        except Exception as exc:  # re-raised below on every rank
            error = f"converting {step_dir} to a universal checkpoint failed: {type(exc).__name__}: {exc}"
    shared = [error]
    torch.distributed.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise RuntimeError(shared[0])

    with _universal_loading(engine):
        load_path, client_state = engine.load_checkpoint(str(step_dir), tag=UNIVERSAL_SUBDIR)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal_dir}")
    return client_state


def convert_to_universal(step_dir: Path, universal_dir: Path) -> None:
    """Write the universal form of the ZeRO-3 checkpoint ``step_dir`` to ``universal_dir``, atomically: it is
    built in a temporary folder and renamed when complete, so a crash mid-way leaves no folder a resume would trust.

    DeepSpeed's converter runs as its own process, so the memory it takes (one rank's whole optimizer shard while
    extracting) is returned when it ends. It runs serially: with 2 merge workers its process pool hung here (torch
    2.13, forked workers idle for minutes).
    """
    partial_dir = universal_dir.with_name(universal_dir.name + _PARTIAL_SUFFIX)
    shutil.rmtree(partial_dir, ignore_errors=True)  # left by a conversion that was killed
    logger.info("converting %s (%d ranks) to a universal checkpoint", step_dir, saved_world_size(step_dir))
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
         "--output_folder", str(partial_dir), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"DeepSpeed's ds_to_universal exited with {done.returncode}:\n{done.stdout[-4000:]}")
    # The converter also names its output in a ``latest_universal`` file beside it; we always load by tag.
    (partial_dir.parent / "latest_universal").unlink(missing_ok=True)
    _fsync_tree(partial_dir)
    os.replace(partial_dir, universal_dir)


@contextlib.contextmanager
def _universal_loading(engine):
    """DeepSpeed takes "load the universal format" from the config the engine was built with (``checkpoint.
    load_universal``); the policy engine is built before resume knows which checkpoint it will load, and on which
    world size it was written, so the switch is set for this one load only."""
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = previous


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
