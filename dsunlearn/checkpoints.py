"""DeepSpeed checkpoints of the policy engine: save with rotation, resume from the newest."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from dsunlearn import checkpoint_reshape

CHECKPOINT_PREFIX = "step_"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """A DeepSpeed checkpoint (all ranks), tagged by step; old ones beyond ``keep`` are removed by rank 0."""
    tag = f"{CHECKPOINT_PREFIX}{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0 and keep > 0:
        for old in sorted(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return checkpoint_dir / tag


def load_latest_checkpoint(engine, checkpoint_dir: Path) -> Optional[dict]:
    """Load the checkpoint named in ``latest`` (written last by DeepSpeed, so a crash mid-save leaves the previous
    one); return its client state, or None when there is none."""
    if not (checkpoint_dir / "latest").is_file():
        return None
    tag = (checkpoint_dir / "latest").read_text().strip()
    if checkpoint_reshape.saved_world_size(checkpoint_dir / tag) != torch.distributed.get_world_size():
        return checkpoint_reshape.load_resharded(engine, checkpoint_dir, tag)
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint named in {checkpoint_dir / 'latest'}")
    return client_state
