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
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    # The weights are constants of the objective: no gradient may reach them.
    ce_weight = ce_weight.detach().float()
    active = ce_weight != 0
    if kl_weight is not None:
        kl_weight = kl_weight.detach().float()
        active = active | (kl_weight != 0)
    active_idx = active.nonzero().squeeze(1)  # [M]

    logits = hidden[active_idx].float() @ weight.float().T  # [M, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)  # [M, V]

    # Zero-weight tokens were dropped above; a KL-only token may still carry an ignore index, so CE is only
    # defined where the target is a vocabulary id.
    active_targets = targets[active_idx]  # [M]
    valid_target = (active_targets >= 0) & (active_targets < vocab_size)
    target_log_probs = log_probs.gather(1, active_targets.clamp(0, vocab_size - 1).unsqueeze(1)).squeeze(1)
    token_ce = torch.where(valid_target, -target_log_probs, torch.zeros_like(target_log_probs))  # [M]
    loss = (ce_weight[active_idx] * token_ce).sum()

    token_kl = torch.zeros_like(token_ce)
    if kl_weight is not None:
        with torch.no_grad():
            ref_logits = ref_hidden[active_idx].float() @ ref_weight.float().T  # [M, V]
            if softcap is not None:
                ref_logits = softcap * torch.tanh(ref_logits / softcap)
            ref_log_probs = torch.log_softmax(ref_logits, dim=-1)  # [M, V]
        token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(dim=-1)  # [M]
        active_kl_weight = kl_weight[active_idx]
        loss = loss + (active_kl_weight * token_kl).sum()
        token_kl = torch.where(active_kl_weight != 0, token_kl, torch.zeros_like(token_kl))

    if not return_token_terms:
        return loss
    zeros = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
    return (
        loss,
        zeros.index_copy(0, active_idx, token_ce.detach()),
        zeros.index_copy(0, active_idx, token_kl.detach()),
    )
