"""The unlearning objective as per-token weights of one fused loss (DESIGN.md §1, §4).

The policy reads the step's [forget; random; normal] sequences in one of three layouts, and the loss runs once over
their response tokens, in that order:
    packed  the micro-batch's sequences packed into rows of one to two times its longest sequence (first fit,
            longest first), ``position_ids`` restarting at 0 at each sequence and no attention mask (transformers
            then keeps attention within each sequence), one forward; only the rows' tails are padding. Rows, not one
            row: an attention that applies a block-causal mask computes every query x key pair of its row, so one
            row of T tokens would cost T^2 where rows cost about T x the longest sequence;
    varlen  every sequence in ONE row [1, T], no padding at all, for FlashAttention's variable-length kernels, which
            skip the pairs across sequences (transformers takes that path only for a single row);
    padded  one forward per term (forget, random, normal), each padded to its own longest sequence, as in the authors'
            loop: for models where packing is not exact. The number of forwards is the number of terms in use, fixed
            by the settings, so every rank runs the same modules the same number of times (ZeRO-3).
The reference reads the normal sequences in its own model's layout.

The objective has three slots (settings ObjectiveConfig; presets in configs/presets/):
    forget  objective.forget_loss   ga      -CE                                                   (Yao et al.)
                                    npo     -(2/b) log sigmoid(-b (s_theta(y) - s_ref(y))), b = npo_beta
                                    simnpo  -(2/b) log sigmoid(b (-s_theta(y)/n(y) - delta)), b = simnpo_beta
    random  Yao et al.'s CE on random answers to forget prompts (random_weight 0: off)
    normal  objective.retain_loss   kl      forward KL(reference || model) per token                (Yao et al.)
                                    nll     CE                                                  (GradDiff, NPO)
with s(y) the summed log-likelihood of a forget answer's tokens (s = -sum_t CE_t) and n(y) their count: open-
unlearning's formulas (src/trainer/utils.py compute_dpo_loss, src/trainer/unlearn/simnpo.py): sums, 2/b scaling.
presets  yao (ga + random + kl), ga (ga alone), graddiff (ga + nll), npo (npo + nll), simnpo (simnpo + nll; forget
weight 0.125 against 1, open-unlearning's configs/trainer/SimNPO.yaml).

Each response token gets
    forget  ce_weight = -e1 / (n_s * B_f)          (gradient ascent)
    random  ce_weight = +e2 / (n_s * B_f * K)
    normal  kl_weight = +e3 / (n_s * B_n)          (retain kl: forward KL to the reference)
            ce_weight = +e3 / (n_s * B_n)          (retain nll: no reference)
with n_s the response tokens of its sequence and B the sequences of its term in this micro-batch ("sequence_mean":
mean over a sequence's response tokens, then over sequences, as in the authors' code). DeepSpeed averages gradients
over ranks and micro-steps, and every micro-batch holds the same number of sequences, so that mean of means is the
mean over the whole accumulated step.
"token_mean" instead gives each response token e / T, T the term's response tokens of the whole accumulated step
(summed over ranks and micro-steps), times the number of micro-batches DeepSpeed averages over (ranks x micro-steps),
to undo that average. Prompt and padding positions get no weight at all.

npo and simnpo are not linear in the token CEs: a forget sequence's loss L(s) is a function of its sum s, so the
fused loss cannot carry it with weights fixed before the forward. Its gradient is still a weighted sum of the tokens'
CE gradients, dL/dtheta = sum_t (-dL/ds) grad CE_t, with one scalar per sequence evaluated at the current weights.
So the head first computes every forget token's CE without a gradient (one extra head forward over the forget tokens
only; never tokens x vocabulary), hence s_theta per sequence, then gives each forget token the weight
    ce_weight = -c_s * dL/ds(s_theta)    npo: dL/ds = 2 sigmoid(b (s - s_ref)),  simnpo: (2/n) sigmoid(b (s/n + delta))
(c_s = e1 / B_f for "sequence_mean"; e1 * n_s * D / T for "token_mean", D and T as above: each sequence weighs by its
tokens) and runs the one fused forward and backward with it: the gradient is exact. The value reported is the exact
loss, sum_s c_s L(s), put in place of the fused loss's linear forget part with no gradient of its own
(``SequenceForget.exact_loss``; the term and its head live in kernels/sequence_forget.py, shared by the trainer's
head and the kernel benchmark). s_ref(y) is a constant of the run: computed once for every forget training sequence
in the reference cache pass (runtime/reference_cache.forget_reference_sums), after which no reference model is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dsunlearn.kernels.sequence_forget import SequenceForget
from dsunlearn.settings.config import ObjectiveConfig

FORGET, RANDOM, NORMAL = 0, 1, 2
TERM_NAMES = ("forget", "random", "normal")
PACKED, VARLEN, PADDED = "packed", "varlen", "padded"  # the layouts of a step's sequences (module docstring)


@dataclass
class Segment:
    """The input of one forward of a model: sequences packed into rows, or padded one per row."""

    input_ids: torch.Tensor  # [R, L]
    attention_mask: Optional[torch.Tensor]  # [R, L] when padded; None when packed (position_ids delimit sequences)
    position_ids: Optional[torch.Tensor]  # [R, L] restarting at 0 at each sequence when packed; None when padded
    token_index: torch.Tensor  # [M_s] flat positions in the [R*L] grid whose hidden state predicts a response token

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device) -> "Segment":
        return Segment(**{k: v if v is None else v.to(device) for k, v in vars(self).items()})


@dataclass
class StepBatch:
    """Tensors of one micro-step: M response tokens of B sequences, the normal sequences' tokens last."""

    segments: list[Segment]  # the policy's forwards; their selected positions, concatenated, are the M tokens in order
    targets: torch.Tensor  # [M] the response token predicted at each position
    ce_weight: torch.Tensor  # [M] fp32
    kl_weight: Optional[torch.Tensor]  # [M] fp32, None when there is no normal data
    token_sequence: torch.Tensor  # [M] which sequence each token belongs to
    sequence_term: torch.Tensor  # [B] FORGET, RANDOM or NORMAL
    sequence_length: torch.Tensor  # [B] response tokens per sequence (n_s)
    ref_segment: Optional[Segment]  # the normal sequences, for the reference; it selects the last M_n tokens
    num_tokens: int  # real tokens the policy processes
    num_positions: int  # positions the policy processes: real tokens and padding
    normal_indices: tuple[int, ...] = ()  # [B_n] each normal sequence's index in the normal set (the reference cache)
    sequence_forget: Optional["SequenceForget"] = None  # the npo/simnpo forget term; None for ga (linear weights)

    def to(self, device: torch.device) -> "StepBatch":
        moved = {k: v.to(device) if isinstance(v, (torch.Tensor, Segment)) else v for k, v in vars(self).items()}
        moved["segments"] = [segment.to(device) for segment in self.segments]
        if self.sequence_forget is not None:
            moved["sequence_forget"] = self.sequence_forget.to(device)
        return StepBatch(**moved)


def response_positions(response_mask: torch.Tensor, input_ids: torch.Tensor):
    """Flat positions in [B*L] whose next token is a response token, that token, and its sequence.

    response_mask, input_ids: [B, L]. The hidden state at position t predicts token t+1, so a response token at t+1
    is scored at t (the first response token is predicted by the last prompt token).
    """
    batch, length = input_ids.shape
    predicts_response = torch.zeros_like(response_mask, dtype=torch.bool)
    predicts_response[:, :-1] = response_mask[:, 1:].bool()
    sequence, position = predicts_response.nonzero(as_tuple=True)  # row-major: sequences in order
    return sequence * length + position, input_ids[sequence, position + 1], sequence


def pack_sequences(
    sequences: Sequence, pad_id: int, one_row: bool = False, row_capacity: Optional[int] = None
) -> tuple[Segment, torch.Tensor, torch.Tensor]:
    """``sequences`` (objects with ``input_ids`` and ``response_mask`` lists) packed into rows: the segment, and for
    each response token, in the order of ``sequences``, the token and its sequence, [M] each.

    ``one_row``: all in one row [1, T] with no padding. ``row_capacity``: rows of at most that many tokens (at least
    the longest sequence), filled first fit, longest first. Otherwise rows of one to two times the longest sequence
    (the capacity that leaves the least padding), filled first fit, longest first, and right-padded to the fullest row
    (attention costs a row's length squared, so rows stay short); a row's padded tail is a sequence of its own (positions
    restarting at 0), so it attends to nothing real and nothing real attends to it. The hidden state at t predicts
    token t+1 only within a sequence: the first token of the next sequence is not predicted by the last of this one.
    """
    lengths = [len(sequence.input_ids) for sequence in sequences]
    if one_row:
        rows = [list(range(len(sequences)))]
    elif row_capacity is not None:  # rows of at most this many tokens (the packing probe's several rows)
        if row_capacity < max(lengths):
            raise ValueError(f"row_capacity {row_capacity} is shorter than the longest sequence ({max(lengths)})")
        rows = _fill_rows(lengths, row_capacity)
    else:
        # Rows of 1 to 2 longest sequences: the capacity that leaves the fewest positions (the shortest on a tie).
        candidates = [_fill_rows(lengths, max(lengths) * quarters // 4) for quarters in range(4, 9)]
        rows = min(candidates, key=lambda rows: len(rows) * _row_length(rows, lengths))
    row_length = _row_length(rows, lengths)
    input_ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)  # [R, L]
    position_ids = torch.empty((len(rows), row_length), dtype=torch.long)  # [R, L]
    token_index, targets, token_sequence = [None] * len(sequences), [None] * len(sequences), [None] * len(sequences)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            sequence, length = sequences[index], lengths[index]
            ids = torch.tensor(sequence.input_ids)
            input_ids[r, start:start + length] = ids
            position_ids[r, start:start + length] = torch.arange(length)
            # position t of the sequence predicts its token t+1: a response token at t+1 is scored at t
            scored = torch.tensor(sequence.response_mask[1:], dtype=torch.bool).nonzero()[:, 0]  # [M_s]
            token_index[index] = r * row_length + start + scored
            targets[index] = ids[scored + 1]
            token_sequence[index] = torch.full_like(scored, index)
            start += length
        position_ids[r, start:] = torch.arange(row_length - start)
    segment = Segment(input_ids, None, position_ids, torch.cat(token_index))
    return segment, torch.cat(targets), torch.cat(token_sequence)


def _fill_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices in rows of at most ``capacity`` tokens: first fit, longest first."""
    rows, fills = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        row = next((r for r, fill in enumerate(fills) if fill + lengths[index] <= capacity), len(rows))
        if row == len(rows):
            rows.append([])
            fills.append(0)
        rows[row].append(index)
        fills[row] += lengths[index]
    return rows


def _row_length(rows: list[list[int]], lengths: list[int]) -> int:
    return max(sum(lengths[i] for i in row) for row in rows)


def pad_sequences(sequences: Sequence, pad_id: int) -> tuple[Segment, torch.Tensor, torch.Tensor]:
    """``sequences`` right-padded to their longest, one per row: the segment, and for each response token the token
    and its sequence, [M] each."""
    from dsunlearn.data.tokenization import pad_batch

    padded = pad_batch(list(sequences), pad_id)
    input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
    token_index, targets, token_sequence = response_positions(padded["response_mask"] * attention_mask, input_ids)
    return Segment(input_ids, attention_mask, None, token_index), targets, token_sequence


def lay_out(groups: Sequence[Sequence], layout: str, pad_id: int) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
    """The segments of the sequences of ``groups`` (in order) in ``layout``: ONE packed segment, or one padded segment
    per non-empty group. With the response tokens of all segments in order, and the index of each token's sequence
    among all of them, [M] each."""
    if layout in (PACKED, VARLEN):
        sequences = [sequence for group in groups for sequence in group]
        segment, targets, token_sequence = pack_sequences(sequences, pad_id, one_row=layout == VARLEN)
        return [segment], targets, token_sequence
    if layout != PADDED:
        raise ValueError(f"unknown layout {layout!r}")
    segments, targets, token_sequence, first = [], [], [], 0
    for group in groups:
        if not group:
            continue
        segment, group_targets, group_sequence = pad_sequences(group, pad_id)
        segments.append(segment)
        targets.append(group_targets)
        token_sequence.append(group_sequence + first)
        first += len(group)
    return segments, torch.cat(targets), torch.cat(token_sequence)


def build_step_batch(
    forget: Sequence,
    random: Sequence,
    normal: Sequence,
    pad_id: int,
    objective: ObjectiveConfig,
    step_term_tokens: Optional[torch.Tensor] = None,
    micro_batches_per_step: int = 1,
    layout: str = PACKED,
    ref_layout: str = PACKED,
    forget_reference_sums: Optional[torch.Tensor] = None,
) -> StepBatch:
    """The [forget; random; normal] tokenised sequences (objects with ``input_ids`` and ``response_mask`` lists) in the
    policy's ``layout`` (and the normal ones in the reference's ``ref_layout``), with the objective's per-token weights.

    ``token_mean`` only: ``step_term_tokens`` [3] holds each term's response tokens in the whole optimizer step
    (every rank's and micro-step's, see :func:`term_token_counts`), and ``micro_batches_per_step`` the number of
    micro-batches DeepSpeed averages the gradient over (world size x gradient accumulation steps).
    ``forget_reference_sums`` [B_f]: s_ref(y) of each forget sequence, for ``forget_loss: npo``.
    """
    sequences = list(forget) + list(random) + list(normal)
    terms = [FORGET] * len(forget) + [RANDOM] * len(random) + [NORMAL] * len(normal)
    segments, targets, token_sequence = lay_out([forget, random, normal], layout, pad_id)

    sequence_term = torch.tensor(terms, dtype=torch.long)
    sequence_length = torch.bincount(token_sequence, minlength=len(sequences))
    if (sequence_length == 0).any():
        empty = int((sequence_length == 0).nonzero()[0])
        raise ValueError(f"sequence {empty} of the step has no response token (was it truncated away?)")
    token_term = sequence_term[token_sequence]
    epsilon = torch.tensor([-objective.forget_weight, objective.random_weight, objective.normal_weight])
    if objective.reduction == "sequence_mean":
        sequences_of_term = torch.bincount(sequence_term, minlength=3).clamp(min=1)
        weight = epsilon[token_term] / (sequence_length[token_sequence] * sequences_of_term[token_term])
    else:
        if step_term_tokens is None:
            raise ValueError("token_mean needs each term's response-token count of the whole step")
        step_tokens = step_term_tokens.clamp(min=1).to(torch.float32)[token_term]
        weight = epsilon[token_term] * micro_batches_per_step / step_tokens
    sequence_forget = None
    if forget and objective.forget_loss != "ga":
        sequence_forget = _sequence_forget(objective, token_sequence, sequence_length[:len(forget)],
                                           forget_reference_sums, step_term_tokens, micro_batches_per_step)
    weight = weight.to(torch.float32)
    is_normal = token_term == NORMAL
    kl_weight = ref_segment = None
    if objective.retain_loss == "kl":
        ce_weight = torch.where(is_normal, torch.zeros_like(weight), weight)
        if normal:
            kl_weight = torch.where(is_normal, weight, torch.zeros_like(weight))
            # The reference sees only the normal sequences: one segment in either layout.
            (ref_segment,), _, _ = lay_out([normal], ref_layout, pad_id)
    else:  # nll: the normal tokens' CE, with the same weights; no reference
        ce_weight = weight
    return StepBatch(
        segments=segments,
        targets=targets,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        token_sequence=token_sequence,
        sequence_term=sequence_term,
        sequence_length=sequence_length,
        ref_segment=ref_segment,
        num_tokens=sum(len(sequence) for sequence in sequences),
        num_positions=sum(segment.input_ids.numel() for segment in segments),
        sequence_forget=sequence_forget,
    )


def _sequence_forget(objective: ObjectiveConfig, token_sequence: torch.Tensor, forget_length: torch.Tensor,
                     reference_sums: Optional[torch.Tensor], step_term_tokens: Optional[torch.Tensor],
                     micro_batches_per_step: int) -> SequenceForget:
    """The npo/simnpo term of a batch whose first B_f sequences (``forget_length`` [B_f]: their response tokens) are
    its forget sequences. c_s, the weight of a sequence's loss, in float64: e1 / B_f ("sequence_mean"), or e1 n_s D / T
    ("token_mean": T the step's forget tokens, D its micro-batches), the sum of the linear weights of its tokens."""
    num_forget = forget_length.shape[0]
    if objective.forget_loss == "npo":
        if reference_sums is None or reference_sums.shape != (num_forget,):
            raise ValueError(f"forget_loss npo needs s_ref of each of the {num_forget} forget sequences")
        reference_sums = reference_sums.to(torch.float64)
        beta, delta = objective.npo_beta, 0.0
    else:
        reference_sums = None
        beta, delta = objective.simnpo_beta, objective.simnpo_delta
    length = forget_length.to(torch.float64)
    if objective.reduction == "sequence_mean":
        sequence_weight = torch.full((num_forget,), objective.forget_weight / num_forget, dtype=torch.float64)
    else:
        step_tokens = max(int(step_term_tokens[FORGET]), 1)
        sequence_weight = objective.forget_weight * micro_batches_per_step * length / step_tokens
    num_tokens = int(forget_length.sum())  # the forget tokens come first
    return SequenceForget(
        loss=objective.forget_loss, beta=beta, delta=delta, num_tokens=num_tokens,
        token_sequence=token_sequence[:num_tokens], sequence_weight=sequence_weight, sequence_length=length,
        reference_sums=reference_sums,
    )


def reference_reads(objective: ObjectiveConfig) -> tuple[bool, bool]:
    """Which terms read the reference model: (the retain term's KL, on normal data every step or from the reference
    cache; npo's s_ref, once before the loop). Neither: no reference engine is built (ga, graddiff, simnpo)."""
    kl = objective.normal_weight > 0 and objective.retain_loss == "kl"
    npo = objective.forget_weight > 0 and objective.forget_loss == "npo"
    return kl, npo


def term_token_counts(forget: Sequence, random: Sequence, normal: Sequence) -> torch.Tensor:
    """Response tokens per term of one micro-batch, [3] (for ``token_mean``: the caller sums them over the step's
    micro-batches and ranks)."""
    return torch.tensor([sum(sum(s.response_mask) for s in group) for group in (forget, random, normal)])


def term_sums(batch: StepBatch, token_ce: torch.Tensor, token_kl: torch.Tensor) -> torch.Tensor:
    """Per-term sums of sequence-mean values and sequence counts, [8], to be all-reduced across ranks:
    (forget CE, #forget, random CE, #random, normal KL, #normal, normal CE, #normal).

    These are the true, unweighted terms: the CE of forget and random responses, KL(p_ref || p_theta) and the CE of
    normal responses, each averaged over a sequence's response tokens and then over sequences. A batch without a KL
    term (retain nll) counts no sequence for the KL: its mean is None, not 0.
    """
    num_sequences = batch.sequence_term.numel()
    length = batch.sequence_length.to(token_ce.device, torch.float32)
    sequence_ce = torch.zeros(num_sequences, device=token_ce.device).index_add_(0, batch.token_sequence, token_ce) / length
    sequence_kl = torch.zeros(num_sequences, device=token_kl.device).index_add_(0, batch.token_sequence, token_kl) / length
    sums = []
    has_kl = batch.kl_weight is not None
    for term, values, measured in ((FORGET, sequence_ce, True), (RANDOM, sequence_ce, True),
                                   (NORMAL, sequence_kl, has_kl), (NORMAL, sequence_ce, True)):
        of_term = (batch.sequence_term.to(values.device) == term) & measured
        sums += [values[of_term].sum(), of_term.sum().to(values.dtype)]
    return torch.stack(sums)


def term_means(sums: torch.Tensor) -> dict[str, Optional[float]]:
    """Means from (all-reduced) ``term_sums``; None for a term with no sequences."""
    values = sums.tolist()
    names = ("forget_ce", "random_ce", "normal_kl", "normal_ce")
    return {name: (values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else None) for i, name in enumerate(names)}
