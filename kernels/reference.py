"""The ``torch`` backend: plain autograd on materialised logits.

This is the readable statement of what every backend computes and the reference the tests and the
benchmark compare against. It allocates several [M, V] fp32 tensors (M = tokens with a non-zero
weight), so it is only meant for small problems.
"""

from __future__ import annotations

import torch


def torch_fused_linear_ce_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    return_token_terms: bool = False,
):
    """Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i with the logits materialised and autograd doing the backward.

    Inputs are assumed valid (``dsunlearn.kernels.fused_linear_ce_kl`` checks them). Returns the fp32 scalar
    loss, or ``(loss, token_ce, token_kl)`` with ``return_token_terms=True`` (both [N] fp32, detached).
    """
    active_idx = _active_rows(ce_weight, kl_weight)  # [M]
    logits = _head_logits(hidden[active_idx], weight, softcap)  # [M, V]
    ref_logits = None
    if kl_weight is not None:
        with torch.no_grad():
            ref_logits = _head_logits(ref_hidden[active_idx], ref_weight, softcap)  # [M, V]
    return _weighted_ce_kl(logits, ref_logits, targets, ce_weight, kl_weight, active_idx, return_token_terms)


def torch_ce_kl_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    *,
    return_token_terms: bool = False,
):
    """The same objective from logits [N, V] that a model computed itself, for output heads the fused loss cannot
    stand in for (bias, logit scaling, ...). ``ref_logits`` [N, V] are constants; rows whose weights are both 0
    are ignored."""
    active_idx = _active_rows(ce_weight, kl_weight)  # [M]
    active_ref = None if ref_logits is None else ref_logits.detach()[active_idx].float()
    return _weighted_ce_kl(
        logits[active_idx].float(), active_ref, targets, ce_weight, kl_weight, active_idx, return_token_terms
    )


def _active_rows(ce_weight: torch.Tensor, kl_weight: torch.Tensor | None) -> torch.Tensor:
    active = ce_weight != 0
    if kl_weight is not None:
        active = active | (kl_weight != 0)
    return active.nonzero().squeeze(1)


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _weighted_ce_kl(logits, ref_logits, targets, ce_weight, kl_weight, active_idx, return_token_terms):
    """The loss over the active rows: ``logits``/``ref_logits`` [M, V] fp32 are rows ``active_idx`` of N tokens."""
    num_tokens, vocab_size = ce_weight.shape[0], logits.shape[1]
    # The weights are constants of the objective: no gradient may reach them.
    ce_weight = ce_weight.detach().float()
    log_probs = torch.log_softmax(logits, dim=-1)  # [M, V]

    # Zero-weight tokens were dropped; a KL-only token may still carry an ignore index, so CE is only defined
    # where the target is a vocabulary id.
    active_targets = targets[active_idx]  # [M]
    valid_target = (active_targets >= 0) & (active_targets < vocab_size)
    target_log_probs = log_probs.gather(1, active_targets.clamp(0, vocab_size - 1).unsqueeze(1)).squeeze(1)
    token_ce = torch.where(valid_target, -target_log_probs, torch.zeros_like(target_log_probs))  # [M]
    loss = (ce_weight[active_idx] * token_ce).sum()

    token_kl = torch.zeros_like(token_ce)
    if kl_weight is not None:
        active_kl_weight = kl_weight.detach().float()[active_idx]
        ref_log_probs = torch.log_softmax(ref_logits, dim=-1)  # [M, V]
        token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(dim=-1)  # [M]
        loss = loss + (active_kl_weight * token_kl).sum()
        token_kl = torch.where(active_kl_weight != 0, token_kl, torch.zeros_like(token_kl))

    if not return_token_terms:
        return loss
    zeros = torch.zeros(num_tokens, dtype=torch.float32, device=logits.device)
    return (
        loss,
        zeros.index_copy(0, active_idx, token_ce.detach()),
        zeros.index_copy(0, active_idx, token_kl.detach()),
    )
