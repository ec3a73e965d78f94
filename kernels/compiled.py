"""The ``compiled`` backend: the chunked backend with each chunk's softmax work one ``torch.compile``'d graph.

As in ``chunked.py`` the tokens go through in chunks of rows, the gradients of ``hidden`` and ``weight`` are made in
the forward and the backward only scales them. What changes is the chunk's body: its log-softmaxes, CE, KL and
dL/dz are one compiled graph (``torch.compile(fullgraph=True)``, so a graph break is an error, not a silent slow
path), which Inductor makes a single loop nest over the chunk's rows: each row's logits are read from cache by the
several passes over them (max, sum, KL, dL/dz), where eager PyTorch makes a dozen sweeps over the [C, V] tensors.

The four products stay outside the graph, as BLAS calls into buffers this function owns for the whole call: the
logits and the reference logits of a chunk go into two [C, V] buffers, the graph writes dL/dz into a third, and the
two gradient products add into the final gradients in place. Inside the graph each product got a fresh [C, V]
buffer per chunk (mapped and page-faulted anew: PyTorch keeps no cache of freed CPU memory), and
``grad_weight.addmm_`` on a graph input became a product into a new [V, H] buffer and a copy back (both seen in
Inductor's output code); moving the products out halved the time (kernels/BENCHMARKS.md). Liger-Kernel's in-place
trick (dL/dz written over the logits) is not used: with ``logits.copy_(dL/dz)`` in the graph Inductor allocates a
[C, V] temporary per chunk, as it reads what it overwrites (seen in its output code, not timed).

One graph per model: the chunk's row count is marked dynamic, so the last, shorter chunk of a call and calls with
other token counts reuse it; V stays static (a model's head does not change), which keeps the vocabulary loops
vectorised. Rows with and without a KL term are chunked apart, so a chunk either has all its reference logits or
none (two graphs, each compiled once).
"""

from __future__ import annotations

import functools
import logging

import torch

from .chunked import (
    DeferredRows,
    check_deferred_rows_lead,
    chunk_spans,
    chunked_fused_linear_ce_kl,
    compact_rows,
    expand_token_terms,
    scale_precomputed_gradients,
)

logger = logging.getLogger(__name__)

# Rows per chunk: at most this many, and fewer when one [C, V] fp32 tensor would pass CHUNK_LOGITS_BYTES. A call holds
# three such buffers (logits, reference logits, dL/dz): 376 MiB at V = 128256. Measured at N = 2048, V = 128256 on 2
# CPU cores (kernels/BENCHMARKS.md): 256 rows 4970 ms and 507 MiB, 512 rows 5882 ms and 884 MiB, 1024 rows 4709 ms
# and 1637 MiB.
MAX_CHUNK_ROWS = 256
CHUNK_LOGITS_BYTES = 256 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """The largest power of two <= ``MAX_CHUNK_ROWS`` whose [C, V] fp32 tensor fits ``CHUNK_LOGITS_BYTES``."""
    rows = MAX_CHUNK_ROWS
    while rows > 1 and rows * vocab_size * 4 > CHUNK_LOGITS_BYTES:
        rows //= 2
    return rows


def _capped(logits: torch.Tensor, softcap: float | None):
    """(c·tanh(z/c), tanh(z/c)) with a softcap c, else (z, None)."""
    if softcap is None:
        return logits, None
    tanh_logits = torch.tanh(logits / softcap)
    return tanh_logits * softcap, tanh_logits


def _policy_terms(logits, targets, ce_weight, softcap):
    """logits [C, V] fp32 → log p_θ [C, V], CE [C], dL/dz of the CE term [C, V], tanh(z/c) (softcap) or None."""
    logits, tanh_logits = _capped(logits, softcap)  # [C, V]
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # [C, V]
    vocab_size = logits.shape[1]
    # A token without CE may hold any target: it matches no column and reports CE 0.
    is_target = torch.arange(vocab_size, device=targets.device) == targets.unsqueeze(1)  # [C, V]
    valid_target = (targets >= 0) & (targets < vocab_size)
    target_log_probs = log_probs.gather(1, targets.clamp(0, vocab_size - 1).unsqueeze(1)).squeeze(1)
    token_ce = torch.where(valid_target, -target_log_probs, 0.0)  # [C]
    grad_logits = ce_weight.unsqueeze(1) * (log_probs.exp() - is_target.float())  # [C, V]
    return log_probs, token_ce, grad_logits, tanh_logits


def _softcap_derivative(grad_logits, tanh_logits):
    # d(c·tanh(x/c))/dx = 1 − tanh²(x/c)
    return grad_logits if tanh_logits is None else grad_logits * (1.0 - tanh_logits.square())


def _ce_chunk(logits, targets, ce_weight, grad_logits_out, softcap: float | None):
    """A chunk of rows without KL: CE [C]; dL/dz [C, V] written into ``grad_logits_out``."""
    _, token_ce, grad_logits, tanh_logits = _policy_terms(logits, targets, ce_weight, softcap)
    grad_logits_out.copy_(_softcap_derivative(grad_logits, tanh_logits))
    return token_ce


def _ce_kl_chunk(logits, targets, ce_weight, ref_logits, kl_weight, grad_logits_out, softcap: float | None):
    """A chunk of rows with KL: CE [C], KL [C]; dL/dz [C, V] written into ``grad_logits_out``.

    dL/dz = (ce_w + kl_w)·softmax(z) − ce_w·onehot(target) − kl_w·softmax(ref_z): one softmax serves both terms.
    """
    log_probs, token_ce, grad_logits, tanh_logits = _policy_terms(logits, targets, ce_weight, softcap)
    ref_logits, _ = _capped(ref_logits, softcap)  # [C, V]
    ref_log_probs = ref_logits - torch.logsumexp(ref_logits, dim=-1, keepdim=True)
    ref_probs = ref_log_probs.exp()
    token_kl = (ref_probs * (ref_log_probs - log_probs)).sum(dim=-1)  # [C]
    grad_logits = grad_logits + kl_weight.unsqueeze(1) * (log_probs.exp() - ref_probs)
    grad_logits_out.copy_(_softcap_derivative(grad_logits, tanh_logits))
    return token_ce, token_kl


@functools.cache
def compiled_chunk_functions():
    """(CE chunk, CE + KL chunk) through torch.compile, wrapped at this backend's first call: torch.compile imports
    torch._dynamo, about 1.5 CPU-seconds that every rank of a run on another backend would pay at start-up. The
    graphs themselves are made at the first call of each."""
    return torch.compile(_ce_chunk, fullgraph=True), torch.compile(_ce_kl_chunk, fullgraph=True)


def _chunk_rows_dynamic(*tensors):
    """Fresh copies of the chunk's row tensors ([C, H] and [C]: small) with dim 0 marked dynamic, so every chunk
    shares one graph. PyTorch specialises sizes and storage offsets of 0 and 1: the copies start at offset 0, and a
    chunk of one row goes in as two copies of it; the caller keeps the first row of each result."""
    repeats = 2 if tensors[0].shape[0] == 1 else 1
    tensors = tuple(tensor.repeat(repeats, *[1] * (tensor.dim() - 1)) for tensor in tensors)
    _rows_dynamic(*tensors)
    return tensors


def _rows_dynamic(*tensors):
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


class CompiledFusedLinearCEKLFunction(torch.autograd.Function):
    """Loss and per-token terms over compacted tokens, rows ordered [tokens without KL; tokens with KL] as in
    ``chunked.ChunkedFusedLinearCEKLFunction``; grads for ``hidden`` and ``weight`` made in the forward."""

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
        chunk_rows: int,
        needs_grad_hidden: bool,
        needs_grad_weight: bool,
        deferred: DeferredRows | None,
    ):
        num_rows = hidden.shape[0]
        fp32 = {"dtype": torch.float32, "device": hidden.device}
        # One fp32 copy per call of a low-precision input (none for fp32): the graph sees fp32 only, and tensors
        # that require no grad (whether the caller's do is a guard of the graph: it would compile twice).
        hidden32, weight32 = hidden.detach().float(), weight.detach().float()
        token_ce = torch.empty(num_rows, **fp32)  # [M]
        token_kl = torch.empty(num_rows - num_without_kl, **fp32)  # [K]
        grad_hidden = torch.empty(hidden.shape, **fp32) if needs_grad_hidden else None  # [M, H]
        grad_weight = torch.zeros(weight.shape, **fp32) if needs_grad_weight else None  # [V, H]
        if kl_weight is not None:
            ref_hidden32, ref_weight32 = ref_hidden.float(), ref_weight.float()

        # The chunk's [C, V] buffers, page-faulted once per call (at least 2 rows: see _chunk_rows_dynamic).
        buffer_rows = max(2, min(chunk_rows, num_rows))
        logits = torch.empty(buffer_rows, weight.shape[0], **fp32)
        grad_logits = torch.empty(buffer_rows, weight.shape[0], **fp32)
        if num_rows > num_without_kl:
            ref_logits = torch.empty(buffer_rows, weight.shape[0], **fp32)

        compiled_ce_chunk, compiled_ce_kl_chunk = compiled_chunk_functions()
        # Chunks never straddle the [without KL | with KL] boundary.
        for start, end in chunk_spans(num_rows, chunk_rows, deferred, boundaries=(num_without_kl,)):
            rows = slice(start, end)
            height = max(2, end - start)
            chunk_hidden = hidden32[rows]  # [C, H]
            chunk_logits, chunk_grad_logits = logits[:height], grad_logits[:height]  # [C, V]
            if start < num_without_kl:
                row_hidden, row_targets, row_ce_weight = _chunk_rows_dynamic(
                    chunk_hidden, targets[rows], ce_weight[rows]
                )
                torch.mm(row_hidden, weight32.T, out=chunk_logits)
                _rows_dynamic(chunk_logits, chunk_grad_logits)
                chunk_ce = compiled_ce_chunk(chunk_logits, row_targets, row_ce_weight, chunk_grad_logits, softcap)
            else:
                ref_rows = slice(start - num_without_kl, end - num_without_kl)
                row_hidden, row_targets, row_ce_weight, row_ref_hidden, row_kl_weight = _chunk_rows_dynamic(
                    chunk_hidden, targets[rows], ce_weight[rows], ref_hidden32[ref_rows], kl_weight[ref_rows]
                )
                chunk_ref_logits = ref_logits[:height]  # [C, V]
                torch.mm(row_hidden, weight32.T, out=chunk_logits)
                torch.mm(row_ref_hidden, ref_weight32.T, out=chunk_ref_logits)
                _rows_dynamic(chunk_logits, chunk_ref_logits, chunk_grad_logits)
                chunk_ce, chunk_kl = compiled_ce_kl_chunk(
                    chunk_logits,
                    row_targets,
                    row_ce_weight,
                    chunk_ref_logits,
                    row_kl_weight,
                    chunk_grad_logits,
                    softcap,
                )
                token_kl[ref_rows] = chunk_kl[: end - start]
            token_ce[rows] = chunk_ce[: end - start]
            chunk_grad_logits = chunk_grad_logits[: end - start]
            row_weight = None
            if deferred is not None and start < deferred.num_rows:
                row_weight = deferred.weights(start, end, token_ce[rows]).unsqueeze(1)  # [C, 1]
                chunk_hidden = chunk_hidden * row_weight  # [C, H]: dL/dW += gᵀ (w·h)
            if needs_grad_hidden:
                torch.mm(chunk_grad_logits, weight32, out=grad_hidden[rows])
                if row_weight is not None:
                    grad_hidden[rows].mul_(row_weight)
            if needs_grad_weight:
                grad_weight.addmm_(chunk_grad_logits.T, chunk_hidden)

        loss = (ce_weight * token_ce).sum()
        if kl_weight is not None:
            loss = loss + (kl_weight * token_kl).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_ce, token_kl)
        return loss, token_ce, token_kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_token_ce, _grad_token_kl):
        return (*scale_precomputed_gradients(ctx, grad_loss), *[None] * 11)


_compile_failure: str | None = None


def compiled_fused_linear_ce_kl(
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
    deferred: DeferredRows | None = None,
):
    """Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i without materialising the [N, V] logits, the chunk's work compiled.

    Same contract as ``dsunlearn.kernels.fused_linear_ce_kl`` (which validates the inputs). ``chunk_rows`` is the
    number of token rows per chunk, by default ``default_chunk_rows(V)``; ``deferred``: rows weighed by their own CE
    (``chunked.DeferredRows``), whose spans hold at most ``chunk_rows`` rows. Where torch.compile fails (no C++
    compiler, an unsupported Python), this says so once in the log and runs the eager ``chunked`` backend.
    """
    global _compile_failure
    arguments = (hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight)
    if _compile_failure is None:
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(weight.shape[0])
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        try:
            return _apply(*arguments, softcap, return_token_terms, chunk_rows, deferred)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            _compile_failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            logger.warning(
                "torch.compile does not work here (%s): the fused CE + KL head runs the eager chunked backend",
                _compile_failure,
            )
    return chunked_fused_linear_ce_kl(*arguments, softcap=softcap, return_token_terms=return_token_terms,
                                      deferred=deferred)


def _apply(hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight, softcap, return_token_terms, rows,
           deferred):
    compact = compact_rows(ce_weight, kl_weight)
    check_deferred_rows_lead(compact, deferred)
    grad_enabled = torch.is_grad_enabled()
    loss, active_ce, active_kl = CompiledFusedLinearCEKLFunction.apply(
        hidden[compact.active_rows],  # [M, H]; indexing routes the gradient back to the original rows
        weight,
        targets[compact.active_rows],
        compact.ce_weight[compact.active_rows],
        None if kl_weight is None else ref_hidden.detach()[compact.rows_with_kl],
        None if kl_weight is None else ref_weight.detach(),
        None if kl_weight is None else compact.kl_weight[compact.rows_with_kl],
        compact.num_without_kl,
        softcap,
        rows,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        deferred,
    )
    if not return_token_terms:
        return loss
    return loss, *expand_token_terms(compact, hidden.shape[0], active_ce, active_kl)
