"""Deterministic train / held-out splits grouped by prompt (a prompt is on one side only), and the check that a
never-seen set shares no prompt with the forget data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from dsunlearn.data.pairs import Pair


def prompt_key(pair: Pair) -> str:
    """What makes two pairs share a prompt: the same text after whitespace strip."""
    return pair.prompt.strip()


def split_pairs(pairs: list[Pair], held_out_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split ``pairs`` into (train, held_out) by prompt, deterministically from ``seed`` and the pairs.

    Every pair sharing a prompt (:func:`prompt_key`) lands on the same side: PKU-SafeRLHF gives two pairs for a row
    with two unsafe responses, and repeats prompts across rows, so a split of pairs would evaluate "held-out" prompts
    that were trained on. ``round(prompts * held_out_fraction)`` distinct prompts are held out (at least one when the
    fraction is positive and there are two prompts or more; training always keeps at least one). Both parts keep
    file order.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    group_ids: dict[str, int] = {}  # prompt -> index of its first appearance
    pair_groups = [group_ids.setdefault(prompt_key(pair), len(group_ids)) for pair in pairs]
    num_groups = len(group_ids)
    num_held_out = round(num_groups * held_out_fraction)
    if held_out_fraction > 0 and num_groups >= 2:
        num_held_out = max(num_held_out, 1)
    num_held_out = min(num_held_out, max(num_groups - 1, 0))
    generator = torch.Generator().manual_seed(seed)
    held_out_groups = set(torch.randperm(num_groups, generator=generator)[:num_held_out].tolist())
    train = [pair for pair, group in zip(pairs, pair_groups) if group not in held_out_groups]
    held_out = [pair for pair, group in zip(pairs, pair_groups) if group in held_out_groups]
    return train, held_out


def split_record(train: list[Pair], held_out: list[Pair]) -> dict[str, int]:
    """The distinct prompts of each side of a split and how many of them both share (0 for :func:`split_pairs`)."""
    train_prompts = {prompt_key(pair) for pair in train}
    held_out_prompts = {prompt_key(pair) for pair in held_out}
    return {
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "train_prompts": len(train_prompts),
        "held_out_prompts": len(held_out_prompts),
        "prompt_overlap": len(train_prompts & held_out_prompts),
    }


# Prompts of a never-seen set listed in its overlap warning.
OVERLAP_EXAMPLES = 3


def holdout_overlap(forget: Sequence[Pair], holdout: Sequence[Pair]) -> list[str]:
    """The holdout's prompts (``data.prompt_key``) that the forget data also has, in holdout order."""
    forget_prompts = {prompt_key(pair) for pair in forget}
    shared = dict.fromkeys(prompt_key(pair) for pair in holdout)
    return [prompt for prompt in shared if prompt in forget_prompts]


def overlap_warning(forget: Sequence[Pair], holdout: Sequence[Pair]) -> Optional[str]:
    """The warning for a never-seen set that shares prompts with the forget data (those samples are members, and the
    AUC understates what an attacker can tell), naming the count and the first few; None when there is no overlap."""
    shared = holdout_overlap(forget, holdout)
    if not shared:
        return None
    examples = "; ".join(repr(prompt) for prompt in shared[:OVERLAP_EXAMPLES])
    num_prompts = len({prompt_key(pair) for pair in holdout})
    return (
        f"data.holdout shares {len(shared)} of its {num_prompts} prompts with data.forget (e.g. {examples}): they are "
        "not never-seen samples, and the MIA AUC understates the leak; remove them from the holdout"
    )
