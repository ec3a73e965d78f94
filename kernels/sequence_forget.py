"""The fused head with a forget term that is a function of each forget sequence's summed log-likelihood (npo,
simnpo; dsunlearn/objective.py's docstring derives it). The term's derivative at the current weights is each forget
token's CE weight, and it needs the sequence's whole CE:
- on the ``chunked`` and ``compiled`` backends, when every forget sequence fits one chunk, the chunks hold whole
  sequences and each chunk weighs its own rows once their CE is known, in the one pass that makes their logits
  (``chunked.DeferredRows``);
- otherwise (``triton``, ``torch``, or a sequence longer than a chunk) a first pass gives every forget token's CE
  without a gradient, then the one fused forward and backward of ``fused_linear_ce_kl`` runs with those weights.
Either way the loss's value is made the term's own.

It lives here, below the objective and the runtime, so that the trainer's head (runtime/engines.py) and the kernel
benchmark (``--terms npo``) run the same code, and the benchmark still imports without settings or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import resolve_backend, without_autocast
from .ce_kl import _check_inputs, fused_linear_ce_kl
from .chunked import DeferredRows, chunked_fused_linear_ce_kl, default_chunk_size
from .compiled import compiled_fused_linear_ce_kl, default_chunk_rows


@dataclass
class SequenceForget:
    """A forget term that is a function of each forget sequence's summed log-likelihood s(y) (npo, simnpo) for one
    micro-batch: its forget tokens are the batch's first ``num_tokens`` (forget sequences come first).

    ``token_weights`` turns the first pass's per-token CE into the fused loss's ce_weight of those tokens (the
    derivative of the term at the current weights, dsunlearn/objective.py), and ``exact_loss`` makes the reported
    value the term's own while the gradient stays the fused loss's.
    """

    loss: str  # "npo" or "simnpo"
    beta: float
    delta: float  # simnpo's margin (0 for npo)
    num_tokens: int  # M_f: the forget tokens, the first M_f of the batch's M
    token_sequence: torch.Tensor  # [M_f] int64: the forget sequence (0 .. B_f-1) of each forget token
    sequence_weight: torch.Tensor  # [B_f] float64 c_s >= 0: the reduction's weight of each sequence's loss
    sequence_length: torch.Tensor  # [B_f] float64 n(y): response tokens of each forget sequence
    reference_sums: torch.Tensor | None  # [B_f] float64 s_ref(y), npo only

    def to(self, device: torch.device) -> SequenceForget:
        return SequenceForget(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})

    def sums(self, token_ce: torch.Tensor) -> torch.Tensor:
        """s(y) = -sum_t CE_t per forget sequence, [B_f] float64, from the forget tokens' CE [M_f]."""
        summed = torch.zeros(self.sequence_weight.shape[0], dtype=torch.float64, device=token_ce.device)
        return -summed.index_add_(0, self.token_sequence, token_ce.to(torch.float64))

    def _argument(self, sums: torch.Tensor) -> torch.Tensor:
        """x with L = -(2/b) log sigmoid(x): npo x = -b (s - s_ref), simnpo x = b (-s/n - delta); [B_f]."""
        if self.loss == "npo":
            return -self.beta * (sums - self.reference_sums)
        return self.beta * (-sums / self.sequence_length - self.delta)

    def sequence_losses(self, token_ce: torch.Tensor) -> torch.Tensor:
        """L(y) per forget sequence, [B_f] float64."""
        return -2.0 / self.beta * torch.nn.functional.logsigmoid(self._argument(self.sums(token_ce)))

    def token_weights(self, token_ce: torch.Tensor) -> torch.Tensor:
        """The forget tokens' ce_weight, [M_f] fp32: -c_s dL/ds at s = s_theta (dL/dCE_t = -dL/ds, as s = -sum CE).
        L = -(2/b) log sigmoid(x) gives dL/ds = (2/b) sigmoid(-x) (-dx/ds), with -dx/ds = b (npo) or b/n (simnpo)."""
        return self.chunk_weights(0, self.num_tokens, token_ce)

    def chunk_weights(self, start: int, end: int, chunk_ce: torch.Tensor) -> torch.Tensor:
        """``token_weights`` of the forget tokens [start, end), [C] fp32, from their CE [C] alone: every sequence with
        a token there has all its tokens there."""
        chunk_sequence = self.token_sequence[start:end]  # [C]
        summed = torch.zeros(self.sequence_weight.shape[0], dtype=torch.float64, device=chunk_ce.device)
        sums = -summed.index_add_(0, chunk_sequence, chunk_ce.to(torch.float64))  # [B_f], right for the chunk's
        slope = torch.sigmoid(-self._argument(sums))
        derivative = 2.0 * slope if self.loss == "npo" else 2.0 * slope / self.sequence_length
        return (-self.sequence_weight * derivative)[chunk_sequence].to(torch.float32)

    def spans(self, chunk_rows: int) -> tuple | None:
        """Chunks of at most ``chunk_rows`` forget tokens holding whole sequences ((start, end) pairs covering the
        forget tokens, each sequence's tokens contiguous), or None where a sequence is longer than that."""
        sequences, lengths = torch.unique_consecutive(self.token_sequence.cpu(), return_counts=True)
        if sequences.unique().numel() != sequences.numel() or int(lengths.max()) > chunk_rows:
            return None
        spans, start, end = [], 0, 0
        for length in lengths.tolist():
            if end + length - start > chunk_rows:
                spans.append((start, end))
                start = end
            end += length
        return (*spans, (start, end)) if end > start else tuple(spans)

    def exact_loss(
        self, fused_loss: torch.Tensor, forget_ce: torch.Tensor, token_ce: torch.Tensor, ce_weight: torch.Tensor
    ) -> torch.Tensor:
        """``fused_loss``, whose forget part is the linear sum_t ce_weight_t CE_t over the first pass's weights, with
        that part replaced, in value only, by the term's own sum_s c_s L(s): the gradient stays ``fused_loss``'s,
        exact by construction of the weights. ``forget_ce`` [M_f]: the first pass's CE; ``token_ce`` and
        ``ce_weight`` [M]: the fused pass's (a token whose weight underflowed to 0 has no CE there)."""
        fused_forget = token_ce[: self.num_tokens].detach().to(torch.float64)
        linear = (ce_weight[: self.num_tokens].detach().to(torch.float64) * fused_forget).sum()
        exact = (self.sequence_weight * self.sequence_losses(forget_ce.detach())).sum()
        return fused_loss + (exact - linear).to(fused_loss.dtype)


def with_sequence_forget(
    sequence_forget: SequenceForget, forget_ce: torch.Tensor, ce_weight: torch.Tensor, fused
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a batch whose forget term is npo or simnpo, given the first pass's CE of its forget tokens,
    ``forget_ce`` [M_f] (no gradient): the forget tokens' ``ce_weight`` [M] replaced by the term's derivative there,
    ``fused(ce_weight)`` (the one fused forward, returning ``(loss, token_ce, token_kl)``) run with them, its value
    made the term's own. The forget tokens' CE returned is the first pass's, so the logged forget CE is right even
    where a weight underflowed to 0."""
    num_forget = sequence_forget.num_tokens
    ce_weight = torch.cat([sequence_forget.token_weights(forget_ce).to(ce_weight.dtype), ce_weight[num_forget:]])
    loss, token_ce, token_kl = fused(ce_weight)
    loss = sequence_forget.exact_loss(loss, forget_ce, token_ce, ce_weight)
    return loss, torch.cat([forget_ce.to(token_ce.dtype), token_ce[num_forget:]]), token_kl


def fused_linear_sequence_forget(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    *,
    sequence_forget: SequenceForget,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_linear_ce_kl`` (same inputs, ``return_token_terms=True``) for a batch whose first
    ``sequence_forget.num_tokens`` tokens carry an npo or simnpo term, never tokens x vocabulary: one pass whose
    chunks weigh whole forget sequences where the backend and lengths allow it, else a head forward over the forget
    tokens without a gradient first (module docstring). ``ce_weight[:M_f]`` is replaced; the loss's value is the
    term's own plus the other tokens' weighted CE and KL, its gradient exact. Returns ``(loss, token_ce, token_kl)``."""
    num_forget = sequence_forget.num_tokens
    _check_inputs(hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight, softcap, backend)
    resolved = resolve_backend(backend, hidden, weight)
    one_pass = {"chunked": (chunked_fused_linear_ce_kl, default_chunk_size),
                "compiled": (compiled_fused_linear_ce_kl, default_chunk_rows)}.get(resolved)
    spans = None
    if one_pass is not None and num_forget and (kl_weight is None or not kl_weight[:num_forget].any()):
        spans = sequence_forget.spans(one_pass[1](weight.shape[0]))
    if spans is not None:
        implementation = one_pass[0]
        unit_weight = torch.cat([torch.ones(num_forget, device=hidden.device), ce_weight[num_forget:].float()])
        with without_autocast(hidden.device.type):
            loss, token_ce, token_kl = implementation(
                hidden, weight, targets, unit_weight, ref_hidden, ref_weight, kl_weight, softcap=softcap,
                return_token_terms=True, deferred=DeferredRows(num_forget, spans, sequence_forget.chunk_weights),
            )  # fmt: skip
        return sequence_forget.exact_loss(loss, token_ce[:num_forget], token_ce, unit_weight), token_ce, token_kl

    with torch.no_grad():
        _, forget_ce, _ = fused_linear_ce_kl(
            hidden[:num_forget].detach(), weight.detach(), targets[:num_forget],
            torch.ones(num_forget, device=hidden.device), softcap=softcap, backend=backend, return_token_terms=True,
        )  # fmt: skip

    def fused(weights):
        return fused_linear_ce_kl(
            hidden, weight, targets, weights, ref_hidden, ref_weight, kl_weight,
            softcap=softcap, backend=backend, return_token_terms=True,
        )  # fmt: skip

    return with_sequence_forget(sequence_forget, forget_ce, ce_weight, fused)
