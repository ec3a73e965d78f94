"""Splitting an evaluation set over ranks and gathering the per-sample results back in order: every rank makes the
same number of collective forward and ``generate`` calls (a short shard repeats samples whose results are dropped)."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def shard_indices(num_samples: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """(this rank's indices, how many of them are real): a contiguous block of ``ceil(n / world_size)``.

    A short last block is padded by repeating its samples (sample 0 when it has none), so every rank
    makes the same number of collective forward and ``generate`` calls; padded results are dropped.
    """
    per_rank = math.ceil(num_samples / world_size)
    real = list(range(min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)))
    filler = real or [0]
    return real + [filler[i % len(filler)] for i in range(per_rank - len(real))], len(real)


def gather_records(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's records, in sample order, on every rank."""
    if world_size == 1:
        return records
    parts: list[Optional[list[dict]]] = [None] * world_size
    torch.distributed.all_gather_object(parts, records)
    return sorted((record for part in parts for record in part), key=lambda record: record["index"])


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
