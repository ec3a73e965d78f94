"""The global example stream and random answers.

Which examples an optimizer step reads, and their random answers, are a function of (seed, step, global batch)
and never of how that batch is split into ranks and micro-steps (:class:`StepSampler`, DESIGN.md §6a).
"""

from __future__ import annotations

import functools
from typing import Iterable

import numpy as np

# ---------------------------------------------------------------------------------------------------
# The global example stream and random answers
# ---------------------------------------------------------------------------------------------------

# What a seeded generator is for: the first word of its key, so no two uses ever share a stream.
_EPOCH_ORDER, _RANDOM_ANSWERS = 0, 1


def _generator(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints. NumPy's SeedSequence hashes the whole tuple, so nearby keys
    ((s, e + 1) and (s + 1, e)) give unrelated streams, unlike adding the parts into one seed."""
    return np.random.default_rng(key)


@functools.lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: a step reads a few positions of one or two epochs, and the forget and normal streams alternate.
    return _generator(_EPOCH_ORDER, seed, epoch).permutation(num_samples)


class StepSampler:
    """Which examples each (rank, micro-step) slot of an optimizer step reads, from one global example stream.

    Epoch ``e`` is a permutation of the ``num_samples`` examples drawn from (``seed``, ``e``); the epochs, one after
    the other, make the stream. Optimizer step ``s`` reads the ``G = batch_size * world_size *
    gradient_accumulation_steps`` stream positions ``[s*G, (s+1)*G)``, and slot ``j = micro_step * world_size +
    rank`` reads ``[s*G + j*batch_size, s*G + (j+1)*batch_size)``.

    So the examples of a step, and their stream positions (which seed the random answers), depend on (seed, step,
    G) only: 1 rank x 4 micro-steps and 4 ranks x 1 train on the same examples, and a resumed run reads at step ``s``
    what an uninterrupted one read. A step may run across an epoch boundary; an example occurs twice in one step
    only when ``G`` exceeds ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        world_size: int = 1,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError(
                f"world_size and gradient_accumulation_steps must be at least 1, "
                f"got {world_size} and {gradient_accumulation_steps}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed

    @property
    def step_size(self) -> int:
        """G: the examples one optimizer step reads, over all ranks and micro-steps."""
        return self.batch_size * self.world_size * self.gradient_accumulation_steps

    def positions(self, step: int, rank: int = 0, micro_step: int = 0) -> range:
        """The stream positions of slot (``rank``, ``micro_step``) of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if not 0 <= micro_step < self.gradient_accumulation_steps:
            raise ValueError(f"micro_step must be in [0, {self.gradient_accumulation_steps}), got {micro_step}")
        start = step * self.step_size + (micro_step * self.world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)

    def example_at(self, position: int) -> int:
        """The example index at a stream position."""
        epoch, within = divmod(position, self.num_samples)
        return int(_epoch_order(self.num_samples, self.seed, epoch)[within])

    def indices(self, step: int, rank: int = 0, micro_step: int = 0) -> list[int]:
        """The ``batch_size`` example indices of slot (``rank``, ``micro_step``) of optimizer step ``step``."""
        return [self.example_at(position) for position in self.positions(step, rank, micro_step)]


def draw_random_answers(pool: list[str], stream_positions: Iterable[int], k: int, seed: int) -> list[list[str]]:
    """``k`` random answers for each forget example, given by its stream position (:meth:`StepSampler.positions`).

    The answers of one example come from a generator seeded by (``seed``, its stream position) alone: the same
    whichever rank and micro-step read it, and new each time the stream brings the example back. Pass the responses
    of the normal data's *train* split as ``pool``. An example's answers are distinct pool entries when the pool has
    at least ``k``; otherwise they are drawn with replacement.
    """
    if not pool:
        raise ValueError("the random-answer pool is empty: the normal train split has no responses")
    if k < 1:
        raise ValueError(f"k (random answers per prompt) must be at least 1, got {k}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    answers = []
    for position in stream_positions:
        chosen = _generator(_RANDOM_ANSWERS, seed, position).choice(len(pool), size=k, replace=len(pool) < k)
        answers.append([pool[i] for i in chosen.tolist()])
    return answers
