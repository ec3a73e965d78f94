"""Benchmark of the fused linear CE + KL loss against eager PyTorch, torch.compile, Liger-Kernel and CCE.

    python -m dsunlearn.kernels.bench [--n N --h H --v V --dtype bf16 --device cuda --terms both
                                       --impls torch,torch.compile,chunked,compiled,triton,liger,liger.chunked,
                                               liger.chunked.eager,cce
                                       --json out.json]

Problems (``--terms``): ``ce``, ``kl`` or ``both`` put that term on every token; ``mix`` is Yao et al.'s step in
thirds, CE with weight −1 on the forget tokens, CE on the random-answer tokens, KL on the normal tokens; ``npo`` is an
NPO step (issue 18): the first half of the tokens are forget tokens in ``NPO_FORGET_SEQUENCES`` sequences with the
term −(2/β)·log σ(−β·(s_θ(y) − s_ref(y))) per sequence (β = ``NPO_BETA``, s the summed log-likelihood of its tokens,
s_ref from a reference head a little away from the policy's), the rest normal tokens with CE weight 1 (retain
``nll``). Our implementations run it as the trainer does (``dsunlearn.kernels.sequence_forget``, the code of its
head): on ``chunked`` and ``compiled``, one fused forward and backward whose chunks hold whole forget sequences and
weigh them by the term's derivative once their CE is known; on ``triton`` (and where a sequence is longer than a
chunk) a first head forward over the forget tokens without a gradient, then the fused pass with those weights. SimNPO
runs the same code with another scalar function of s. With ``npo`` each implementation also runs the
``--compare-terms`` problems (default ``mix`` and ``ce``) at the same N, H, V on the same hidden states, head and
targets, and a line per implementation gives the ratios of peak memory and time.

Liger-Kernel appears three times. ``liger`` (CUDA only: Triton kernels) is its fused linear CE (fp32 accumulation
where the release has ``accum_dtype``) followed by its fused linear JSD at β = 0, two passes over the head.
``liger.chunked`` is ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` at β = 0 with its default
``compiled=True`` (each chunk's work through torch.compile), ``liger.chunked.eager`` the same with
``compiled=False``; both are plain PyTorch and run on the CPU too. For ``both`` they make one pass
(``weight_hard_loss=1, weight_soft_loss=1``), the same work as ``fused_linear_ce_kl``; for ``mix`` three calls,
one per term, since one target mask and two scalar weights cannot express it. At β = 0 Liger computes the forward
KL(p_ref ‖ p_θ), as this package.

For each implementation: the first call's time (compilation included, a fresh Inductor cache per implementation
on the CPU), then forward, backward and forward+backward time (median of ``--repeats``; CUDA events on a
GPU), peak extra memory (on a GPU ``torch.cuda.max_memory_allocated`` over the inputs; on the CPU the peak
resident memory of a fresh subprocess per implementation over its resident memory before the measured call),
the achieved TFLOP/s counting 2·N·H·V per matrix product (6·N·H·V for the trained head, forward and backward,
plus 2·N·H·V for the reference logits), the same as a share of the rate ``torch.mm`` reaches on this machine at
the logits' shape and dtype, and speed and memory ratios to ``torch`` (materialised logits, eager).
The peak extra memory includes the gradients of ``hidden`` and ``weight``, which every implementation returns.

Before any timing each loss is compared with a float64 computation of the same sum (row by row blocks, no
[N, V] float64 tensor; column ``loss err``); problems with N·V <= 2^22 also check both gradients (``err f64``).

On the CPU ``triton`` runs in Triton's interpreter, at ``--interpreter-size`` (small): its row checks
correctness against float64, its times mean nothing. Liger's Triton ops (``liger``) and cut-cross-entropy run
on CUDA only; Liger-Kernel (``pip install dsunlearn[bench]``) is skipped with a note when missing. Works without deepspeed: it imports only torch, triton and this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = (
    "torch", "torch.compile", "chunked", "compiled", "triton", "liger", "liger.chunked", "liger.chunked.eager", "cce",
)  # fmt: skip
TERMS = ("ce", "kl", "both", "mix", "npo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_DEFAULT_SIZE = (16384, 4096, 128256)  # Llama-3 8B head over 16k tokens
CPU_DEFAULT_SIZE = (2048, 256, 16384)
# Problems up to this many logits are also checked against a float64 materialised reference, gradients included.
REFERENCE_CHECK_MAX_LOGITS = 2**22
# Largest relative error of the loss against float64 before an implementation is timed, per input dtype.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
# Rows per block of the float64 loss check.
FLOAT64_BLOCK_ROWS = 256
# The npo problem: forget sequences the first half of the tokens is split into (a few, as a micro-batch holds), NPO's
# beta (open-unlearning's default, objective.npo_beta), and how far the reference head that gives s_ref lies from the
# policy's (the scale of its noise over the policy head's, as the KL problems' reference head).
NPO_FORGET_SEQUENCES = 4
NPO_BETA = 0.1
NPO_REFERENCE_NOISE = 0.2
# Our implementations, the ones the npo problem runs: the backends of fused_linear_ce_kl.
FUSED_BACKENDS = ("torch", "chunked", "compiled", "triton")
# The problems --terms npo is compared with unless --compare-terms says otherwise.
NPO_COMPARE_TERMS = ("mix", "ce")


class Skipped(Exception):
    """An implementation that cannot run here (not installed, no CUDA, term not supported)."""


@dataclass
class Problem:
    num_tokens: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    terms: str  # one of TERMS
    seed: int = 0

    def __post_init__(self):
        if self.terms == "npo" and self.num_tokens < 2 * NPO_FORGET_SEQUENCES:
            raise ValueError(f"the npo problem needs at least {2 * NPO_FORGET_SEQUENCES} tokens, got {self.num_tokens}")

    @property
    def has_ce(self) -> bool:
        return self.terms in ("ce", "both", "mix", "npo")

    @property
    def has_kl(self) -> bool:
        return self.terms in ("kl", "both", "mix")

    def mix_rows(self) -> tuple[slice, slice, slice]:
        """The forget, random-answer and normal rows of the ``mix`` problem: thirds of the tokens."""
        third = self.num_tokens // 3
        return slice(0, third), slice(third, 2 * third), slice(2 * third, self.num_tokens)

    def npo_rows(self) -> tuple[slice, slice]:
        """The forget and normal rows of the ``npo`` problem: the first half and the rest."""
        half = self.num_tokens // 2
        return slice(0, half), slice(half, self.num_tokens)

    def kl_tokens(self) -> int:
        if self.terms == "mix":
            normal = self.mix_rows()[2]
            return normal.stop - normal.start
        return self.num_tokens if self.has_kl else 0

    def flops(self) -> int:
        """Forward+backward flops counted: 6·N·H·V for the trained head and 2·H·V per token for the reference logits.
        An ``npo`` first pass, where an implementation makes one, is overhead: not counted."""
        one_product = 2 * self.num_tokens * self.hidden_size * self.vocab_size
        return 3 * one_product + 2 * self.kl_tokens() * self.hidden_size * self.vocab_size

    def make_inputs(self) -> dict:
        """Deterministic inputs; every token carries the weights of the chosen terms."""
        dtype, device = DTYPES[self.dtype], torch.device(self.device)
        generator = torch.Generator(device).manual_seed(self.seed)
        n, h, v = self.num_tokens, self.hidden_size, self.vocab_size

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

        weight = randn(v, h, scale=h**-0.5 * 2)
        inputs = {
            "hidden": randn(n, h).requires_grad_(),
            "weight": weight.requires_grad_(),
            "targets": torch.randint(0, v, (n,), generator=generator, device=device),
            "ce_weight": torch.full((n,), 1.0 if self.has_ce else 0.0, device=device),
        }
        if self.has_kl:
            inputs["ref_hidden"] = randn(n, h)
            inputs["ref_weight"] = (weight.detach() + randn(v, h, scale=h**-0.5 * 0.2)).to(dtype)
            inputs["kl_weight"] = torch.ones(n, device=device)
        if self.terms == "mix":
            forget, _, normal = self.mix_rows()
            inputs["ce_weight"][forget] = -1.0  # gradient ascent
            inputs["ce_weight"][normal] = 0.0
            inputs["kl_weight"][: normal.start] = 0.0
        if self.terms == "npo":
            forget, _ = self.npo_rows()
            # Gradient ascent, as the trainer's linear weights of the forget tokens: the term replaces them.
            inputs["ce_weight"][forget] = -1.0
            # Balanced sequences: [M_f] the forget sequence of each forget token.
            lengths = torch.tensor([(forget.stop + i) // NPO_FORGET_SEQUENCES for i in range(NPO_FORGET_SEQUENCES)])
            inputs["forget_sequence"] = torch.arange(NPO_FORGET_SEQUENCES).repeat_interleave(lengths).to(device)
            ref_weight = (weight.detach() + randn(v, h, scale=h**-0.5 * NPO_REFERENCE_NOISE)).to(dtype)
            ref_ce = _token_ce(inputs["hidden"][forget], ref_weight, inputs["targets"][forget], torch.float32)
            # s_ref(y) = -Σ_t CE_t under the reference head, a constant of the run as the trainer's cache: [B_f].
            inputs["reference_sums"] = -torch.zeros(
                NPO_FORGET_SEQUENCES, dtype=torch.float64, device=device
            ).index_add_(0, inputs["forget_sequence"], ref_ce.double())
        return inputs

    def sequence_forget(self, inputs: dict):
        """The npo problem's forget term as the trainer's objective builds it (one micro-batch, each sequence's loss
        with weight 1: a sum, as every problem here)."""
        from dsunlearn.kernels.sequence_forget import SequenceForget

        lengths = torch.bincount(inputs["forget_sequence"], minlength=NPO_FORGET_SEQUENCES).double()
        return SequenceForget(
            loss="npo", beta=NPO_BETA, delta=0.0, num_tokens=self.npo_rows()[0].stop,
            token_sequence=inputs["forget_sequence"], sequence_weight=torch.ones_like(lengths),
            sequence_length=lengths, reference_sums=inputs["reference_sums"],
        )  # fmt: skip


@dataclass
class Row:
    implementation: str
    status: str = "ok"  # "ok", "skipped" or "error"
    note: str = ""
    size: list = field(default_factory=list)  # [N, H, V] this row ran at
    forward_ms: float | None = None
    backward_ms: float | None = None
    forward_backward_ms: float | None = None
    peak_extra_mib: float | None = None
    tflops: float | None = None
    percent_of_matmul: float | None = None
    speedup_vs_torch: float | None = None
    memory_vs_torch: float | None = None
    loss: float | None = None
    # Relative error of the loss against float64, checked before timing.
    loss_rel_error_vs_float64: float | None = None
    # Largest relative error of loss, grad of hidden, grad of weight against float64 (small problems only).
    max_rel_error_vs_float64: float | None = None
    # The first forward+backward, compilation and lazy initialisation included.
    first_call_ms: float | None = None


def eager_loss(hidden, weight, targets, ce_weight, ref_hidden=None, ref_weight=None, kl_weight=None, *, with_ce=True):
    """The baseline a user writes: materialised logits (at least fp32), F.cross_entropy and a forward KL."""
    logits_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(logits_dtype)  # [N, V]
    loss = logits.new_zeros(())
    if with_ce:
        loss = loss + (ce_weight * F.cross_entropy(logits, targets, reduction="none")).sum()
    if kl_weight is not None:
        with torch.no_grad():
            ref_log_probs = torch.log_softmax((ref_hidden @ ref_weight.T).to(logits_dtype), dim=-1)  # [N, V]
        token_kl = F.kl_div(torch.log_softmax(logits, dim=-1), ref_log_probs, log_target=True, reduction="none")
        loss = loss + (kl_weight * token_kl.sum(-1)).sum()
    return loss


def _token_ce(hidden, weight, targets, dtype: torch.dtype) -> torch.Tensor:
    """Each token's CE in ``dtype``, ``FLOAT64_BLOCK_ROWS`` rows at a time (no [N, V] tensor), without a gradient: [N]."""
    with torch.no_grad():
        head = weight.detach().to(dtype)
        blocks = []
        for start in range(0, hidden.shape[0], FLOAT64_BLOCK_ROWS):
            rows = slice(start, start + FLOAT64_BLOCK_ROWS)
            logits = hidden.detach()[rows].to(dtype) @ head.T  # [rows, V]
            blocks.append(F.cross_entropy(logits, targets[rows], reduction="none"))
        return torch.cat(blocks)


def npo_loss(token_ce: torch.Tensor, inputs: dict, problem: Problem) -> torch.Tensor:
    """Issue 18's NPO step, in float64 from each token's CE [N]: Σ_y −(2/β)·log σ(−β·(s_θ(y) − s_ref(y))) over the
    forget sequences, s_θ(y) = −Σ_t CE_t over its tokens, plus Σ ce_weight·CE over the normal tokens (retain nll)."""
    forget, normal = problem.npo_rows()
    token_ce = token_ce.double()
    reference_sums = inputs["reference_sums"].double()
    sums = -torch.zeros_like(reference_sums).index_add(0, inputs["forget_sequence"], token_ce[forget])
    forget_term = (-2.0 / NPO_BETA * F.logsigmoid(-NPO_BETA * (sums - reference_sums))).sum()
    return forget_term + (inputs["ce_weight"][normal].double() * token_ce[normal]).sum()


def make_loss_fn(name: str, problem: Problem):
    """The callable ``inputs -> scalar loss`` of an implementation, or ``Skipped`` with the reason."""
    if problem.terms == "npo":
        return _npo_loss_fn(name, problem)
    if name == "torch":
        return lambda inputs: eager_loss(**inputs, with_ce=problem.has_ce)
    if name == "torch.compile":
        compiled = torch.compile(eager_loss, dynamic=False)
        return lambda inputs: compiled(**inputs, with_ce=problem.has_ce)
    if name in ("chunked", "compiled", "triton"):
        from dsunlearn.kernels import fused_linear_ce_kl

        if name == "triton" and problem.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skipped("triton on the CPU needs TRITON_INTERPRET=1")
        return lambda inputs: fused_linear_ce_kl(**inputs, backend=name)
    if name.startswith("compiled@"):
        # The compiled backend with a given chunk height (rows per chunk), to tune its default.
        from dsunlearn.kernels.compiled import compiled_fused_linear_ce_kl

        chunk_rows = int(name.split("@", 1)[1])
        return lambda inputs: compiled_fused_linear_ce_kl(**inputs, chunk_rows=chunk_rows)
    if name.startswith("triton@"):
        # The triton backend with a given chunk height (rows per chunk), to tune its default.
        from dsunlearn.kernels.triton_ce_kl import triton_fused_linear_ce_kl

        if problem.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skipped("triton on the CPU needs TRITON_INTERPRET=1")
        chunk_rows = int(name.split("@", 1)[1])
        return lambda inputs: triton_fused_linear_ce_kl(**inputs, chunk_rows=chunk_rows)
    if name in ("liger", "liger.chunked", "liger.chunked.eager"):
        return _liger_loss_fn(problem, name)
    if name == "cce":
        return _cce_loss_fn(problem)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def _npo_loss_fn(name: str, problem: Problem):
    """The trainer's npo head (kernels/sequence_forget.py) on backend ``name``: one pass in chunks of whole forget
    sequences, or a first pass over the forget tokens without a gradient and then the fused one."""
    if name not in FUSED_BACKENDS:
        raise Skipped(f"npo runs on our backends only ({', '.join(FUSED_BACKENDS)}): the trainer's head code")
    if name == "triton" and problem.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skipped("triton on the CPU needs TRITON_INTERPRET=1")
    from dsunlearn.kernels.sequence_forget import fused_linear_sequence_forget

    def loss_fn(inputs):
        loss, _, _ = fused_linear_sequence_forget(
            inputs["hidden"], inputs["weight"], inputs["targets"], inputs["ce_weight"],
            sequence_forget=problem.sequence_forget(inputs), backend=name,
        )  # fmt: skip
        return loss

    return loss_fn


# Implementations that run on CUDA only, with how the skip note names them.
CUDA_ONLY = {"liger": "Liger-Kernel's Triton ops", "cce": "cut-cross-entropy"}


def _require_cuda(name: str, problem: Problem) -> None:
    if name in CUDA_ONLY and problem.device != "cuda":
        raise Skipped(f"{CUDA_ONLY[name]} runs on CUDA only")


def _liger_loss_fn(problem: Problem, name: str):
    _require_cuda(name, problem)
    if name == "liger":
        if problem.terms == "mix":
            raise Skipped("mix: see liger.chunked (three calls)")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
        except ImportError:
            raise Skipped("liger_kernel is not installed") from None
        return liger_two_pass_loss_fn(problem, LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        raise Skipped("liger_kernel.chunked_loss is not installed (pip install dsunlearn[bench])") from None
    compiled = name == "liger.chunked"
    if problem.terms == "mix":
        return liger_mix_loss_fn(problem, LigerFusedLinearJSDLoss, compiled)
    return liger_single_pass_loss_fn(problem, LigerFusedLinearJSDLoss, compiled)


def _with_fp32_accumulation(module_class) -> dict:
    """``accum_dtype=torch.float32`` where this Liger-Kernel's module takes it (newer releases), else nothing."""
    return {"accum_dtype": torch.float32} if "accum_dtype" in inspect.signature(module_class).parameters else {}


def liger_two_pass_loss_fn(problem: Problem, fused_ce_class, fused_jsd_class):
    """Liger's fused linear CE, then its fused linear JSD at β = 0: two passes over the head.

    At β = 0 Liger's generalised JSD is the forward KL(p_teacher ‖ p_student) (``ops/jsd.py``: "beta == 0.0:
    forward KL"), the teacher being the reference here: the same direction as this package's KL.
    """
    ce_options = dict(reduction="sum", **_with_fp32_accumulation(fused_ce_class))
    fused_ce = fused_ce_class(**ce_options)
    kl_options = dict(jsd_beta=0.0, **_with_fp32_accumulation(fused_jsd_class))
    try:
        fused_kl = fused_jsd_class(**kl_options)
    except (AssertionError, ValueError) as error:
        if problem.has_kl:
            raise Skipped(f"this Liger-Kernel has no forward KL (jsd_beta=0): {error}") from None
        fused_kl = None

    def loss_fn(inputs):
        # Its JSD averages over tokens ("batchmean"): scale back to a sum so the work and the value match the
        # other rows.
        loss = inputs["hidden"].new_zeros((), dtype=torch.float32)
        if problem.has_ce:
            loss = loss + fused_ce(inputs["weight"], inputs["hidden"], inputs["targets"])
        if problem.has_kl:
            kl = fused_kl(inputs["hidden"], inputs["weight"], inputs["ref_hidden"], inputs["ref_weight"], None)
            loss = loss + kl * problem.num_tokens
        return loss

    accumulation = "fp32" if "accum_dtype" in ce_options else "the input dtype (no accum_dtype in this release)"
    loss_fn.note = f"fused linear CE (accumulates in {accumulation}) + fused linear JSD at beta=0: two passes"
    return loss_fn


def liger_single_pass_loss_fn(problem: Problem, fused_jsd_loss_class, compiled: bool = True):
    """Liger's single-pass distillation loss ``LigerFusedLinearJSDLoss(weight_hard_loss=1, weight_soft_loss=1,
    beta=0, compiled=compiled)``: one pass over the head for CE and KL, the same work as ``fused_linear_ce_kl``.

    Per Liger's ``chunked_loss/fused_linear_distillation.py`` it returns (w_hard·Σ CE + w_soft·Σ KL) / (number of
    targets other than ignore_index); at β = 0 its soft loss is ``F.kl_div(log p_student, log p_teacher,
    log_target=True)`` summed over the vocabulary, the forward KL(p_teacher ‖ p_student) with the reference as
    the teacher. Every target here is valid, so N times its value is this benchmark's sum.
    """
    if not problem.has_kl:
        raise Skipped("single-pass distillation loss: needs the KL term (the liger row covers CE only)")
    fused_loss = fused_jsd_loss_class(
        weight_hard_loss=1.0 if problem.has_ce else 0.0, weight_soft_loss=1.0, beta=0.0, compiled=compiled
    )

    def loss_fn(inputs):
        loss = fused_loss(
            inputs["hidden"], inputs["weight"], inputs["ref_hidden"], inputs["ref_weight"], inputs["targets"]
        )
        return loss.float() * problem.num_tokens

    loss_fn.note = (
        f"LigerFusedLinearJSDLoss(weight_hard_loss=1, weight_soft_loss=1, beta=0, compiled={compiled}): one pass"
    )
    return loss_fn


def liger_mix_loss_fn(problem: Problem, fused_jsd_loss_class, compiled: bool = True):
    """Yao's mix with ``LigerFusedLinearJSDLoss``: three calls, since its one target mask and two scalar weights
    cannot give each token its own term. CE on the forget rows (weight −1) and on the random-answer rows:
    ``weight_hard_loss=1, weight_soft_loss=0``, with a one-column zero teacher (Liger always computes the teacher's
    logits; one column makes that product nearly free). KL on the normal rows: ``weight_hard_loss=0,
    weight_soft_loss=1`` (Liger then skips the CE). Each call returns its sum over the number of its rows, scaled
    back here to the sum this benchmark compares.
    """
    cross_entropy = fused_jsd_loss_class(weight_hard_loss=1.0, weight_soft_loss=0.0, beta=0.0, compiled=compiled)
    forward_kl = fused_jsd_loss_class(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=compiled)
    forget, random_answers, normal = problem.mix_rows()

    def loss_fn(inputs):
        hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
        no_teacher = hidden.new_zeros(problem.num_tokens, 1, requires_grad=False)  # [N, 1]
        no_teacher_weight = weight.new_zeros(problem.vocab_size, 1, requires_grad=False)  # [V, 1]
        loss = hidden.new_zeros((), dtype=torch.float32)
        for rows, sign in ((forget, -1.0), (random_answers, 1.0)):
            term = cross_entropy(hidden[rows], weight, no_teacher[rows], no_teacher_weight, targets[rows])
            loss = loss + sign * (rows.stop - rows.start) * term.float()
        kl = forward_kl(hidden[normal], weight, inputs["ref_hidden"][normal], inputs["ref_weight"], targets[normal])
        return loss + (normal.stop - normal.start) * kl.float()

    loss_fn.note = f"LigerFusedLinearJSDLoss(beta=0, compiled={compiled}): three calls (CE, CE, KL)"
    return loss_fn


def _cce_loss_fn(problem: Problem):
    _require_cuda("cce", problem)
    if problem.has_kl:
        raise Skipped("cut-cross-entropy has no KL term")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        raise Skipped("cut_cross_entropy is not installed") from None
    return lambda inputs: linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], reduction="sum")


class _Timer:
    """Elapsed milliseconds between marks: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def _clear_grads(inputs: dict) -> None:
    for tensor in inputs.values():
        tensor.grad = None


def time_forward_backward(loss_fn, inputs: dict, device: str, warmup: int, repeats: int):
    """Median forward, backward and forward+backward milliseconds; the last loss value."""
    timer = _Timer(device)
    forward, backward, total = [], [], []
    for step in range(warmup + repeats):
        _clear_grads(inputs)
        start = timer.mark()
        loss = loss_fn(inputs)
        middle = timer.mark()
        loss.backward()
        end = timer.mark()
        if step >= warmup:
            forward.append(timer.elapsed_ms(start, middle))
            backward.append(timer.elapsed_ms(middle, end))
            total.append(timer.elapsed_ms(start, end))
    return statistics.median(forward), statistics.median(backward), statistics.median(total), loss.item()


def cuda_peak_extra_mib(loss_fn, inputs: dict) -> float:
    """Peak allocated CUDA memory of one forward+backward over what was allocated before it (grads included)."""
    _clear_grads(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss_fn(inputs).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_extra_mib(loss_fn, inputs: dict) -> float:
    """Peak resident memory of one forward+backward over the resident memory before it (grads included).

    Run after a warm-up call, in a process started with ``MALLOC_MMAP_THRESHOLD_`` low so freed tensors go
    back to the system; /proc/self/clear_refs resets the kernel's peak (VmHWM) to the current resident size.
    """
    _clear_grads(inputs)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = _proc_status_kib("VmRSS")
    loss_fn(inputs).backward()
    # The kernel moves its stored peak only at some events, so after a call that ends holding less than before, VmHWM
    # (the larger of that stored peak and the current size) can read a few KiB under the baseline: no rise.
    return max(0.0, (_proc_status_kib("VmHWM") - baseline) / 1024)


def float64_errors(problem: Problem, inputs: dict, loss: torch.Tensor) -> float:
    """Largest relative error of the loss and both gradients against the materialised float64 formula."""
    hidden64 = inputs["hidden"].detach().double().requires_grad_()
    weight64 = inputs["weight"].detach().double().requires_grad_()
    reference_inputs = {k: v.detach().double() if v.is_floating_point() else v for k, v in inputs.items()}
    if problem.terms == "npo":
        logits = hidden64 @ weight64.T  # [N, V]
        token_ce = torch.logsumexp(logits, -1) - logits.gather(1, inputs["targets"][:, None])[:, 0]
        expected = npo_loss(token_ce, reference_inputs, problem)
    else:
        with_ce = bool(inputs["ce_weight"].any())
        expected = eager_loss(**dict(reference_inputs, hidden=hidden64, weight=weight64), with_ce=with_ce)
    expected.backward()
    errors = [abs(loss.item() - expected.item()) / max(abs(expected.item()), 1e-30)]
    for actual, reference in ((inputs["hidden"].grad, hidden64.grad), (inputs["weight"].grad, weight64.grad)):
        scale = reference.abs().max().clamp_min(1e-30)
        errors.append(((actual.double() - reference).abs().max() / scale).item())
    return max(errors)


def float64_loss(inputs: dict, problem: Problem | None = None) -> float:
    """The loss of ``eager_loss`` in float64, ``FLOAT64_BLOCK_ROWS`` rows at a time (no [N, V] float64 tensor); for
    the ``npo`` problem, ``npo_loss``."""
    if problem is not None and problem.terms == "npo":
        token_ce = _token_ce(inputs["hidden"], inputs["weight"], inputs["targets"], torch.float64)
        return npo_loss(token_ce, inputs, problem).item()
    heads = {name: inputs[name].detach().double() for name in ("weight", "ref_weight") if name in inputs}
    with_ce = bool(inputs["ce_weight"].any())
    total = 0.0
    with torch.no_grad():
        for start in range(0, inputs["hidden"].shape[0], FLOAT64_BLOCK_ROWS):
            rows = slice(start, start + FLOAT64_BLOCK_ROWS)
            block = {
                name: tensor.detach()[rows].double() if tensor.is_floating_point() else tensor[rows]
                for name, tensor in inputs.items()
                if name not in heads
            }
            total += eager_loss(**block, **heads, with_ce=with_ce).item()
    return total


def run_implementation(
    name: str, problem: Problem, warmup: int, repeats: int, expected_loss: float | None = None
) -> Row:
    """Times and measures one implementation in this process; with ``expected_loss`` (float64) its loss is checked
    first, and an implementation that misses ``LOSS_TOLERANCE`` is reported as an error, untimed."""
    row = Row(name, size=[problem.num_tokens, problem.hidden_size, problem.vocab_size])
    try:
        loss_fn = make_loss_fn(name, problem)
        row.note = getattr(loss_fn, "note", "")
        inputs = problem.make_inputs()
        # Warm-up outside the measurements: compilation, autotuning, lazy initialisation.
        _clear_grads(inputs)
        timer = _Timer(problem.device)
        start = timer.mark()
        loss = loss_fn(inputs)
        loss.backward()
        row.first_call_ms = timer.elapsed_ms(start, timer.mark())
        if expected_loss is not None:
            row.loss_rel_error_vs_float64 = abs(loss.item() - expected_loss) / max(abs(expected_loss), 1e-30)
            if not row.loss_rel_error_vs_float64 <= LOSS_TOLERANCE[problem.dtype]:
                row.status = "error"
                row.note = f"loss {loss.item():.6g} differs from float64 {expected_loss:.6g}: not timed"
                return row
        if problem.num_tokens * problem.vocab_size <= REFERENCE_CHECK_MAX_LOGITS:
            row.max_rel_error_vs_float64 = float64_errors(problem, inputs, loss)
        if problem.device == "cuda":
            row.peak_extra_mib = cuda_peak_extra_mib(loss_fn, inputs)
        else:
            row.peak_extra_mib = cpu_peak_extra_mib(loss_fn, inputs)
        row.forward_ms, row.backward_ms, row.forward_backward_ms, row.loss = time_forward_backward(
            loss_fn, inputs, problem.device, max(warmup - 1, 0), repeats
        )
        row.tflops = problem.flops() / (row.forward_backward_ms * 1e-3) / 1e12
    except Skipped as reason:
        row.status, row.note = "skipped", str(reason)
    except Exception as error:  # a failing implementation is reported, the others still run
        row.status, row.note = "error", f"{type(error).__name__}: {error}"[:300]
    return row


def matmul_tflops(problem: Problem, repeats: int) -> float:
    """The rate of torch.mm at the logits' shape and dtype: [N, H] @ [H, V]."""
    dtype, device = DTYPES[problem.dtype], problem.device
    generator = torch.Generator(device).manual_seed(problem.seed)
    hidden = torch.randn(problem.num_tokens, problem.hidden_size, generator=generator, device=device).to(dtype)
    weight = torch.randn(problem.vocab_size, problem.hidden_size, generator=generator, device=device).to(dtype)
    timer = _Timer(device)
    times = []
    for step in range(repeats + 1):
        start = timer.mark()
        torch.mm(hidden, weight.T)
        end = timer.mark()
        if step > 0:
            times.append(timer.elapsed_ms(start, end))
    return 2 * problem.num_tokens * problem.hidden_size * problem.vocab_size / (statistics.median(times) * 1e-3) / 1e12


def run_in_subprocess(name: str, problem: Problem, warmup: int, repeats: int, expected_loss: float | None) -> Row:
    """One implementation in a fresh Python process (CPU memory is measured per process), with an empty Inductor
    cache, so that the first call's time includes the whole compilation for every implementation that compiles."""
    try:
        _require_cuda(name, problem)
    except Skipped as reason:
        return Row(name, status="skipped", note=str(reason))
    inductor_cache = tempfile.TemporaryDirectory(prefix="bench_inductor_")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHINDUCTOR_CACHE_DIR=inductor_cache.name)
    if name.startswith("triton"):
        env["TRITON_INTERPRET"] = "1"
    command = [
        sys.executable, "-m", "dsunlearn.kernels.bench", "--child", name,
        "--n", str(problem.num_tokens), "--h", str(problem.hidden_size), "--v", str(problem.vocab_size),
        "--dtype", problem.dtype, "--device", problem.device, "--terms", problem.terms, "--seed", str(problem.seed),
        "--warmup", str(warmup), "--repeats", str(repeats),
    ]  # fmt: skip
    if expected_loss is not None:
        command += ["--expected-loss", repr(expected_loss)]
    with inductor_cache:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return Row(name, status="error", note=f"subprocess exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({platform.node()})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.node()})"


def format_table(rows: list[Row]) -> str:
    columns = [
        ("implementation", "implementation", "{}"),
        ("size", "N,H,V", "{}"),
        ("first_call_ms", "1st call ms", "{:.0f}"),
        ("forward_ms", "fwd ms", "{:.2f}"),
        ("backward_ms", "bwd ms", "{:.2f}"),
        ("forward_backward_ms", "fwd+bwd ms", "{:.2f}"),
        ("peak_extra_mib", "peak MiB", "{:.0f}"),
        ("tflops", "TFLOP/s", "{:.3g}"),
        ("percent_of_matmul", "% mm", "{:.0f}"),
        ("speedup_vs_torch", "x torch", "{:.2f}"),
        ("memory_vs_torch", "mem/torch", "{:.3f}"),
        ("loss_rel_error_vs_float64", "loss err", "{:.1e}"),
        ("max_rel_error_vs_float64", "err f64", "{:.1e}"),
    ]
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        values = asdict(row)
        if row.status != "ok":
            cells.append([row.implementation, f"{row.status}: {row.note}"])
            continue
        values["size"] = ",".join(map(str, row.size))
        cells.append(["-" if values[key] is None else fmt.format(values[key]) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells if len(line) == len(columns)) for i in range(len(columns))]
    lines = []
    for line in cells:
        if len(line) == len(columns):
            lines.append("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        else:
            lines.append(f"{line[0].rjust(widths[0])}  {line[1]}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dsunlearn.kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, help="tokens (default: 16384 on CUDA, 2048 on the CPU)")
    parser.add_argument("--h", type=int, help="hidden size (default: 4096 on CUDA, 256 on the CPU)")
    parser.add_argument("--v", type=int, help="vocabulary size (default: 128256 on CUDA, 16384 on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--terms", choices=TERMS, default="both", help="mix: Yao's forget/random/normal thirds; npo: an NPO step"
    )
    parser.add_argument(
        "--compare-terms",
        help=f"comma-separated problems each implementation also runs at the same size, with ratios to them "
        f"(default: {','.join(NPO_COMPARE_TERMS)} for --terms npo, none otherwise)",
    )
    parser.add_argument(
        "--impls",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated, from: {', '.join(IMPLEMENTATIONS)}; triton@ROWS, compiled@ROWS: ROWS rows per chunk",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats (default: 5 on CUDA, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--interpreter-size", default="64,32,1013", help="N,H,V of triton rows on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench_fused_linear_ce_kl.json", help="where to write the results")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one implementation, print its row
    parser.add_argument("--expected-loss", type=float, help=argparse.SUPPRESS)  # internal: the float64 loss
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    default_size = GPU_DEFAULT_SIZE if args.device == "cuda" else CPU_DEFAULT_SIZE
    args.n, args.h, args.v = (given or default for given, default in zip((args.n, args.h, args.v), default_size))
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.repeats = args.repeats or (5 if args.device == "cuda" else 3)
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    if args.compare_terms is None:
        args.compare_terms = list(NPO_COMPARE_TERMS) if args.terms == "npo" else []
    else:
        args.compare_terms = [terms.strip() for terms in args.compare_terms.split(",") if terms.strip()]
    if set(args.compare_terms) - set(TERMS) or args.terms in args.compare_terms:
        parser.error(f"--compare-terms takes problems from {', '.join(TERMS)} other than --terms {args.terms}")
    unknown = [
        name for name in args.impls if name not in IMPLEMENTATIONS and not re.fullmatch(r"(triton|compiled)@\d+", name)
    ]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLEMENTATIONS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    problem = Problem(args.n, args.h, args.v, args.dtype, args.device, args.terms, args.seed)
    if args.child:
        row = run_implementation(args.child, problem, args.warmup, args.repeats, args.expected_loss)
        print(json.dumps(asdict(row)))
        return {}

    interpreter_problem = Problem(*map(int, args.interpreter_size.split(",")), args.dtype, "cpu", args.terms, args.seed)
    matmul_rate = matmul_tflops(problem, args.repeats)
    print(
        f"{machine_description(args.device)}; N={problem.num_tokens} H={problem.hidden_size} V={problem.vocab_size} "
        f"{problem.dtype} terms={problem.terms}; torch.mm at [N,H]@[H,V]: {matmul_rate:.3g} TFLOP/s",
        flush=True,
    )
    expected_loss = float64_loss(problem.make_inputs(), problem)
    compared = {terms: dataclasses.replace(problem, terms=terms) for terms in args.compare_terms}
    compared_expected_loss = {terms: float64_loss(other.make_inputs(), other) for terms, other in compared.items()}
    report = {
        "command": "python -m dsunlearn.kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(args.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": _triton_version()},
        "problem": asdict(problem),
        "flops_counted": problem.flops(),
        "matmul_tflops": matmul_rate,
        "float64_loss": expected_loss,
        "results": [],
    }
    if compared:
        # Each implementation's rows of the other problems, and the ratios of this problem's peak and time to them.
        report["comparisons"] = {terms: [] for terms in compared}
        report["ratios"] = {}
    rows = []
    for name in args.impls:
        if args.device == "cuda":
            rows.append(run_implementation(name, problem, args.warmup, args.repeats, expected_loss))
            torch.cuda.empty_cache()
        else:
            if name.startswith("triton"):  # checked against float64 in full at its own small size
                row = run_in_subprocess(name, interpreter_problem, args.warmup, args.repeats, None)
            else:
                row = run_in_subprocess(name, problem, args.warmup, args.repeats, expected_loss)
            if name.startswith("triton") and row.status == "ok":
                row.note = "Triton interpreter on the CPU: correctness only, times are not meaningful"
            rows.append(row)
        print(f"{name}: {rows[-1].status} {rows[-1].note}", file=sys.stderr, flush=True)
        # The other problems only where this one's row measured something: not the Triton interpreter on the CPU.
        at_problem_size = rows[-1].size == [problem.num_tokens, problem.hidden_size, problem.vocab_size]
        if compared and rows[-1].status == "ok" and at_problem_size:
            for terms, other in compared.items():
                expected = compared_expected_loss[terms]
                if args.device == "cuda":
                    other_row = run_implementation(name, other, args.warmup, args.repeats, expected)
                    torch.cuda.empty_cache()
                else:
                    other_row = run_in_subprocess(name, other, args.warmup, args.repeats, expected)
                print(f"{name} ({terms}): {other_row.status} {other_row.note}", file=sys.stderr, flush=True)
                report["comparisons"][terms].append(asdict(other_row))
            report["ratios"][name] = comparison_ratios(rows[-1], report["comparisons"])
        _add_ratios(rows, problem, matmul_rate)
        # Written after every implementation, so a run cut short by a time limit still leaves its results.
        report["results"] = [asdict(row) for row in rows]
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)

    print(format_table(rows))
    if compared:
        print(format_comparisons(problem.terms, report["ratios"]))
    print(f"wrote {args.json}")
    return report


def comparison_ratios(row: Row, comparisons: dict) -> dict:
    """This problem's peak memory and fwd+bwd time over those of the same implementation on each other problem
    (``comparisons``: terms -> the JSON rows so far), with the values; None where the other row did not run."""
    ratios = {"peak_extra_mib": row.peak_extra_mib, "forward_backward_ms": row.forward_backward_ms, "against": {}}
    for terms, other_rows in comparisons.items():
        other = next((other for other in other_rows if other["implementation"] == row.implementation), None)
        if other is None or other["status"] != "ok":
            ratios["against"][terms] = None
            continue
        ratios["against"][terms] = {
            "peak_extra_mib": other["peak_extra_mib"],
            "forward_backward_ms": other["forward_backward_ms"],
            "peak_ratio": row.peak_extra_mib / other["peak_extra_mib"] if other["peak_extra_mib"] else None,
            "time_ratio": row.forward_backward_ms / other["forward_backward_ms"],
        }
    return ratios


def format_comparisons(terms: str, ratios: dict) -> str:
    """One line per implementation: this problem's peak MiB and fwd+bwd ms, each other problem's, and the ratios."""
    lines = [f"{terms} against other problems, same implementation, N, H, V and inputs (peak MiB, fwd+bwd ms):"]
    for name, measured in ratios.items():
        parts = [f"{terms} {measured['peak_extra_mib']:.0f} MiB, {measured['forward_backward_ms']:.0f} ms"]
        for other_terms, other in measured["against"].items():
            if other is None:
                parts.append(f"{other_terms} did not run")
                continue
            peak_ratio = "-" if other["peak_ratio"] is None else f"{other['peak_ratio']:.2f}x"
            parts.append(
                f"{other_terms} {other['peak_extra_mib']:.0f} MiB, {other['forward_backward_ms']:.0f} ms "
                f"({terms}/{other_terms}: peak {peak_ratio}, time {other['time_ratio']:.2f}x)"
            )
        lines.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(lines)


def _add_ratios(rows: list[Row], problem: Problem, matmul_rate: float) -> None:
    """Share of the torch.mm rate, and speed and memory relative to the torch row, for rows at the problem's size."""
    torch_row = next((row for row in rows if row.implementation == "torch" and row.status == "ok"), None)
    for row in rows:
        if row.status != "ok" or row.size != [problem.num_tokens, problem.hidden_size, problem.vocab_size]:
            continue
        row.percent_of_matmul = 100 * row.tflops / matmul_rate
        if torch_row is not None:
            row.speedup_vs_torch = torch_row.forward_backward_ms / row.forward_backward_ms
            if torch_row.peak_extra_mib:
                row.memory_vs_torch = row.peak_extra_mib / torch_row.peak_extra_mib


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
