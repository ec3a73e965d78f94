"""Teacher-forced measurements of response tokens: NLL sums under a model, and the KL(original ‖ unlearned) sums."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dsunlearn.data.tokenization import pad_batch
from dsunlearn.eval.eval_config import EvalContext
from dsunlearn.eval.sharding import chunks

logger = logging.getLogger(__name__)


def response_log_probs(model, batch: dict[str, torch.Tensor], device: torch.device):
    """fp32 log-softmax over the vocabulary at the positions that predict response tokens.

    Returns (log_probs [M, V], targets [M], row [M]): M response tokens of the batch, flattened; ``row``
    says which sequence each came from.
    """
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    # Position t predicts token t+1: drop the last position's logits and the first token's mask entry.
    predicts_response = batch["response_mask"][:, 1:].to(device).bool()  # [B, L-1]
    log_probs = F.log_softmax(logits[:, :-1][predicts_response].float(), dim=-1)  # [M, V]
    targets = input_ids[:, 1:][predicts_response]  # [M]
    row = predicts_response.nonzero()[:, 0]  # [M]
    return log_probs, targets, row


def per_sequence_sums(values: torch.Tensor, row: torch.Tensor, num_sequences: int) -> list[float]:
    sums = torch.zeros(num_sequences, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, row, values.double()).tolist()


def teacher_forced(model, reference, sequences: list, context: EvalContext) -> list[dict]:
    """Per sequence: NLL sums of the response under both models, the KL(original ‖ unlearned) sum, token count."""
    records = []
    for chunk in chunks(sequences, context.cfg.batch_size):
        batch = pad_batch(chunk, context.pad_id)
        log_probs, targets, row = response_log_probs(model, batch, context.device(model))
        ref_log_probs, _, _ = response_log_probs(reference, batch, context.device(model))
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
        ref_nll = -ref_log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
        kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)  # [M]
        sums = [per_sequence_sums(values, row, len(chunk)) for values in (nll, ref_nll, kl)]
        for i, sequence in enumerate(chunk):
            records.append(
                {
                    "response_tokens": sum(sequence.response_mask),
                    "kl_sum": sums[2][i],
                    "unlearned": {"nll_sum": sums[0][i]},
                    "original": {"nll_sum": sums[1][i]},
                }
            )
    return records


def nll_sums(model, sequences: list, context: EvalContext) -> list[float]:
    """Per sequence: summed NLL of its response-masked tokens under ``model``."""
    sums = []
    for chunk in chunks(sequences, context.cfg.batch_size):
        batch = pad_batch(chunk, context.pad_id)
        log_probs, targets, row = response_log_probs(model, batch, context.device(model))
        sums += per_sequence_sums(-log_probs.gather(1, targets[:, None]).squeeze(1), row, len(chunk))
    return sums
