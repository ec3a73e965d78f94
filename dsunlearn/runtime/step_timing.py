"""Where a training step's time and memory go (``train.time_phases``), measured inside the real loop.

Phases: ``batch`` (the step's batches built), ``policy_forward`` (the policy's body), ``reference_forward``,
``head_loss`` (the output head and the loss), ``backward`` and ``optimizer``; ``zero3_gather`` (ZeRO-3 parameter
fetch and release) and ``zero3_reduce`` (gradient reduce-scatter) are "of which" inside the forward and backward
phases. The forwards are timed by module hooks, so ``forward_loss`` needs no edit; the others by
``with timer.phase(name)`` in the loop. The device is synchronised at every boundary, and only while timing is on.

Each metrics row then carries the step's seconds per phase (the mean over ranks), peak memory and the memory held at
the step's end (the largest of each: a reference model the loop no longer needs shows in the latter), the torch threads
of a process, and the work of the step: real tokens, padded positions and a checksum of the token ids that does not
depend on how the sequences were split into ranks, batches and padding (the step benchmark checks it against the
paper-style loop's).
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch

PHASES = ("batch", "policy_forward", "reference_forward", "head_loss", "backward", "optimizer")
ZERO3_PHASES = ("zero3_gather", "zero3_reduce")
# Checksum of one sequence: sum of id * BASE^position modulo a prime; ids < 2^18 and powers < 2^31 keep every product
# and the sum over a sequence (< 2^16 tokens) inside int64.
CHECKSUM_MODULUS = 2**31 - 1
CHECKSUM_BASE = 1_000_003

# The timer that the ZeRO-3 wrappers report to (patched once per process, see _wrap_zero3).
_active_timer: StepTimer | None = None


def current_rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: ``max_memory_allocated`` on a GPU, peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def held_memory_mib(device: torch.device) -> float:
    """Memory this process holds now: ``memory_allocated`` on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return current_rss_mib()


def sequence_checksums(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] checksum of each sequence's real tokens (positions counted among its real tokens, so left, right or no
    padding give the same value); ``input_ids``, ``attention_mask``: [B, L]."""
    mask = attention_mask.to(torch.long)
    position = (mask.cumsum(1) - 1).clamp(min=0)  # [B, L] index among the sequence's real tokens
    powers = torch.ones(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    for i in range(1, powers.numel()):
        powers[i] = powers[i - 1] * CHECKSUM_BASE % CHECKSUM_MODULUS
    terms = (input_ids.to(torch.long) % CHECKSUM_MODULUS) * powers[position] % CHECKSUM_MODULUS * mask
    return terms.sum(1) % CHECKSUM_MODULUS


def work_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[3] int64: real tokens, positions (real and padded) and the checksum (sum of sequence checksums) of a batch."""
    return torch.stack(
        [
            attention_mask.sum().to(torch.long),
            torch.tensor(input_ids.numel(), device=input_ids.device),
            sequence_checksums(input_ids, attention_mask).sum(),
        ]
    ).cpu()


class StepTimer:
    """Per-phase seconds, peak memory and work of each step; a no-op unless ``enabled``."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        # The process's memory before any model exists (after the imports): the floor every peak sits on.
        self.baseline_mem_mib = current_rss_mib() if device.type == "cpu" else 0.0
        self.seconds = dict.fromkeys(PHASES + ZERO3_PHASES, 0.0)
        self.work = torch.zeros(3, dtype=torch.long)
        self._open_forward: list | None = None  # [phase, start, head seconds inside it]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def attach(self, policy_engine, ref_engine) -> None:
        """Time the forwards through hooks: the policy module's ``mode="loss"`` call is the policy forward (less its
        head), any other mode (LoRA's adapters-off reference) and the reference engine's module are the reference
        forward, and the policy head's call inside the loss call is ``head_loss``. Also times ZeRO-3's gathers and
        reduces."""
        global _active_timer
        if not self.enabled:
            return
        policy = policy_engine.module
        policy.register_forward_pre_hook(self._forward_started, with_kwargs=True)
        policy.register_forward_hook(self._forward_ended)
        if ref_engine is not None:
            ref_engine.module.register_forward_pre_hook(self._reference_started, with_kwargs=True)
            ref_engine.module.register_forward_hook(self._forward_ended)
        head = policy.lm.get_output_embeddings()
        head.register_forward_pre_hook(self._head_started)
        head.register_forward_hook(self._head_ended)
        _wrap_zero3()
        _active_timer = self

    def _forward_started(self, module, args, kwargs) -> None:
        self._sync()
        name = "policy_forward" if kwargs.get("mode") == "loss" else "reference_forward"
        self._open_forward = [name, time.perf_counter(), 0.0]

    def _reference_started(self, module, args, kwargs) -> None:
        self._sync()
        self._open_forward = ["reference_forward", time.perf_counter(), 0.0]

    def _forward_ended(self, module, args, output) -> None:
        self._sync()
        name, start, head_seconds = self._open_forward
        self.seconds[name] += time.perf_counter() - start - head_seconds
        self._open_forward = None

    def _head_started(self, module, args) -> None:
        self._sync()
        self._head_start = time.perf_counter()

    def _head_ended(self, module, args, output) -> None:
        # The head inside the policy's loss call is head_loss; inside the reference's own forward (logits path) it
        # stays part of the reference forward.
        self._sync()
        if self._open_forward is not None and self._open_forward[0] == "policy_forward":
            seconds = time.perf_counter() - self._head_start
            self.seconds["head_loss"] += seconds
            self._open_forward[2] += seconds

    def count_work(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Add one padded micro-batch of the policy to the step's work."""
        if self.enabled:
            self.work += work_of(input_ids, attention_mask)

    def count_sequences(self, sequences: list, num_positions: int) -> None:
        """Add one micro-batch of the policy to the step's work: its tokenised sequences, whatever their layout, and
        the positions the policy ran them in."""
        if self.enabled:
            from dsunlearn.data.tokenization import pad_batch

            padded = pad_batch(sequences, pad_id=0)
            work = work_of(padded["input_ids"], padded["attention_mask"])
            work[1] = num_positions
            self.work += work

    def step_fields(self) -> dict:
        """The metrics-row fields of the step just done (a collective: call it on every rank): seconds per phase, the
        mean over ranks; peak memory, the largest; the work, summed; the torch threads this process ran with. Then
        counting starts afresh for the next step."""
        names = PHASES + ZERO3_PHASES
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        # Seconds and work in one float64 sum: the counts and checksums stay below 2^53, so they are exact.
        summed = torch.tensor(
            [self.seconds[name] for name in names] + self.work.tolist(), dtype=torch.float64, device=self.device
        )
        peak = torch.tensor(
            [peak_memory_mib(self.device), held_memory_mib(self.device)], dtype=torch.float64, device=self.device
        )
        if world_size > 1:
            torch.distributed.all_reduce(summed)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        values = summed.tolist()
        self.seconds = dict.fromkeys(names, 0.0)
        self.work = torch.zeros(3, dtype=torch.long)
        tokens, positions, checksum = (int(value) for value in values[len(names) :])
        return {
            "phase_s": {name: value / world_size for name, value in zip(names, values)},
            "peak_mem_mib": float(peak[0]),
            "held_mem_mib": float(peak[1]),
            "baseline_mem_mib": self.baseline_mem_mib,
            "real_tokens": tokens,
            "positions": positions,
            "work_checksum": checksum % CHECKSUM_MODULUS,
            "threads": torch.get_num_threads(),
        }


def _wrap_zero3() -> None:
    """Wrap DeepSpeed's ZeRO-3 parameter fetch/release and gradient reduce so their time goes to the active timer;
    once per process (the wrappers look the timer up at each call)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    targets = (
        (PartitionedParameterCoordinator, "fetch_sub_module", "zero3_gather"),
        (PartitionedParameterCoordinator, "release_sub_module", "zero3_gather"),
        (
            DeepSpeedZeroOptimizer_Stage3,
            "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
            "zero3_reduce",
        ),
    )
    for owner, attribute, phase in targets:
        original = getattr(owner, attribute)
        if getattr(original, "_dsunlearn_timed", False):
            continue
        setattr(owner, attribute, _timed(original, phase))


def _timed(function, phase: str):
    def timed(*args, **kwargs):
        timer = _active_timer
        if timer is None or not timer.enabled:
            return function(*args, **kwargs)
        timer._sync()
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timer._sync()
            timer.seconds[phase] += time.perf_counter() - start

    timed._dsunlearn_timed = True
    return timed
