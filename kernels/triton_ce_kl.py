"""The ``triton`` backend: fused linear + CE + KL without an [N, V] tensor.

Why this structure. Per token chunk of C rows:

    logits     = hidden_c @ weight.T          [C, V] fp32   (cuBLAS, fp32 accumulate and output)
    ref_logits = ref_hidden_c @ ref_weight.T  [Ck, V] fp32  (the chunk's rows with a KL term; H_ref may differ from H)
    one Triton program per row: online logsumexp of both rows, CE, KL, then dL/dz written once
    grad_hidden_c  = dz @ weight              [C, H]
    grad_weight   += dz.T @ hidden_c          [V, H] fp32 accumulator

A kernel that never stores a logits tile must recompute the logits for the backward (the softmax needs the
whole row's logsumexp before any dL/dz exists): 12·N·H·V flops instead of the 8·N·H·V counted for this loss
(2 for the logits, 2 for the reference logits, 2 + 2 for the two gradients). Keeping one [C, V] chunk keeps the
flop count at 8·N·H·V, lets the four matrix products run in cuBLAS at the device's matrix rate, and leaves the
Triton kernel the memory-bound part, which it does in one read of each logits row for the statistics and one
more to write dL/dz. The chunk height is chosen so that the chunk buffers stay O(N·H), or hold at most twice
``MIN_CHUNK_ROWS`` rows where that is larger (see ``default_chunk_rows``), so no buffer scales with N·V.

As in Liger-Kernel's fused linear cross-entropy, the gradients are made during the forward and the backward only
scales them by the upstream gradient; the loss is linear in that gradient, so this is exact for any value,
negative weights included.

Until the backward the gradients miss that upstream factor (in fp16 training, DeepSpeed's loss scale), and the
objective's per-token weights are small (~1e-3): dL/dz and the two gradients would sit below fp16's normal range
and flush to zero. So each is stored times a power of two that brings it to O(1) (exact: only the exponent
changes), and the backward divides it out in fp32 together with the upstream gradient:

    dL/dz row r        × row_scale[r] = 2^-e, |ce_w| + |kl_w| = m·2^e with m in [0.5, 1): |dz| ≤ 1
    grad_hidden row r  × row_scale[r]      (= scaled dz @ weight)
    grad_weight        × weight_grad_scale (fp32 accumulator in units of min row_scale, then a power of two that
                                             puts its largest entry at 2^13..2^14)

Tokens whose two weights are 0 are dropped before any matrix product: a stable sort groups the rows and one
device-to-host copy of the group sizes per call tells the Python loop how many chunks to launch (the one host
synchronisation; a loop of cuBLAS calls cannot size itself on the device).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

# Rows of the [C, V] chunk buffers are bounded so that they hold about this many times the bytes of the
# [N, H] input: O(N·H) memory whatever V is.
CHUNK_BYTES_PER_INPUT_BYTE = 8
# The chunk height is the K of the weight-gradient product grad_logits.T @ hidden, which streams the [V, H] fp32
# accumulator once per chunk: below about 1024 rows that product is bound by memory, not by the matrix rate (256
# rows at Gemma's 256k vocabulary). At V = 256k the chunk buffers of 1024 rows take 2.5 GB.
MIN_CHUNK_ROWS = 1024
MAX_BLOCK_V = 2048
# The stored weight gradient's largest entry lies in [2^(E-1), 2^E): far from fp16's overflow at 65504, and 2^37
# above its smallest subnormal.
STORED_WEIGHT_GRAD_EXPONENT = 14
# Elements per fp32 temporary when the backward unscales a stored gradient, so no [V, H] fp32 copy is made.
UNSCALE_BLOCK_ELEMENTS = 2**24


# The kernel calls only builtins of triton.language and @jit functions of this module. tl.max, tl.sum and tl.zeros
# are @jit functions of triton.language itself, made compiled or interpreted once, when triton is first imported:
# calling them would break the interpreter in a process that imported triton before TRITON_INTERPRET=1 was set
# (under pytest, transformers imports it early). Reductions therefore call the builtin tl.reduce with
# triton.language's own combine functions, which the interpreter recognises and runs as one numpy reduction.
_max_combine = tl.standard._elementwise_max
_sum_combine = tl.standard._sum_combine


@triton.jit
def _tanh(x):
    # 1 − 2/(e^{2x} + 1) saturates to ±1 without overflow trouble and needs no libdevice (the interpreter has none).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_kl_rows_kernel(
    logits_ptr,  # [R, V] fp32, raw (before softcap)
    ref_logits_ptr,  # [R, V] fp32, raw; read only when HAS_KL
    grad_logits_ptr,  # [R, V] out: dL/d(raw logits); written only when COMPUTE_GRAD
    targets_ptr,  # [R] int64; may be outside [0, V) where the CE weight is 0
    ce_weight_ptr,  # [R] fp32
    kl_weight_ptr,  # [R] fp32; read only when HAS_KL
    token_ce_ptr,  # [R] fp32 out
    token_kl_ptr,  # [R] fp32 out; written only when HAS_KL
    stride_logits,
    stride_ref_logits,
    stride_grad_logits,
    vocab_size,
    softcap,
    HAS_KL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    ref_logits_row = ref_logits_ptr + row * stride_ref_logits
    cols_in_block = tl.arange(0, BLOCK_V)

    # Pass 1: per-lane online logsumexp (one running max and sum per lane, merged after the loop), so the loop body
    # has no cross-lane reduction. The start value is finite so that exp(old_max − new_max) is never
    # exp(−inf + inf).
    max_lanes = tl.full([BLOCK_V], -3.0e38, tl.float32)
    sum_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    ref_max_lanes = tl.full([BLOCK_V], -3.0e38, tl.float32)
    ref_sum_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    # Σ_v exp(ref_z_v − ref_max)·(ref_z_v − z_v): after normalisation E_{p_ref}[ref_z − z], the KL's cross term.
    cross_lanes = tl.full([BLOCK_V], 0.0, tl.float32)
    for block_start in range(0, vocab_size, BLOCK_V):
        cols = block_start + cols_in_block
        in_vocab = cols < vocab_size
        z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z_or_minus_inf = tl.where(in_vocab, z, float("-inf"))
        new_max = tl.maximum(max_lanes, z_or_minus_inf)
        sum_lanes = sum_lanes * tl.exp(max_lanes - new_max) + tl.exp(z_or_minus_inf - new_max)
        max_lanes = new_max
        if HAS_KL:
            ref_z = tl.load(ref_logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                ref_z = softcap * _tanh(ref_z / softcap)
            ref_z_or_minus_inf = tl.where(in_vocab, ref_z, float("-inf"))
            new_ref_max = tl.maximum(ref_max_lanes, ref_z_or_minus_inf)
            rescale = tl.exp(ref_max_lanes - new_ref_max)
            ref_exp = tl.exp(ref_z_or_minus_inf - new_ref_max)  # 0 outside the vocabulary
            ref_sum_lanes = ref_sum_lanes * rescale + ref_exp
            cross_lanes = cross_lanes * rescale + ref_exp * (ref_z - z)
            ref_max_lanes = new_ref_max

    row_max = tl.reduce(max_lanes, 0, _max_combine)
    logsumexp = row_max + tl.log(tl.reduce(sum_lanes * tl.exp(max_lanes - row_max), 0, _sum_combine))

    target = tl.load(targets_ptr + row)
    # A KL-only token may carry an ignore index: its CE is reported as 0 and it gets no one-hot term.
    valid_target = (target >= 0) & (target < vocab_size)
    target_logit = tl.load(logits_row + target, mask=valid_target, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        target_logit = softcap * _tanh(target_logit / softcap)
    tl.store(token_ce_ptr + row, tl.where(valid_target, logsumexp - target_logit, 0.0))

    if HAS_KL:
        ref_row_max = tl.reduce(ref_max_lanes, 0, _max_combine)
        ref_lane_scale = tl.exp(ref_max_lanes - ref_row_max)
        ref_sum = tl.reduce(ref_sum_lanes * ref_lane_scale, 0, _sum_combine)
        ref_logsumexp = ref_row_max + tl.log(ref_sum)
        # KL = Σ p_ref (ref_z − ref_lse − z + lse) = E_{p_ref}[ref_z − z] − ref_lse + lse, exactly 0 where
        # ref_z == z.
        cross = tl.reduce(cross_lanes * ref_lane_scale, 0, _sum_combine) / ref_sum
        tl.store(token_kl_ptr + row, cross - ref_logsumexp + logsumexp)

    if COMPUTE_GRAD:
        # Pass 2: dL/dz = (ce_w + kl_w)·softmax(z) − ce_w·onehot(target) − kl_w·softmax(ref_z), times the softcap
        # derivative 1 − tanh²(z/c): one softmax serves both terms.
        ce_weight = tl.load(ce_weight_ptr + row)
        softmax_scale = ce_weight
        if HAS_KL:
            kl_weight = tl.load(kl_weight_ptr + row)
            softmax_scale += kl_weight
        grad_row = grad_logits_ptr + row * stride_grad_logits
        for block_start in range(0, vocab_size, BLOCK_V):
            cols = block_start + cols_in_block
            in_vocab = cols < vocab_size
            z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                tanh_z = _tanh(z / softcap)
                z = softcap * tanh_z
            grad = softmax_scale * tl.exp(z - logsumexp)
            grad = tl.where(cols == target, grad - ce_weight, grad)
            if HAS_KL:
                ref_z = tl.load(ref_logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    ref_z = softcap * _tanh(ref_z / softcap)
                grad -= kl_weight * tl.exp(ref_z - ref_logsumexp)
            if HAS_SOFTCAP:
                grad *= 1.0 - tanh_z * tanh_z
            tl.store(grad_row + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_supports_fp32_out(device_index: int) -> tuple[bool, bool]:
    """Whether this torch's cuBLAS path takes ``out_dtype=float32`` for bf16 inputs: (mm, in-place addmm).

    Both came in recent PyTorch releases and their dtype checks changed between them, so try them once.
    """
    device = torch.device("cuda", device_index)
    a = torch.randn(32, 16, device=device, dtype=torch.bfloat16)
    b = torch.randn(16, 24, device=device, dtype=torch.bfloat16)
    expected = a.float() @ b.float()
    try:
        mm_ok = torch.allclose(torch.mm(a, b, out_dtype=torch.float32), expected, rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError):
        mm_ok = False
    try:
        accumulator = torch.ones(32, 24, device=device)
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
        addmm_ok = torch.allclose(accumulator, expected + 1, rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError):
        addmm_ok = False
    return mm_ok, addmm_ok


class _HeadMatmuls:
    """The four matrix products of one head, all accumulating in fp32, on whatever this device and torch allow.

    On CUDA with bf16/fp16 operands cuBLAS writes the logits in fp32 directly and adds the weight gradient into
    an fp32 accumulator. Elsewhere (the CPU, under the Triton interpreter, which only the tests use) the operands
    are upcast to fp32 once per call.
    """

    def __init__(self, weight: torch.Tensor, hidden_dtype: torch.dtype, names: tuple[str, str]):
        compute_dtype = torch.promote_types(hidden_dtype, weight.dtype)
        low_precision = compute_dtype != torch.float32
        self.mm_fp32_out, self.addmm_fp32_out = (
            _cuda_supports_fp32_out(weight.device.index or 0) if weight.is_cuda and low_precision else (False, False)
        )
        # Operand dtype of the products: the input dtype where cuBLAS gives fp32 results from it, else fp32.
        self.dtype = compute_dtype if (not low_precision or self.mm_fp32_out) else torch.float32
        self.input_dtype = compute_dtype
        _warn_about_slow_paths(weight, hidden_dtype, self, names)
        self.weight = weight.to(self.dtype)  # [V, H]; no copy in the usual case

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] → [C, V] fp32."""
        hidden = hidden.to(self.dtype)
        if self.dtype == torch.float32:
            return hidden @ self.weight.T
        return torch.mm(hidden, self.weight.T, out_dtype=torch.float32)

    def grad_hidden(self, grad_logits: torch.Tensor, out: torch.Tensor) -> None:
        """out [C, H] ← grad_logits [C, V] @ weight."""
        if out.dtype == self.dtype:
            torch.mm(grad_logits, self.weight, out=out)
        else:
            out.copy_(grad_logits @ self.weight)

    def add_grad_weight(self, accumulator: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """accumulator [V, H] fp32 += grad_logits.T [V, C] @ hidden [C, H]."""
        hidden = hidden.to(self.dtype)
        if self.dtype == torch.float32:
            accumulator.addmm_(grad_logits.T, hidden)
        elif self.addmm_fp32_out:
            torch.addmm(accumulator, grad_logits.T, hidden, out_dtype=torch.float32, out=accumulator)
        else:
            accumulator += torch.mm(grad_logits.T, hidden, out_dtype=torch.float32)


class SlowPathWarning(UserWarning):
    """The triton backend runs a path several times slower, or larger, than it needs to; the message says why and
    how to avoid it."""


def _warn_about_slow_paths(weight: torch.Tensor, hidden_dtype: torch.dtype, products: _HeadMatmuls, names) -> None:
    """Warn (once per message, Python's default filter) where the products lose cuBLAS's low-precision rate.

    Under the interpreter the CPU upcasts every low-precision product: that path exists for the tests only and
    is not reported, unless the dtypes are mixed, which is slow on every device.
    """
    hidden_name, weight_name = names
    copy_gib = weight.numel() * 4 / 2**30
    if products.dtype != weight.dtype and hidden_dtype != weight.dtype:
        warnings.warn(
            f"fused_linear_ce_kl (triton): {hidden_name} is {hidden_dtype} but {weight_name} is {weight.dtype}, so "
            f"the head's products run in fp32 on an fp32 copy of {weight_name} ({copy_gib:.2f} GiB), about 10x "
            f"slower than {weight.dtype} products with fp32 accumulation. Pass {hidden_name} in {weight_name}'s "
            f"dtype ({hidden_name}.to({weight_name}.dtype)), or both in fp32 if fp32 products are wanted.",
            SlowPathWarning,
            stacklevel=3,
        )
    elif weight.is_cuda and products.dtype != weight.dtype:
        warnings.warn(
            f"fused_linear_ce_kl (triton): torch {torch.__version__} cannot write fp32 results of {weight.dtype} "
            f"products on this GPU (torch.mm(..., out_dtype=torch.float32) failed), so the head's products run in "
            f"fp32 on an fp32 copy of {weight_name} ({copy_gib:.2f} GiB), about 10x slower. Use a PyTorch whose "
            f"torch.mm takes out_dtype for {weight.dtype} inputs on CUDA.",
            SlowPathWarning,
            stacklevel=3,
        )
    elif weight.is_cuda and products.dtype != torch.float32 and not products.addmm_fp32_out:
        warnings.warn(
            f"fused_linear_ce_kl (triton): torch {torch.__version__} has no in-place torch.addmm(..., "
            f"out_dtype=torch.float32) for {weight.dtype} inputs, so every chunk adds its weight gradient through "
            f"an fp32 [V, H] temporary ({copy_gib:.2f} GiB, one more pass over it per chunk). Use a PyTorch whose "
            f"torch.addmm takes out_dtype with out=.",
            SlowPathWarning,
            stacklevel=3,
        )


def _power_of_two_scale(magnitude: torch.Tensor, exponent: int) -> torch.Tensor:
    """2^(exponent − e) for magnitude = m·2^e, m in [0.5, 1), elementwise: magnitude × scale lies in
    [2^(exponent−1), 2^exponent), and multiplying by it changes no mantissa. ``magnitude`` fp32, ≥ 0 (0 gives
    2^exponent)."""
    _, magnitude_exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(magnitude), exponent - magnitude_exponent)


def _unscaled(stored: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stored [R, H] × factor ([R, 1] or a scalar) in fp32, rounded once to ``dtype``; out of place (the stored
    gradient must survive a second backward with retain_graph=True), a block of rows at a time."""
    factor = factor.expand(stored.shape[0], 1)  # [R, 1]
    out = torch.empty(stored.shape, dtype=dtype, device=stored.device)
    block_rows = max(1, UNSCALE_BLOCK_ELEMENTS // max(1, stored.shape[1]))
    for start in range(0, stored.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        out[rows] = stored[rows].float() * factor[rows]
    return out


def default_chunk_rows(num_rows: int, hidden_size: int, vocab_size: int, input_itemsize: int, has_kl: bool) -> int:
    """Token rows per chunk: the chunk's fp32 logits (and reference logits) stay within a few times the bytes of
    the [N, H] input, or take ``MIN_CHUNK_ROWS`` rows where that budget is smaller. The rows are split into as
    many equal chunks (to one row) as fit that height: no chunk, the last included, is shorter than the height,
    and none is more than twice as tall."""
    bytes_per_row = vocab_size * (4 + 4 * has_kl + input_itemsize)
    budget_rows = CHUNK_BYTES_PER_INPUT_BYTE * num_rows * hidden_size * input_itemsize // bytes_per_row
    target_rows = max(MIN_CHUNK_ROWS, budget_rows)
    num_chunks = max(1, num_rows // target_rows)
    return max(1, math.ceil(num_rows / num_chunks))


class TritonFusedLinearCEKLFunction(torch.autograd.Function):
    """Loss and per-token terms over compacted tokens; grads for ``hidden`` and ``weight`` made in the forward.

    Rows are ordered [tokens without KL; tokens with KL]: the first ``num_without_kl`` rows of ``hidden`` have no
    KL term and ``ref_hidden``/``kl_weight`` hold only the remaining rows, so a chunk's KL rows are one contiguous
    tail of it and reference logits are made for those rows only.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [M, H]
        weight: torch.Tensor,  # [V, H]
        targets: torch.Tensor,  # [M] int64
        ce_weight: torch.Tensor,  # [M] fp32
        ref_hidden: torch.Tensor | None,  # [K, H_ref], K = M - num_without_kl
        ref_weight: torch.Tensor | None,  # [V, H_ref]
        kl_weight: torch.Tensor | None,  # [K] fp32
        num_without_kl: int,
        softcap: float | None,
        chunk_rows: int,
        needs_grad_hidden: bool,
        needs_grad_weight: bool,
    ):
        num_rows, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        device = hidden.device
        compute_grad = needs_grad_hidden or needs_grad_weight

        policy = _HeadMatmuls(weight, hidden.dtype, ("hidden", "weight"))
        reference = None
        if kl_weight is not None and kl_weight.numel() > 0:
            reference = _HeadMatmuls(ref_weight, ref_hidden.dtype, ("ref_hidden", "ref_weight"))
        # The interpreter narrows fp32 to bf16 by truncation, not round-to-nearest: let torch round instead.
        grad_logits_dtype = torch.float32 if _interpreting() else policy.dtype

        # Powers of two that keep the gradients in fp16's range until the backward (module docstring). The kernel
        # reads the weights only for dL/dz, so it gets them pre-multiplied by the row scale.
        row_weight = ce_weight.abs()  # [M]
        if kl_weight is not None:
            row_weight[num_without_kl:] += kl_weight.abs()
        row_scale = _power_of_two_scale(row_weight, 0)  # [M]
        grad_ce_weight = ce_weight * row_scale  # [M]
        grad_kl_weight = None if kl_weight is None else kl_weight * row_scale[num_without_kl:]  # [K]
        # The weight-gradient accumulator holds grad_weight × accumulator_scale: a row with a smaller weight (larger
        # row scale) has its hidden row scaled down to these units before the product.
        accumulator_scale = row_scale.amin() if num_rows else row_scale.new_ones(())

        token_ce = torch.empty(num_rows, dtype=torch.float32, device=device)  # [M]
        token_kl = torch.empty(num_rows - num_without_kl, dtype=torch.float32, device=device)  # [K]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if needs_grad_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if needs_grad_weight else None
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
        num_warps = 4 if _interpreting() else 8
        # Stand-in for pointer arguments a launch never reads or writes (distinct from every real buffer).
        unused = torch.empty(1, dtype=torch.float32, device=device)

        for start in range(0, num_rows, chunk_rows):
            end = min(start + chunk_rows, num_rows)
            chunk_hidden = hidden[start:end]  # [C, H]
            logits = policy.logits(chunk_hidden)  # [C, V] fp32
            grad_logits = torch.empty(logits.shape, dtype=grad_logits_dtype, device=device) if compute_grad else None
            # Chunk rows [0, kl_offset) have no KL term; rows [kl_offset, C) are rows [ref_start, ref_end) of the
            # reference inputs.
            kl_offset = min(max(start, num_without_kl), end) - start
            ref_start, ref_end = start + kl_offset - num_without_kl, end - num_without_kl

            if kl_offset > 0:
                _ce_kl_rows_kernel[(kl_offset,)](
                    logits,
                    unused,
                    grad_logits if compute_grad else unused,
                    targets[start:end],
                    grad_ce_weight[start:end],
                    unused,
                    token_ce[start:end],
                    unused,
                    logits.stride(0),
                    0,
                    grad_logits.stride(0) if compute_grad else 0,
                    vocab_size,
                    softcap or 1.0,
                    HAS_KL=False,
                    HAS_SOFTCAP=softcap is not None,
                    COMPUTE_GRAD=compute_grad,
                    BLOCK_V=block_v,
                    num_warps=num_warps,
                )
            if ref_end > ref_start:
                ref_logits = reference.logits(ref_hidden[ref_start:ref_end])  # [Ck, V] fp32
                _ce_kl_rows_kernel[(ref_end - ref_start,)](
                    logits[kl_offset:],
                    ref_logits,
                    grad_logits[kl_offset:] if compute_grad else unused,
                    targets[start + kl_offset : end],
                    grad_ce_weight[start + kl_offset : end],
                    grad_kl_weight[ref_start:ref_end],
                    token_ce[start + kl_offset : end],
                    token_kl[ref_start:ref_end],
                    logits.stride(0),
                    ref_logits.stride(0),
                    grad_logits.stride(0) if compute_grad else 0,
                    vocab_size,
                    softcap or 1.0,
                    HAS_KL=True,
                    HAS_SOFTCAP=softcap is not None,
                    COMPUTE_GRAD=compute_grad,
                    BLOCK_V=block_v,
                    num_warps=num_warps,
                )
                del ref_logits
            del logits

            if not compute_grad:
                continue
            if _interpreting():
                # Round dL/dz as the device stores it (in the products' input dtype where cuBLAS gives fp32 results),
                # then give the CPU products their operand dtype.
                grad_logits = grad_logits.to(policy.input_dtype).to(policy.dtype)
            if needs_grad_hidden:
                policy.grad_hidden(grad_logits, out=grad_hidden[start:end])
            if needs_grad_weight:
                to_accumulator_units = (accumulator_scale / row_scale[start:end]).unsqueeze(1)  # [C, 1], ≤ 1
                chunk_hidden = (chunk_hidden * to_accumulator_units).to(chunk_hidden.dtype)
                policy.add_grad_weight(grad_weight, grad_logits, chunk_hidden)
            del grad_logits

        loss = (ce_weight * token_ce).sum()
        if token_kl.numel() > 0:
            loss = loss + (kl_weight * token_kl).sum()
        weight_grad_scale = None
        if grad_weight is not None:
            # Hold the weight gradient in the weight's dtype until the backward, not in the fp32 accumulator.
            storage_scale = _power_of_two_scale(grad_weight.abs().amax(), STORED_WEIGHT_GRAD_EXPONENT)
            grad_weight = grad_weight.mul_(storage_scale).to(weight.dtype)
            weight_grad_scale = accumulator_scale * storage_scale
        ctx.save_for_backward(grad_hidden, grad_weight, row_scale, weight_grad_scale)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(token_ce, token_kl)
        return loss, token_ce, token_kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_token_ce, _grad_token_kl):
        grad_hidden, grad_weight, row_scale, weight_grad_scale = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = _unscaled(grad_hidden, (grad_loss / row_scale).unsqueeze(1), ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = _unscaled(grad_weight, (grad_loss / weight_grad_scale).view(1, 1), ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def triton_fused_linear_ce_kl(
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
    chunk_rows: int | None = None,
):
    """Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i with a Triton kernel for the softmax work and no [N, V] tensor.

    Same contract as ``dsunlearn.kernels.fused_linear_ce_kl`` (which validates the inputs; this function assumes
    valid ones): ``hidden`` [N, H], ``weight`` [V, H], ``targets`` [N] int64, ``ce_weight`` [N], optional
    ``ref_hidden`` [N, H_ref], ``ref_weight`` [V, H_ref], ``kl_weight`` [N]. Returns the fp32 scalar loss, or
    ``(loss, token_ce, token_kl)`` (both [N] fp32, detached) with ``return_token_terms=True``. Gradients flow to
    ``hidden`` and ``weight`` only. ``chunk_rows`` overrides ``default_chunk_rows`` (token rows per chunk).
    Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]

    ce_weight = ce_weight.detach().float()
    # Group 0: CE only, 1: with KL, 2: both weights 0. A stable sort by group gives the row order the Function
    # wants ([without KL; with KL], dropped rows last) and the group sizes cost the call's one host synchronisation.
    group = torch.where(ce_weight != 0, 0, 2)  # [N]
    if kl_weight is not None:
        kl_weight = kl_weight.detach().float()
        group = torch.where(kl_weight != 0, 1, group)
    order = torch.argsort(group, stable=True)  # [N]
    num_without_kl, num_with_kl, _ = torch.bincount(group, minlength=3).tolist()
    active_rows = order[: num_without_kl + num_with_kl]  # [M]
    rows_with_kl = active_rows[num_without_kl:]  # [K]
    num_active = active_rows.numel()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(
            max(num_active, 1), hidden_size, vocab_size, hidden.element_size(), num_with_kl > 0
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    grad_enabled = torch.is_grad_enabled()
    # The usual case (every token active, none or all with a KL term) needs no gathered copy of the inputs.
    in_order = num_active == num_tokens and num_with_kl in (0, num_tokens)
    if kl_weight is not None:
        # [K, H_ref]
        ref_hidden = ref_hidden.detach() if num_with_kl == num_tokens else ref_hidden.detach()[rows_with_kl]
    else:
        ref_hidden = None
    loss, active_ce, active_kl = TritonFusedLinearCEKLFunction.apply(
        hidden if in_order else hidden[active_rows],  # [M, H]; indexing routes the gradient back to the rows
        weight,
        targets[active_rows],
        ce_weight[active_rows],
        ref_hidden,
        None if kl_weight is None else ref_weight.detach(),
        None if kl_weight is None else kl_weight[rows_with_kl],
        num_without_kl,
        softcap,
        chunk_rows,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )
    if not return_token_terms:
        return loss
    zeros = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
    return loss, zeros.index_copy(0, active_rows, active_ce), zeros.index_copy(0, rows_with_kl, active_kl)
