"""``fused_linear_ce_kl``: the public entry of the fused CE + forward-KL head (DESIGN.md §4) and its input checks;
the backends it dispatches to live beside it (``reference.py``, ``chunked.py``, ``compiled.py``, ``triton_ce_kl.py``)."""

from __future__ import annotations

import torch

from .backends import BACKENDS, resolve_backend, without_autocast
from .chunked import chunked_fused_linear_ce_kl
from .compiled import compiled_fused_linear_ce_kl
from .reference import torch_fused_linear_ce_kl

_FLOAT_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_linear_ce_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    backend: str = "auto",
    return_token_terms: bool = False,
):
    """Weighted cross-entropy and forward KL of a linear output head, without a separate logits pass.

    With z_i = hidden[i] @ weight.T (fp32 accumulation; with ``softcap`` c, z ← c·tanh(z/c), also for the
    reference logits) the result is the fp32 scalar

        Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i,
        CE_i = logsumexp(z_i) − z_i[targets[i]],
        KL_i = Σ_v p_ref,v (log p_ref,v − log p_θ,v),  p_ref = softmax(ref_hidden[i] @ ref_weight.T).

    Args:
        hidden: [N, H] policy hidden states (fp32, bf16 or fp16).
        weight: [V, H] policy output-head weight (fp32, bf16 or fp16).
        targets: [N] int64 next-token ids. Must lie in [0, V) wherever ``ce_weight`` is non-zero; tokens whose
            weights are both 0 may hold anything (e.g. -100).
        ce_weight: [N] float CE weight per token (negative = gradient ascent).
        ref_hidden: [N, H_ref] frozen reference hidden states; its dtype and width may differ from ``hidden``'s
            (a reference model of another width with the same vocabulary).
        ref_weight: [V, H_ref] frozen reference output-head weight.
        kl_weight: [N] float KL weight per token. Requires ``ref_hidden`` and ``ref_weight``.
        softcap: logit soft-capping constant c > 0, or None.
        backend: one of ``BACKENDS``.
        return_token_terms: also return the unweighted per-token terms.

    Returns:
        The loss, or ``(loss, token_ce, token_kl)`` with ``return_token_terms=True``: [N] fp32 detached tensors,
        CE for every token with a non-zero weight and a target in [0, V), KL for every token with a non-zero
        ``kl_weight``, 0 elsewhere.

    Gradients reach ``hidden`` and ``weight`` only (in their dtypes); the reference inputs and the weights are
    constants. Tokens whose two weights are 0 are dropped before any matmul.
    """
    _check_inputs(hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight, softcap, backend)
    backend = resolve_backend(backend, hidden, weight)
    if backend == "triton":
        from .triton_ce_kl import triton_fused_linear_ce_kl as implementation
    elif backend == "compiled":
        implementation = compiled_fused_linear_ce_kl
    elif backend == "chunked":
        implementation = chunked_fused_linear_ce_kl
    else:
        implementation = torch_fused_linear_ce_kl
    with without_autocast(hidden.device.type):
        return implementation(
            hidden,
            weight,
            targets,
            ce_weight,
            ref_hidden,
            ref_weight,
            kl_weight,
            softcap=softcap,
            return_token_terms=return_token_terms,
        )


def _check_inputs(hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight, softcap, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_tensor("hidden", hidden, ndim=2, dtypes=_FLOAT_INPUT_DTYPES)
    num_tokens, hidden_size = hidden.shape
    _check_tensor("weight", weight, ndim=2, dtypes=_FLOAT_INPUT_DTYPES, device=hidden.device)
    vocab_size = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight must have shape [V, {hidden_size}] to match hidden {_shape(hidden)}, got {_shape(weight)}"
        )
    if vocab_size == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    _check_tensor("targets", targets, ndim=1, dtypes=(torch.int64,), device=hidden.device, length=num_tokens)
    _check_tensor("ce_weight", ce_weight, ndim=1, floating=True, device=hidden.device, length=num_tokens)

    refs_given = (ref_hidden is not None, ref_weight is not None)
    if kl_weight is None:
        if any(refs_given):
            raise ValueError("ref_hidden/ref_weight were given without kl_weight; pass kl_weight for a KL term")
    else:
        _check_tensor("kl_weight", kl_weight, ndim=1, floating=True, device=hidden.device, length=num_tokens)
        if not all(refs_given):
            raise ValueError("kl_weight needs both ref_hidden and ref_weight (the frozen reference's head inputs)")
        # The reference may be another model with the same vocabulary but its own width H_ref: its logits are a
        # separate product.
        _check_tensor("ref_hidden", ref_hidden, ndim=2, dtypes=_FLOAT_INPUT_DTYPES, device=hidden.device)
        if ref_hidden.shape[0] != num_tokens:
            raise ValueError(
                f"ref_hidden must have shape [{num_tokens}, H_ref] (one row per row of hidden), "
                f"got {_shape(ref_hidden)}"
            )
        _check_tensor("ref_weight", ref_weight, ndim=2, dtypes=_FLOAT_INPUT_DTYPES, device=hidden.device)
        ref_hidden_size = ref_hidden.shape[1]
        if ref_weight.shape != (vocab_size, ref_hidden_size):
            raise ValueError(
                f"ref_weight must have shape [{vocab_size}, {ref_hidden_size}] (the vocabulary of weight, the width of "
                f"ref_hidden), got {_shape(ref_weight)}"
            )

    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")

    # One fused reduction (and one host sync) instead of a per-token check.
    out_of_range = (ce_weight != 0) & ((targets < 0) | (targets >= vocab_size))
    if out_of_range.any():
        i = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, {vocab_size}) but ce_weight[{i}] = "
            f"{float(ce_weight[i])} is non-zero; give ignored tokens ce_weight 0"
        )


def _check_tensor(name, tensor, *, ndim, dtypes=None, floating=False, device=None, length=None):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(tensor)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {device}")
    if length is not None and tensor.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] (one entry per row of hidden), got {_shape(tensor)}")


def _shape(tensor):
    return list(tensor.shape)
