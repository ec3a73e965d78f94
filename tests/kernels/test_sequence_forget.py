"""npo/simnpo's head in one pass (kernels/sequence_forget.py, chunked.DeferredRows): chunks that hold whole forget
sequences weigh their rows once their CE is known, with no first pass. Checked against a float64 computation of the
term with materialised logits (loss and both gradients), with several chunks, a normal tail with and without KL, and
the two-pass path where a sequence is longer than a chunk."""

from __future__ import annotations

import pytest
import torch

from dsunlearn.kernels import sequence_forget as module
from dsunlearn.kernels.sequence_forget import SequenceForget, fused_linear_sequence_forget

VOCAB, HIDDEN = 53, 11
# Forget sequences of 3, 5, 2 and 4 tokens (14), then 6 normal tokens.
FORGET_LENGTHS = (3, 5, 2, 4)
NUM_NORMAL = 6
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_term(loss: str) -> SequenceForget:
    lengths = torch.tensor(FORGET_LENGTHS, dtype=torch.float64)
    return SequenceForget(
        loss=loss, beta=0.4 if loss == "npo" else 4.5, delta=0.0 if loss == "npo" else 0.5,
        num_tokens=sum(FORGET_LENGTHS),
        token_sequence=torch.repeat_interleave(torch.arange(len(FORGET_LENGTHS)), torch.tensor(FORGET_LENGTHS)),
        sequence_weight=torch.tensor([0.5, 0.25, 2.0, 0.7], dtype=torch.float64), sequence_length=lengths,
        reference_sums=torch.tensor([-9.0, -14.0, -6.0, -11.0], dtype=torch.float64) if loss == "npo" else None,
    )  # fmt: skip


def inputs(dtype, with_kl, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = sum(FORGET_LENGTHS) + NUM_NORMAL
    hidden = (torch.randn(rows, HIDDEN, generator=generator) * 0.8).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.8).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), generator=generator)
    ce_weight = torch.cat([torch.full((sum(FORGET_LENGTHS),), 123.0), torch.full((NUM_NORMAL,), 0.3)])  # replaced
    kl = {}
    if with_kl:
        kl_weight = torch.cat([torch.zeros(sum(FORGET_LENGTHS)), torch.full((NUM_NORMAL,), 0.6)])
        kl = {"ref_hidden": torch.randn(rows, 7, generator=generator).to(dtype),
              "ref_weight": torch.randn(VOCAB, 7, generator=generator).to(dtype), "kl_weight": kl_weight}
    return hidden, weight, targets, ce_weight, kl


def float64_loss(term, hidden, weight, targets, ce_weight, kl):
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, -1)  # [M, V]
    token_ce = -log_probs.gather(1, targets[:, None])[:, 0]
    num_forget = term.num_tokens
    loss = (term.sequence_weight * term.sequence_losses(token_ce[:num_forget])).sum()
    loss = loss + (ce_weight[num_forget:].double() * token_ce[num_forget:]).sum()
    if kl:
        ref_log_probs = torch.log_softmax(kl["ref_hidden"].double() @ kl["ref_weight"].double().T, -1)
        token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
        loss = loss + (kl["kl_weight"].double() * token_kl).sum()
    return loss, token_ce


@pytest.fixture
def no_first_pass(monkeypatch):
    """The first pass is the module's only call of fused_linear_ce_kl: fail if it runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a first pass over the forget tokens ran")

    monkeypatch.setattr(module, "fused_linear_ce_kl", refuse)


@pytest.mark.parametrize("backend", ["chunked", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss, with_kl", [("npo", False), ("simnpo", True)])
def test_one_pass_matches_float64_in_chunks_of_whole_sequences(backend, dtype, loss, with_kl, monkeypatch,
                                                               no_first_pass):
    # 7 rows a chunk: the forget tokens go in chunks (3) (5 2) (4), each whole sequences; the normal ones in 7s.
    monkeypatch.setattr(module, "default_chunk_size", lambda vocab_size: 7)
    monkeypatch.setattr(module, "default_chunk_rows", lambda vocab_size: 7)
    term = make_term(loss)
    assert term.spans(7) == ((0, 3), (3, 10), (10, 14))
    hidden, weight, targets, ce_weight, kl = inputs(dtype, with_kl)
    got, token_ce, _ = fused_linear_sequence_forget(hidden, weight, targets, ce_weight, **kl, sequence_forget=term,
                                                    backend=backend)
    upstream = -1.7  # the term's gradient scales with any upstream value
    (got * upstream).backward()

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    expected, expected_ce = float64_loss(term, hidden64, weight64, targets, ce_weight, kl)
    (expected * upstream).backward()
    tolerance = TOLERANCE[dtype]
    assert got.item() == pytest.approx(expected.item(), rel=tolerance)
    torch.testing.assert_close(token_ce.double(), expected_ce.detach(), rtol=tolerance, atol=tolerance)
    for name, have, want in (("hidden", hidden.grad, hidden64.grad), ("weight", weight.grad, weight64.grad)):
        difference = (have.double() - want).abs().max().item()
        assert difference <= tolerance * want.abs().max().item() * 4, (name, difference)


def test_a_sequence_longer_than_a_chunk_takes_the_first_pass(monkeypatch):
    monkeypatch.setattr(module, "default_chunk_size", lambda vocab_size: 4)  # the 5-token sequence does not fit
    term = make_term("npo")
    assert term.spans(4) is None
    first_passes = []
    original = module.fused_linear_ce_kl

    def counted(*args, **kwargs):
        first_passes.append(not torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "fused_linear_ce_kl", counted)
    hidden, weight, targets, ce_weight, kl = inputs(torch.float32, False)
    got, _, _ = fused_linear_sequence_forget(hidden, weight, targets, ce_weight, sequence_forget=term,
                                             backend="chunked")
    assert first_passes == [True, False]  # the first pass without a gradient, then the fused pass
    expected, _ = float64_loss(term, hidden.detach(), weight.detach(), targets, ce_weight, kl)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_spans_pack_whole_sequences_and_refuse_split_ones():
    term = make_term("simnpo")
    assert term.spans(14) == ((0, 14),)
    assert term.spans(5) == ((0, 3), (3, 8), (8, 10), (10, 14))  # (3) (5) (2) (4): 2+4 > 5
    assert term.spans(8) == ((0, 8), (8, 14))
    split = SequenceForget(**{**vars(term), "token_sequence": torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 2, 2, 3, 3])})
    assert split.spans(14) is None  # sequence 0 is not contiguous
