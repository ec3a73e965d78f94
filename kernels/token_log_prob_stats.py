"""Per-token log-probability statistics of a linear output head, for membership inference (Min-K%++).

For each token i with logits z_i = hidden[i] @ weight.T (fp32 accumulation; with ``softcap`` c, z ← c·tanh(z/c))
and the model's own next-token distribution p_i = softmax(z_i):

    target_log_prob[i] = log p_i(targets[i])
    mean[i]            = E_{v~p_i}[log p_i(v)]                        (minus the entropy)
    variance[i]        = Var_{v~p_i}[log p_i(v)] = Var_{v~p_i}[z_i,v]  (log p = z − logsumexp: same spread)

Min-K%++ (Zhang et al. 2024) scores a token by (target_log_prob − mean) / sqrt(variance); its authors' code and
open-unlearning's compute mean and variance from the materialised [N, V] log-probabilities. Here every backend
but ``torch`` goes over the vocabulary in blocks and keeps, per token, a running max, the sum of exp(z − max)
and the exp-weighted mean and centred second moment of z, rescaled when the max moves and merged as in Chan et
al.'s parallel variance: the variance never comes from E[z²] − E[z]², which loses every digit in fp32 when the
logits are large and close together. Inference only: nothing here has a gradient.

Backends: ``torch`` (materialised, the reference), ``chunked`` (PyTorch, never more than one [rows, block] tile
of logits), ``triton`` (one [rows, V] chunk of fp32 logits from cuBLAS, statistics in a Triton kernel, in
``triton_token_log_prob_stats.py``), ``auto`` (triton on CUDA when installed, else chunked).
"""

from __future__ import annotations

import torch

from .backends import BACKENDS, resolve_backend, without_autocast
_FLOAT_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary columns per block of the chunked backend, and the bytes of one [rows, block] fp32 tile it may hold.
VOCAB_BLOCK = 4096
TILE_BYTES = 32 * 2**20


def token_log_prob_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target) [N], E_p[log p] [N], Var_p[log p] [N]), fp32, no gradient, without an [N, V] tensor.

    Args:
        hidden: [N, H] head inputs (fp32, bf16 or fp16): the final hidden states, after the final norm.
        weight: [V, H] output-head weight (fp32, bf16 or fp16).
        targets: [N] int64 ids in [0, V): the token each position predicts.
        softcap: logit soft-capping constant c > 0, or None.
        backend: one of ``BACKENDS``.
    """
    _check_inputs(hidden, weight, targets, softcap, backend)
    backend = resolve_backend(backend, hidden, weight)
    if backend == "triton":
        from .triton_token_log_prob_stats import triton_token_log_prob_stats as implementation
    elif backend in ("chunked", "compiled"):
        # No graph of its own: a forward-only pass of a few reductions, already one online pass over tiles.
        implementation = chunked_token_log_prob_stats
    else:
        implementation = torch_token_log_prob_stats
    with without_autocast(hidden.device.type), torch.no_grad():
        return implementation(hidden.detach(), weight.detach(), targets, softcap=softcap)


def torch_token_log_prob_stats(hidden, weight, targets, *, softcap=None):
    """The statistics from the materialised fp32 log-probabilities [N, V]: the readable statement of the op."""
    logits = hidden.float() @ weight.float().T  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, V]
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)  # [N]
    variance = (probs * (log_probs - mean.unsqueeze(1)).square()).sum(-1)  # [N]
    return log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), mean, variance


def chunked_token_log_prob_stats(hidden, weight, targets, *, softcap=None, vocab_block=VOCAB_BLOCK):
    """The statistics over [rows, ``vocab_block``] tiles of logits, merged online (module docstring)."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    vocab_block = min(vocab_block, vocab_size)
    chunk_rows = max(1, TILE_BYTES // (4 * vocab_block))
    outputs = [torch.empty(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    for start in range(0, num_tokens, chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk_hidden = hidden[rows].float()  # [C, H]
        running = None  # (max, weight sum, mean of z, centred second moment), each [C]
        for block_start in range(0, vocab_size, vocab_block):
            block = chunk_hidden @ weight[block_start : block_start + vocab_block].float().T  # [C, B]
            if softcap is not None:
                block = softcap * torch.tanh(block / softcap)
            block_stats = _block_moments(block)
            running = block_stats if running is None else _merge_moments(running, block_stats)
        row_max, weight_sum, mean_logit, second_moment = running
        logsumexp = row_max + weight_sum.log()
        target_logit = (chunk_hidden * weight[targets[rows]].float()).sum(-1)  # [C]
        if softcap is not None:
            target_logit = softcap * torch.tanh(target_logit / softcap)
        outputs[0][rows] = target_logit - logsumexp
        outputs[1][rows] = mean_logit - logsumexp
        outputs[2][rows] = second_moment / weight_sum
    return tuple(outputs)


def _block_moments(block: torch.Tensor):
    """[C, B] logits → (max, Σ w, Σ w·z / Σ w, Σ w·(z − mean)²), w = exp(z − max), each [C]."""
    block_max = block.amax(-1)
    exp_weights = (block - block_max.unsqueeze(1)).exp()  # [C, B]
    weight_sum = exp_weights.sum(-1)
    mean = (exp_weights * block).sum(-1) / weight_sum
    second_moment = (exp_weights * (block - mean.unsqueeze(1)).square()).sum(-1)
    return block_max, weight_sum, mean, second_moment


def _merge_moments(a, b):
    """Two (max, Σ w, mean, Σ w·(z − mean)²) summaries of disjoint columns → the summary of their union."""
    a_max, a_sum, a_mean, a_m2 = a
    b_max, b_sum, b_mean, b_m2 = b
    new_max = torch.maximum(a_max, b_max)
    a_scale, b_scale = (a_max - new_max).exp(), (b_max - new_max).exp()
    a_sum, b_sum = a_sum * a_scale, b_sum * b_scale
    total = a_sum + b_sum
    delta = b_mean - a_mean
    mean = a_mean + delta * (b_sum / total)
    m2 = a_m2 * a_scale + b_m2 * b_scale + delta.square() * (a_sum * b_sum / total)
    return new_max, total, mean, m2


def _check_inputs(hidden, weight, targets, softcap, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype not in _FLOAT_INPUT_DTYPES:
            raise ValueError(f"{name} must be a 2-D fp32, bf16 or fp16 tensor, got {_describe(tensor)}")
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V >= 1, {hidden.shape[1]}] to match hidden, got {list(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if (
        not isinstance(targets, torch.Tensor)
        or targets.dtype != torch.int64
        or targets.shape != (hidden.shape[0],)
        or targets.device != hidden.device
    ):
        raise ValueError(
            f"targets must be an int64 tensor of shape [{hidden.shape[0]}] on {hidden.device}, got {_describe(targets)}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]})")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    return type(value).__name__
