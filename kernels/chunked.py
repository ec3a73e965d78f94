"""The ``chunked`` backend: fused linear + CE + KL in pure PyTorch without an [N, V] tensor.

Tokens are processed in chunks of rows so that one [chunk, V] fp32 tensor stays near a fixed budget. As in
Liger-Kernel's fused linear cross-entropy, the gradients of ``hidden`` and ``weight`` are computed during the
forward (the chunk's logits are gone by the backward) and the backward only scales them by the upstream
gradient. The loss is linear in its upstream gradient, so this is exact.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# Bytes of one [chunk, V] fp32 tensor; a chunk holds a handful of these at once.
CHUNK_LOGITS_BYTES = 32 * 2**20
# Bytes of the fp32 cast of one vocabulary block of a low-precision head weight: the products accumulate in fp32
# without an fp32 copy of the whole [V, H] weight (3 GB each for W and W_ref at 128k x 4096).
WEIGHT_BLOCK_BYTES = 8 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that a [chunk, V] fp32 tensor stays within ``CHUNK_LOGITS_BYTES``."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


class DeferredRows(NamedTuple):
    """Rows whose CE weights depend on their own CE (npo/simnpo's forget tokens: a function of each sequence's sum),
    weighed in the one pass that makes their logits instead of a first pass before it.

    They are the first ``num_rows`` rows of the call (no KL term), given ce_weight 1, so the loss counts each CE once,
    and processed in the chunks ``spans`` ((start, end) pairs covering [0, num_rows)), each of which holds whole
    sequences. ``weights(start, end, chunk_ce)`` turns a chunk's CE [C] into its rows' true weights [C] fp32; scaling a
    row commutes with both gradient products, so the chunk's gradients take them after its softmax:
    dL/dh = w·(g @ W), dL/dW += gᵀ @ (w·h).
    """

    num_rows: int
    spans: tuple
    weights: Callable


def chunk_spans(num_rows: int, chunk_rows: int, deferred: DeferredRows | None = None, boundaries=()):
    """(start, end) of every chunk: the deferred rows' own spans, then chunks of at most ``chunk_rows`` rows that never
    straddle a row index in ``boundaries``."""
    start = 0
    if deferred is not None:
        yield from deferred.spans
        start = deferred.num_rows
    for stop in sorted({index for index in boundaries if start < index < num_rows} | {num_rows}):
        while start < stop:
            end = min(start + chunk_rows, stop)
            yield start, end
            start = end


def scale_precomputed_gradients(ctx, grad_loss: torch.Tensor):
    """Backward of a fused loss whose gradients of ``hidden`` and ``weight`` were made in its forward (saved with
    ``ctx.save_for_backward``; target dtypes in ``ctx.hidden_dtype``/``ctx.weight_dtype``): scale them by the
    upstream gradient, which makes any upstream value (negative, ≠ 1) exact."""
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden is not None:
        grad_hidden = _scaled(grad_hidden, grad_loss, ctx.hidden_dtype)
    if grad_weight is not None:
        grad_weight = _scaled(grad_weight, grad_loss, ctx.weight_dtype)
    return grad_hidden, grad_weight


def _scaled(stored: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stored [R, H] fp32 × factor, rounded once to ``dtype``, a block of rows at a time: out of place (the stored
    gradient must survive a second backward with retain_graph=True) and without an fp32 temporary of its size."""
    if dtype == torch.float32:
        return stored * factor
    out = torch.empty(stored.shape, dtype=dtype, device=stored.device)
    block_rows = max(1, WEIGHT_BLOCK_BYTES // (4 * max(1, stored.shape[1])))
    for start in range(0, stored.shape[0], block_rows):
        torch.mul(stored[start : start + block_rows], factor, out=out[start : start + block_rows])
    return out


class _Fp32HeadProducts:
    """The products of one head weight [V, H] in fp32 whatever its storage dtype: an fp32 weight is used as it is,
    a low-precision one is cast a vocabulary block at a time (``WEIGHT_BLOCK_BYTES``), just before the products
    that need the block."""

    def __init__(self, weight: torch.Tensor):
        vocab_size, hidden_size = weight.shape
        self.weight = weight
        self.block_rows = (
            vocab_size if weight.dtype == torch.float32 else max(1, WEIGHT_BLOCK_BYTES // (4 * hidden_size))
        )

    def _blocks(self):
        """(vocabulary slice, fp32 weight rows [B, H]) pairs covering the vocabulary."""
        for start in range(0, self.weight.shape[0], self.block_rows):
            rows = slice(start, start + self.block_rows)
            yield rows, self.weight[rows].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] fp32 → [C, V] fp32."""
        if self.block_rows >= self.weight.shape[0]:
            return hidden @ self.weight.float().T
        logits = hidden.new_empty(hidden.shape[0], self.weight.shape[0])
        for rows, block in self._blocks():
            # Written in place: a column block of the logits is a matrix with a leading dimension BLAS takes.
            torch.mm(hidden, block.T, out=logits[:, rows])  # [C, B]
        return logits

    def add_gradients(self, grad_logits, hidden, grad_hidden_out, grad_weight):
        """grad_hidden_out [C, H] ← grad_logits [C, V] @ weight (if given); grad_weight [V, H] += grad_logits.T @
        hidden [C, H] (if given). One cast of each block serves both products."""
        if grad_hidden_out is not None:
            grad_hidden_out.zero_()
        for rows, block in self._blocks():
            if grad_hidden_out is not None:
                grad_hidden_out.addmm_(grad_logits[:, rows], block)
            if grad_weight is not None:
                grad_weight[rows].addmm_(grad_logits[:, rows].T, hidden)


class ChunkedFusedLinearCEKLFunction(torch.autograd.Function):
    """Loss and per-token terms over compacted tokens; grads for ``hidden`` and ``weight`` made in the forward.

    Rows are ordered [tokens without KL; tokens with KL]: the first ``num_without_kl`` rows of ``hidden`` have no
    KL term and ``ref_hidden``/``kl_weight`` hold only the remaining rows, so a chunk's KL rows are one
    contiguous tail of it.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [M, H]
        weight: torch.Tensor,  # [V, H]
        targets: torch.Tensor,  # [M]
        ce_weight: torch.Tensor,  # [M] fp32
        ref_hidden: torch.Tensor | None,  # [K, H_ref], K = M - num_without_kl
        ref_weight: torch.Tensor | None,  # [V, H_ref]
        kl_weight: torch.Tensor | None,  # [K] fp32
        num_without_kl: int,
        softcap: float | None,
        chunk_size: int,
        needs_grad_hidden: bool,
        needs_grad_weight: bool,
        deferred: DeferredRows | None,
    ):
        num_rows = hidden.shape[0]
        vocab_size = weight.shape[0]
        policy = _Fp32HeadProducts(weight)
        reference = _Fp32HeadProducts(ref_weight) if kl_weight is not None else None

        fp32 = dict(dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), **fp32)
        token_ce = torch.empty(num_rows, **fp32)  # [M]
        token_kl = torch.empty(num_rows - num_without_kl, **fp32)  # [K]
        grad_hidden = torch.empty(hidden.shape, **fp32) if needs_grad_hidden else None  # [M, H]
        grad_weight = torch.zeros(weight.shape, **fp32) if needs_grad_weight else None  # [V, H]

        for start, end in chunk_spans(num_rows, chunk_size, deferred):
            chunk_hidden = hidden[start:end].float()  # [C, H]
            logits = policy.logits(chunk_hidden)  # [C, V]
            if softcap is not None:
                tanh_logits = torch.tanh(logits / softcap)  # [C, V], kept for the softcap derivative
                logits = tanh_logits * softcap
            logsumexp = torch.logsumexp(logits, dim=-1)  # [C]

            chunk_targets = targets[start:end]
            chunk_ce_weight = ce_weight[start:end]
            # A KL-only token may carry an ignore index: its CE is reported as 0 and it gets no one-hot term.
            valid_target = (chunk_targets >= 0) & (chunk_targets < vocab_size)
            safe_targets = chunk_targets.clamp(0, vocab_size - 1).unsqueeze(1)  # [C, 1]
            target_logits = logits.gather(1, safe_targets).squeeze(1)  # [C]
            chunk_ce = torch.where(valid_target, logsumexp - target_logits, torch.zeros_like(logsumexp))
            token_ce[start:end] = chunk_ce
            loss += (chunk_ce_weight * chunk_ce).sum()
            row_weight = deferred.weights(start, end, chunk_ce) if deferred and start < deferred.num_rows else None

            # Rows [kl_start, C) of this chunk have a KL term; they are rows [kl_start + start - num_without_kl, …)
            # of ref_hidden / kl_weight.
            kl_start = max(start, num_without_kl) - start
            has_kl = kl_weight is not None and kl_start < end - start
            if has_kl:
                ref_rows = slice(start + kl_start - num_without_kl, end - num_without_kl)
                chunk_kl_weight = kl_weight[ref_rows]  # [Ck]
                ref_log_probs = reference.logits(ref_hidden[ref_rows].float())  # [Ck, V]
                if softcap is not None:
                    ref_log_probs = torch.tanh(ref_log_probs / softcap).mul_(softcap)
                ref_log_probs -= torch.logsumexp(ref_log_probs, dim=-1, keepdim=True)
                ref_probs = ref_log_probs.exp()  # [Ck, V]
                log_probs = logits[kl_start:] - logsumexp[kl_start:].unsqueeze(1)  # [Ck, V]
                # KL = Σ_v p_ref (log p_ref − log p_θ); reuse ref_log_probs' storage for the difference.
                chunk_kl = ref_log_probs.sub_(log_probs).mul_(ref_probs).sum(dim=-1)  # [Ck]
                del log_probs, ref_log_probs
                token_kl[ref_rows] = chunk_kl
                loss += (chunk_kl_weight * chunk_kl).sum()

            if not (needs_grad_hidden or needs_grad_weight):
                continue
            # dL/dz = (ce_w + kl_w)·softmax(z) − ce_w·onehot(target) − kl_w·softmax(ref_z), built in the logits'
            # storage: one softmax serves both terms.
            grad_logits = logits.sub_(logsumexp.unsqueeze(1)).exp_()  # [C, V] = softmax(z)
            row_scale = chunk_ce_weight.clone()  # [C]
            if has_kl:
                row_scale[kl_start:] += chunk_kl_weight
            grad_logits.mul_(row_scale.unsqueeze(1))
            grad_logits.scatter_add_(1, safe_targets, -chunk_ce_weight.unsqueeze(1))
            if has_kl:
                grad_logits[kl_start:].addcmul_(ref_probs, chunk_kl_weight.unsqueeze(1), value=-1.0)
                del ref_probs
            if softcap is not None:
                # d(c·tanh(x/c))/dx = 1 − tanh²(x/c)
                grad_logits.mul_(tanh_logits.square_().neg_().add_(1.0))
                del tanh_logits
            if row_weight is not None:
                chunk_hidden = chunk_hidden * row_weight.unsqueeze(1)  # [C, H]: dL/dW += gᵀ (w·h)
            policy.add_gradients(
                grad_logits, chunk_hidden, grad_hidden[start:end] if needs_grad_hidden else None, grad_weight
            )
            if row_weight is not None and needs_grad_hidden:
                grad_hidden[start:end].mul_(row_weight.unsqueeze(1))

        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_ce, token_kl)
        return loss, token_ce, token_kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_token_ce, _grad_token_kl):
        return (*scale_precomputed_gradients(ctx, grad_loss), *[None] * 11)


def chunked_fused_linear_ce_kl(
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
    chunk_size: int | None = None,
    deferred: DeferredRows | None = None,
):
    """Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i without materialising the [N, V] logits.

    Same contract as ``dsunlearn.kernels.fused_linear_ce_kl`` (which validates the inputs; this function assumes
    valid ones). ``chunk_size`` is the number of token rows per chunk, by default ``default_chunk_size(V)``.
    Tokens whose weights are both 0 are dropped before any matmul; reference logits are computed only for
    tokens with a non-zero ``kl_weight``. ``deferred``: rows weighed by their own CE (``DeferredRows``).
    """
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    compact = compact_rows(ce_weight, kl_weight)
    check_deferred_rows_lead(compact, deferred)
    grad_enabled = torch.is_grad_enabled()
    loss, active_ce, active_kl = ChunkedFusedLinearCEKLFunction.apply(
        hidden[compact.active_rows],  # [M, H]; indexing routes the gradient back to the original rows
        weight,
        targets[compact.active_rows],
        compact.ce_weight[compact.active_rows],
        None if kl_weight is None else ref_hidden.detach()[compact.rows_with_kl],
        None if kl_weight is None else ref_weight.detach(),
        None if kl_weight is None else compact.kl_weight[compact.rows_with_kl],
        compact.num_without_kl,
        softcap,
        chunk_size,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        deferred,
    )
    if not return_token_terms:
        return loss
    return loss, *expand_token_terms(compact, num_tokens, active_ce, active_kl)


class CompactRows(NamedTuple):
    """The tokens that cost something, ordered [without KL; with KL] (the layout of the chunked Functions)."""

    ce_weight: torch.Tensor  # [N] fp32, detached
    kl_weight: torch.Tensor | None  # [N] fp32, detached
    active_rows: torch.Tensor  # [M] indices into the N tokens: rows_without_kl then rows_with_kl
    rows_with_kl: torch.Tensor  # [K]
    num_without_kl: int


def compact_rows(ce_weight: torch.Tensor, kl_weight: torch.Tensor | None) -> CompactRows:
    """Drop the tokens whose weights are both 0; put those with a KL term last."""
    ce_weight = ce_weight.detach().float()
    if kl_weight is None:
        rows_without_kl = (ce_weight != 0).nonzero().squeeze(1)
        rows_with_kl = rows_without_kl[:0]
    else:
        kl_weight = kl_weight.detach().float()
        with_kl = kl_weight != 0
        rows_without_kl = ((ce_weight != 0) & ~with_kl).nonzero().squeeze(1)
        rows_with_kl = with_kl.nonzero().squeeze(1)
    active_rows = torch.cat([rows_without_kl, rows_with_kl])
    return CompactRows(ce_weight, kl_weight, active_rows, rows_with_kl, rows_without_kl.numel())


def check_deferred_rows_lead(compact: CompactRows, deferred: DeferredRows | None):
    """Deferred rows must be the compacted call's first rows: non-zero CE weight, no KL."""
    if deferred is None:
        return
    lead = compact.active_rows[: deferred.num_rows]
    if compact.num_without_kl < deferred.num_rows or not torch.equal(lead, torch.arange(deferred.num_rows).to(lead)):
        raise ValueError("deferred rows must be the first rows, each with a non-zero ce_weight and no KL term")


def expand_token_terms(compact: CompactRows, num_tokens: int, active_ce: torch.Tensor, active_kl: torch.Tensor):
    """[N] token CE and KL from the compacted rows' [M] and [K], 0 for the dropped tokens."""
    zeros = torch.zeros(num_tokens, dtype=torch.float32, device=active_ce.device)
    return zeros.index_copy(0, compact.active_rows, active_ce), zeros.index_copy(0, compact.rows_with_kl, active_kl)
