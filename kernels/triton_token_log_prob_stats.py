"""The ``triton`` backend of ``token_log_prob_stats``: log p(target), E_p[log p] and Var_p[log p] per token.

As in ``triton_ce_kl.py``, the products run in cuBLAS over chunks of token rows ([C, V] fp32 logits, C bounded by
``CHUNK_LOGITS_BYTES``, never [N, V]) and one Triton program per row reads its logits once: per lane a running
max, the sum of exp(z − max) and the exp-weighted mean and centred second moment of z (a weighted Welford
update, rescaled when the lane's max moves), merged over the lanes at the end with Chan et al.'s parallel
formula. No gradient: this is an inference op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ce_kl import _cuda_supports_fp32_out, _interpreting, _max_combine, _sum_combine, _tanh

# Bytes of one chunk of fp32 logits [C, V].
CHUNK_LOGITS_BYTES = 256 * 2**20
MAX_BLOCK_V = 2048


@triton.jit
def _log_prob_stats_rows_kernel(
    logits_ptr,  # [R, V] fp32, raw (before softcap)
    targets_ptr,  # [R] int64 in [0, V)
    target_log_prob_ptr,  # [R] fp32 out
    mean_ptr,  # [R] fp32 out
    variance_ptr,  # [R] fp32 out
    stride_logits,
    vocab_size,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    cols_in_block = tl.arange(0, BLOCK_V)
    # Per lane: running max (finite start, so exp(old − new) is never exp(−inf + inf)), Σ exp(z − max), the
    # exp-weighted mean of z and Σ exp(z − max)·(z − mean)².
    max_lanes = tl.full([BLOCK_V], -3.0e38, tl.float32)
    sum_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    mean_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    m2_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    for block_start in range(0, vocab_size, BLOCK_V):
        cols = block_start + cols_in_block
        in_vocab = cols < vocab_size
        z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        new_max = tl.where(in_vocab, tl.maximum(max_lanes, z), max_lanes)
        rescale = tl.exp(max_lanes - new_max)
        # Columns past the vocabulary weigh 0 (and take no exp of a huge number on the way).
        exp_weight = tl.where(in_vocab, tl.exp(tl.where(in_vocab, z, new_max) - new_max), 0.0)
        old_sum = sum_lanes * rescale
        new_sum = old_sum + exp_weight
        delta = tl.where(in_vocab, z - mean_lanes, 0.0)
        # A lane that has seen no column yet has a zero sum: its mean stays 0 rather than 0/0.
        share = tl.where(new_sum > 0.0, exp_weight / tl.where(new_sum > 0.0, new_sum, 1.0), 0.0)
        new_mean = mean_lanes + delta * share
        m2_lanes = m2_lanes * rescale + exp_weight * delta * (z - new_mean)
        max_lanes = new_max
        sum_lanes = new_sum
        mean_lanes = new_mean

    row_max = tl.reduce(max_lanes, 0, _max_combine)
    lane_scale = tl.exp(max_lanes - row_max)
    lane_sums = sum_lanes * lane_scale
    total = tl.reduce(lane_sums, 0, _sum_combine)
    mean_logit = tl.reduce(lane_sums * mean_lanes, 0, _sum_combine) / total
    spread = mean_lanes - mean_logit
    m2 = tl.reduce(m2_lanes * lane_scale + lane_sums * spread * spread, 0, _sum_combine)
    logsumexp = row_max + tl.log(total)

    target = tl.load(targets_ptr + row)
    target_logit = tl.load(logits_row + target).to(tl.float32)
    if HAS_SOFTCAP:
        target_logit = softcap * _tanh(target_logit / softcap)
    tl.store(target_log_prob_ptr + row, target_logit - logsumexp)
    tl.store(mean_ptr + row, mean_logit - logsumexp)
    tl.store(variance_ptr + row, m2 / total)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[C, H] @ [V, H].T → [C, V] fp32: cuBLAS writes fp32 from bf16/fp16 operands where this torch allows it,
    else (the CPU under the interpreter, older torch) the operands are upcast."""
    low_precision = torch.promote_types(hidden.dtype, weight.dtype) != torch.float32
    if low_precision and hidden.dtype == weight.dtype and hidden.is_cuda:
        mm_fp32_out, _ = _cuda_supports_fp32_out(hidden.device.index or 0)
        if mm_fp32_out:
            return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    return hidden.float() @ weight.float().T


def triton_token_log_prob_stats(hidden, weight, targets, *, softcap=None, chunk_rows=None):
    """Same contract as ``dsunlearn.kernels.token_log_prob_stats`` (which validates the inputs). ``chunk_rows``
    overrides the token rows per chunk of logits. Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    outputs = [torch.empty(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    num_warps = 4 if _interpreting() else 8
    for start in range(0, num_tokens, chunk_rows):
        end = min(start + chunk_rows, num_tokens)
        logits = _chunk_logits(hidden[start:end], weight)  # [C, V] fp32
        _log_prob_stats_rows_kernel[(end - start,)](
            logits,
            targets[start:end],
            *(output[start:end] for output in outputs),
            logits.stride(0),
            vocab_size,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return tuple(outputs)
