"""The unlearning objective as per-token weights of one fused loss (DESIGN.md §1, §4).

The policy runs ONE forward over the concatenated [forget; random; normal] batch. Each response token gets
    forget  ce_weight = -e1 / (n_s * B_f)          (gradient ascent)
    random  ce_weight = +e2 / (n_s * B_f * K)
    normal  kl_weight = +e3 / (n_s * B_n)          (forward KL to the reference)
with n_s the response tokens of its sequence and B the sequences of its term in this micro-batch ("sequence_mean":
mean over a sequence's response tokens, then over sequences, as in the authors' code). DeepSpeed averages gradients
over ranks and micro-steps, and every micro-batch holds the same number of sequences, so that mean of means is the
mean over the whole accumulated step.
"token_mean" instead gives each response token e / T, T the term's response tokens of the whole accumulated step
(summed over ranks and micro-steps), times the number of micro-batches DeepSpeed averages over (ranks x micro-steps),
to undo that average. Prompt and padding positions get no weight at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dsunlearn.config import ObjectiveConfig

FORGET, RANDOM, NORMAL = 0, 1, 2
TERM_NAMES = ("forget", "random", "normal")


@dataclass
class StepBatch:
    """Tensors of one micro-step. B sequences padded to L; M response tokens; the normal sequences come last."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    token_index: torch.Tensor  # [M] flat positions in the [B*L] grid whose hidden state predicts a response token
    targets: torch.Tensor  # [M] the response token predicted at each position
    ce_weight: torch.Tensor  # [M] fp32
    kl_weight: Optional[torch.Tensor]  # [M] fp32, None when there is no normal data
    token_sequence: torch.Tensor  # [M] which sequence each token belongs to
    sequence_term: torch.Tensor  # [B] FORGET, RANDOM or NORMAL
    sequence_length: torch.Tensor  # [B] response tokens per sequence (n_s)
    ref_input_ids: Optional[torch.Tensor]  # [B_n, L_n] the normal sequences, for the reference
    ref_attention_mask: Optional[torch.Tensor]  # [B_n, L_n]
    ref_token_index: Optional[torch.Tensor]  # [M_n] flat positions in the [B_n*L_n] grid; the last M_n tokens
    num_tokens: int  # non-padding tokens the policy processes
    normal_indices: tuple[int, ...] = ()  # [B_n] each normal sequence's index in the normal set (the reference cache)

    def to(self, device: torch.device) -> "StepBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
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


def build_step_batch(
    forget: Sequence,
    random: Sequence,
    normal: Sequence,
    pad_id: int,
    objective: ObjectiveConfig,
    step_term_tokens: Optional[torch.Tensor] = None,
    micro_batches_per_step: int = 1,
) -> StepBatch:
    """Concatenate [forget; random; normal] tokenised sequences (objects with ``input_ids`` and ``response_mask``
    lists) into one padded batch with the objective's per-token weights.

    ``token_mean`` only: ``step_term_tokens`` [3] holds each term's response tokens in the whole optimizer step
    (every rank's and micro-step's, see :func:`term_token_counts`), and ``micro_batches_per_step`` the number of
    micro-batches DeepSpeed averages the gradient over (world size x gradient accumulation steps).
    """
    from dsunlearn.data import pad_batch

    sequences = list(forget) + list(random) + list(normal)
    terms = [FORGET] * len(forget) + [RANDOM] * len(random) + [NORMAL] * len(normal)
    padded = pad_batch(sequences, pad_id)
    input_ids, attention_mask, response_mask = padded["input_ids"], padded["attention_mask"], padded["response_mask"]
    token_index, targets, token_sequence = response_positions(response_mask * attention_mask, input_ids)

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
    weight = weight.to(torch.float32)
    is_normal = token_term == NORMAL
    ce_weight = torch.where(is_normal, torch.zeros_like(weight), weight)

    kl_weight = ref_input_ids = ref_attention_mask = ref_token_index = None
    if normal:
        kl_weight = torch.where(is_normal, weight, torch.zeros_like(weight))
        first_normal = len(forget) + len(random)
        # The reference sees only the normal rows, trimmed to their longest sequence.
        ref_length = int(attention_mask[first_normal:].sum(1).max())
        ref_input_ids = input_ids[first_normal:, :ref_length]
        ref_attention_mask = attention_mask[first_normal:, :ref_length]
        ref_token_index, _, _ = response_positions(
            response_mask[first_normal:, :ref_length] * ref_attention_mask, ref_input_ids
        )
    return StepBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_index=token_index,
        targets=targets,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        token_sequence=token_sequence,
        sequence_term=sequence_term,
        sequence_length=sequence_length,
        ref_input_ids=ref_input_ids,
        ref_attention_mask=ref_attention_mask,
        ref_token_index=ref_token_index,
        num_tokens=int(attention_mask.sum()),
    )


def term_token_counts(forget: Sequence, random: Sequence, normal: Sequence) -> torch.Tensor:
    """Response tokens per term of one micro-batch, [3] (for ``token_mean``: the caller sums them over the step's
    micro-batches and ranks)."""
    return torch.tensor([sum(sum(s.response_mask) for s in group) for group in (forget, random, normal)])


def term_sums(batch: StepBatch, token_ce: torch.Tensor, token_kl: torch.Tensor) -> torch.Tensor:
    """Per-term sums of sequence-mean values and sequence counts, [8], to be all-reduced across ranks:
    (forget CE, #forget, random CE, #random, normal KL, #normal, normal CE, #normal).

    These are the true, unweighted terms: the CE of forget and random responses, KL(p_ref || p_theta) and the CE of
    normal responses, each averaged over a sequence's response tokens and then over sequences.
    """
    num_sequences = batch.sequence_term.numel()
    length = batch.sequence_length.to(token_ce.device, torch.float32)
    sequence_ce = torch.zeros(num_sequences, device=token_ce.device).index_add_(0, batch.token_sequence, token_ce) / length
    sequence_kl = torch.zeros(num_sequences, device=token_kl.device).index_add_(0, batch.token_sequence, token_kl) / length
    sums = []
    for term, values in ((FORGET, sequence_ce), (RANDOM, sequence_ce), (NORMAL, sequence_kl), (NORMAL, sequence_ce)):
        of_term = batch.sequence_term.to(values.device) == term
        sums += [values[of_term].sum(), of_term.sum().to(values.dtype)]
    return torch.stack(sums)


def term_means(sums: torch.Tensor) -> dict[str, Optional[float]]:
    """Means from (all-reduced) ``term_sums``; None for a term with no sequences."""
    values = sums.tolist()
    names = ("forget_ce", "random_ce", "normal_kl", "normal_ce")
    return {name: (values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else None) for i, name in enumerate(names)}
