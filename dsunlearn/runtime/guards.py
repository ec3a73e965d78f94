"""Checks of each training step's metrics: stop a run that diverged or collapsed, end one that finished unlearning.

Every value checked is global (all-reduced, or DeepSpeed's global gradient norm), so every rank reaches the same
verdict at the same step and nothing waits in a collective.
"""

from __future__ import annotations

import math
from typing import Optional

from dsunlearn.runtime.distributed import RunDiverged
from dsunlearn.settings.config import RunConfig

_LOSS_KEYS = ("forget_ce", "random_ce", "normal_kl", "normal_ce", "total")


class StepGuards:
    """``check(row, skipped)`` after every optimizer step: raises ``RunDiverged``, or returns True when the authors'
    stopping rule (``objective.stop_forget_ce``) says unlearning is done."""

    def __init__(self, cfg: RunConfig):
        self.train = cfg.train
        self.fp16 = cfg.model.precision == "fp16"
        self.stop_forget_ce = cfg.objective.stop_forget_ce
        self.skips_in_a_row = 0
        self.zero_grads_in_a_row = 0

    def check(self, row: dict, skipped: bool) -> bool:
        step = row["step"]
        bad = [key for key in _LOSS_KEYS if row.get(key) is not None and not math.isfinite(row[key])]
        if bad:
            raise self._diverged(step, f"{', '.join(bad)} not finite")
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        if skipped and not self.fp16:
            raise self._diverged(step, "the gradient norm is not finite (DeepSpeed skipped the step)")
        limit = self.train.max_fp16_skips
        if skipped and limit is not None and self.skips_in_a_row > limit:
            raise self._diverged(step, f"fp16 overflow: {self.skips_in_a_row} steps in a row skipped "
                                       f"(train.max_fp16_skips={limit})")
        grad_norm = row.get("grad_norm")
        if not skipped and grad_norm is not None and not math.isfinite(grad_norm):
            raise self._diverged(step, "the gradient norm is not finite")
        self.zero_grads_in_a_row = self.zero_grads_in_a_row + 1 if grad_norm == 0 else 0
        limit = self.train.max_zero_grad_steps
        if limit is not None and self.zero_grads_in_a_row >= limit:
            raise self._diverged(step, f"the gradient norm was 0 for {self.zero_grads_in_a_row} steps in a row "
                                       f"(train.max_zero_grad_steps={limit}): the model collapsed")
        bound = self.train.max_normal_kl
        if bound is not None and row.get("normal_kl") is not None and row["normal_kl"] > bound:
            raise self._diverged(step, f"normal KL {row['normal_kl']:.4g} > train.max_normal_kl={bound:g}: the model "
                                       f"no longer behaves like the original on normal data")
        return self.stop_forget_ce is not None and row.get("forget_ce") is not None and (
            row["forget_ce"] > self.stop_forget_ce
        )

    def done_record(self, row: dict) -> dict:
        """What the checkpoint of a step at which ``check`` said done records (its marker's ``done``)."""
        return {"rule": "objective.stop_forget_ce", "forget_ce": row["forget_ce"], "stop_forget_ce": self.stop_forget_ce}

    def done_before(self, record: Optional[dict]) -> bool:
        """Whether a run resumed from a checkpoint whose ``done`` is ``record`` is already done: this run's rule fires
        on the forget CE of the step that stopped it. With the same settings it does, so the resume goes straight to
        the outputs; a bound raised above that CE, or turned off, lets unlearning go on."""
        return (record is not None and self.stop_forget_ce is not None
                and record.get("forget_ce") is not None and record["forget_ce"] > self.stop_forget_ce)

    def _diverged(self, step: int, why: str) -> RunDiverged:
        return RunDiverged(
            f"training diverged at step {step}: {why}. Stopped without saving this step: the newest checkpoint is "
            f"kept and nothing was exported (lower --train.lr, or set --train.max_grad_norm)"
        )
