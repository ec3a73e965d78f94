"""The objective's slots (forget ga/npo/simnpo, retain kl/nll) against a float64 implementation written here: the
loss the policy head returns and its gradients (hidden and head weight), on every backend the CPU runs (torch,
chunked, and triton in its interpreter), both reductions, packed and padded layouts; and the npo/simnpo derivative
against autograd.

The head is the one the trainer uses (engines._attach_fused_loss on an nn.Linear): the first pass over the forget
tokens, the reweighting and the surrogate value are the trainer's code.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernel is decorated (test_triton_ce_kl)

from dsunlearn.data.tokenization import TokenizedSequence  # noqa: E402
from dsunlearn.objective import (  # noqa: E402
    FORGET,
    NORMAL,
    RANDOM,
    SequenceForget,
    build_step_batch,
    reference_reads,
)
from dsunlearn.runtime.engines import _attach_fused_loss  # noqa: E402
from dsunlearn.settings.config import ObjectiveConfig  # noqa: E402

BACKENDS = ["torch", "chunked"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# Relative tolerance of loss and gradients per input dtype, as for the fused loss's own terms (DESIGN.md §7).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
VOCAB, HIDDEN = 61, 19


def seq(prompt, response):
    return TokenizedSequence(input_ids=list(prompt) + list(response),
                             response_mask=[0] * len(prompt) + [1] * len(response))


def step_sequences(generator):
    """Forget sequences of several lengths (3 of them), random answers (K=2) and normal sequences (2)."""

    def tokens(n):
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    forget = [seq(tokens(3), tokens(5)), seq(tokens(2), tokens(2)), seq(tokens(4), tokens(7))]
    random = [seq(tokens(3), tokens(2)) for _ in range(6)]
    normal = [seq(tokens(2), tokens(4)), seq(tokens(3), tokens(3))]
    return forget, random, normal


def float64_objective(batch, hidden, weight, ref_rows, ref_weight, objective, reference_sums, step_tokens, micro):
    """The objective in float64 from the formulas (objective.py's docstring), with materialised logits."""
    logits = hidden.double() @ weight.double().T  # [M, V]
    token_ce = -torch.log_softmax(logits, -1).gather(1, batch.targets[:, None])[:, 0]  # [M]
    term = batch.sequence_term
    lengths = batch.sequence_length.double()
    num_sequences = term.numel()
    sequence_ce = torch.zeros(num_sequences, dtype=torch.float64).index_add(0, batch.token_sequence, token_ce)  # sums
    weights = {FORGET: objective.forget_weight, RANDOM: objective.random_weight, NORMAL: objective.normal_weight}

    def sequence_scale(of_term):
        """c_s per sequence of the term: the weight of its per-sequence value (mean over its tokens for the linear
        terms, L(y) for npo/simnpo)."""
        if objective.reduction == "sequence_mean":
            return torch.full((int(of_term.sum()),), weights[int(term[of_term][0])] / int(of_term.sum()),
                              dtype=torch.float64)
        return weights[int(term[of_term][0])] * micro * lengths[of_term] / step_tokens[int(term[of_term][0])]

    loss = torch.zeros((), dtype=torch.float64)
    forget = term == FORGET
    s_theta = -sequence_ce[forget]
    n = lengths[forget]
    if objective.forget_loss == "ga":
        forget_values = s_theta / n  # -CE, mean over the sequence's tokens
    elif objective.forget_loss == "npo":
        beta = objective.npo_beta
        forget_values = -2 / beta * torch.nn.functional.logsigmoid(-beta * (s_theta - reference_sums))
    else:
        beta, delta = objective.simnpo_beta, objective.simnpo_delta
        forget_values = -2 / beta * torch.nn.functional.logsigmoid(beta * (-s_theta / n - delta))
    loss = loss + (sequence_scale(forget) * forget_values).sum()
    random = term == RANDOM
    loss = loss + (sequence_scale(random) * sequence_ce[random] / lengths[random]).sum()
    normal = term == NORMAL
    if objective.retain_loss == "nll":
        loss = loss + (sequence_scale(normal) * sequence_ce[normal] / lengths[normal]).sum()
    else:
        ref_log_probs = torch.log_softmax(ref_rows.double() @ ref_weight.double().T, -1)
        token_kl = (ref_log_probs.exp() * (ref_log_probs - torch.log_softmax(logits, -1))).sum(-1)
        sequence_kl = torch.zeros(num_sequences, dtype=torch.float64).index_add(0, batch.token_sequence, token_kl)
        loss = loss + (sequence_scale(normal) * sequence_kl[normal] / lengths[normal]).sum()
    return loss


CASES = [
    # (forget_loss, retain_loss, reduction, layout)
    ("npo", "nll", "sequence_mean", "packed"),
    ("npo", "nll", "token_mean", "padded"),
    ("npo", "kl", "token_mean", "packed"),
    ("simnpo", "nll", "sequence_mean", "padded"),
    ("simnpo", "nll", "token_mean", "packed"),
    ("simnpo", "kl", "sequence_mean", "packed"),
    ("ga", "nll", "sequence_mean", "packed"),
    ("ga", "nll", "token_mean", "padded"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("forget_loss, retain_loss, reduction, layout", CASES)
def test_loss_and_gradients_match_float64(forget_loss, retain_loss, reduction, layout, dtype, backend):
    generator = torch.Generator().manual_seed(hash((forget_loss, retain_loss, reduction, layout)) % 2**31)
    forget, random, normal = step_sequences(generator)
    # simnpo_delta non-zero and weights other than 1, so every constant is exercised
    objective = ObjectiveConfig(forget_loss=forget_loss, retain_loss=retain_loss, reduction=reduction,
                                forget_weight=0.7, random_weight=0.3, normal_weight=1.3, num_random_answers=2,
                                simnpo_delta=0.5, npo_beta=0.4)
    # token_mean: the step's tokens per term are this micro-batch's and another's as large (2 micro-batches)
    step_tokens = torch.tensor([sum(sum(s.response_mask) for s in group) for group in (forget, random, normal)]) * 2
    micro = 2
    reference_sums = -torch.rand(len(forget), generator=generator, dtype=torch.float64) * 20 - 10  # s_ref < 0
    batch = build_step_batch(forget, random, normal, pad_id=0, objective=objective, step_term_tokens=step_tokens,
                             micro_batches_per_step=micro, layout=layout,
                             forget_reference_sums=reference_sums if forget_loss == "npo" else None)
    assert (batch.sequence_forget is None) == (forget_loss == "ga")
    assert (batch.kl_weight is None) == (retain_loss == "nll") and (batch.ref_segment is None) == (retain_loss == "nll")

    num_tokens = batch.targets.numel()
    hidden = (torch.randn(num_tokens, HIDDEN, generator=generator) * 0.8).to(dtype).requires_grad_()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) * 0.8)
    head = head.to(dtype)
    ref_rows = torch.randn(num_tokens, HIDDEN, generator=generator).to(dtype)
    ref_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    _attach_fused_loss(head, None, backend)

    loss_inputs = {"targets": batch.targets, "ce_weight": batch.ce_weight, "sequence_forget": batch.sequence_forget}
    if batch.kl_weight is not None:
        loss_inputs.update(ref_hidden=ref_rows, ref_head=ref_head, kl_weight=batch.kl_weight)
    loss, token_ce, _ = head(hidden, **loss_inputs)
    loss.backward()

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = head.weight.detach().double().requires_grad_()
    expected = float64_objective(batch, hidden64, weight64, ref_rows, ref_head.weight.detach(), objective,
                                 reference_sums, step_tokens.double(), micro)
    expected.backward()
    tolerance = TOLERANCE[dtype]
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance, abs=tolerance * 1e-2)
    # every response token's CE comes back (the forget ones from the first pass), for the logged terms
    log_probs = torch.log_softmax(hidden64.detach() @ weight64.detach().T, -1)  # [M, V]
    expected_ce = -log_probs.gather(1, batch.targets[:, None])[:, 0]
    torch.testing.assert_close(token_ce.double(), expected_ce, rtol=tolerance, atol=tolerance)
    for name, got, want in (("hidden", hidden.grad, hidden64.grad), ("weight", head.weight.grad, weight64.grad)):
        scale = want.abs().max().item()
        difference = (got.double() - want).abs().max().item()
        assert difference <= tolerance * scale * 4, (name, difference, scale)


@pytest.mark.parametrize("loss_name", ["npo", "simnpo"])
def test_token_weights_are_the_derivative_of_the_sequence_loss(loss_name):
    """-dL/dCE_t = -c_s dL/ds for every token of sequence s, from autograd in float64, and the value by hand."""
    token_sequence = torch.tensor([0, 0, 0, 1, 2, 2])
    lengths = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    term = SequenceForget(
        loss=loss_name, beta=0.1 if loss_name == "npo" else 4.5, delta=0.0 if loss_name == "npo" else 0.3,
        num_tokens=6, token_sequence=token_sequence, sequence_length=lengths,
        sequence_weight=torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64),
        reference_sums=torch.tensor([-4.0, -1.0, -9.0], dtype=torch.float64) if loss_name == "npo" else None,
    )
    token_ce = torch.tensor([1.0, 2.5, 0.5, 3.0, 7.0, 0.25], dtype=torch.float64, requires_grad=True)
    total = (term.sequence_weight * term.sequence_losses(token_ce)).sum()
    (gradient,) = torch.autograd.grad(total, token_ce)
    torch.testing.assert_close(term.token_weights(token_ce.detach()).double(), gradient, rtol=1e-6, atol=0)

    # The first sequence by hand: s = -4, n = 3.
    s = -(1.0 + 2.5 + 0.5)
    if loss_name == "npo":  # L = -(2/b) log sigmoid(-b (s - s_ref)), s - s_ref = 0: L = (2/b) log 2 = 20 log 2
        hand = 20 * math.log(2)
    else:  # L = -(2/b) log sigmoid(b (-s/n - delta)) with -s/n - delta = 4/3 - 0.3
        x = 4.5 * (4 / 3 - 0.3)
        hand = -(2 / 4.5) * math.log(1 / (1 + math.exp(-x)))
    assert term.sequence_losses(token_ce.detach())[0].item() == pytest.approx(hand, rel=1e-12)
    assert s == -4.0


def test_npo_needs_the_reference_sums_and_retain_nll_needs_no_reference():
    generator = torch.Generator().manual_seed(0)
    forget, random, normal = step_sequences(generator)
    with pytest.raises(ValueError, match="s_ref"):
        build_step_batch(forget, random, normal, pad_id=0, objective=ObjectiveConfig(forget_loss="npo"))
    batch = build_step_batch(forget, [], normal, pad_id=0,
                             objective=ObjectiveConfig(retain_loss="nll", random_weight=0.0, normal_weight=2.0))
    assert batch.kl_weight is None and batch.ref_segment is None
    normal_tokens = batch.sequence_term[batch.token_sequence] == NORMAL
    lengths = batch.sequence_length[batch.token_sequence][normal_tokens].float()
    # e3 / (n_s * B_n) on the normal tokens' CE, as the KL's weights were
    torch.testing.assert_close(batch.ce_weight[normal_tokens], 2.0 / (lengths * 2))


def test_settings_reject_bad_slot_values():
    problems = ObjectiveConfig(forget_loss="dpo", retain_loss="l2", npo_beta=0.0, simnpo_beta=-1.0,
                               simnpo_delta=float("nan")).problems()
    assert any("forget_loss='dpo'" in p for p in problems)
    assert any("retain_loss='l2'" in p for p in problems)
    assert any("npo_beta=0.0" in p for p in problems)
    assert any("simnpo_beta=-1.0" in p for p in problems)
    assert any("simnpo_delta=nan" in p for p in problems)


@pytest.mark.parametrize("preset, reads", [("yao", (True, False)), ("ga", (False, False)),
                                           ("graddiff", (False, False)), ("npo", (False, True)),
                                           ("simnpo", (False, False))])
def test_presets_set_the_slots_and_only_kl_and_npo_read_the_reference(preset, reads):
    """Each bundled preset through the CLI's own parser (one --config flag), and which of them builds a reference."""
    from dsunlearn.settings.config import parse_run_config

    cfg, _ = parse_run_config(["--config", "configs/demo.yaml", "--config", f"configs/presets/{preset}.yaml",
                               "--model.name_or_path", "unused/model"])
    expected = {
        "yao": ("ga", "kl", 0.5, 1.0, 1.0), "ga": ("ga", "nll", 1.0, 0.0, 0.0),
        "graddiff": ("ga", "nll", 1.0, 0.0, 1.0), "npo": ("npo", "nll", 1.0, 0.0, 1.0),
        "simnpo": ("simnpo", "nll", 0.125, 0.0, 1.0),
    }[preset]
    o = cfg.objective
    assert (o.forget_loss, o.retain_loss, o.forget_weight, o.random_weight, o.normal_weight) == expected
    assert (o.npo_beta, o.simnpo_beta, o.simnpo_delta) == (0.1, 4.5, 0.0)  # open-unlearning's NPO.yaml, SimNPO.yaml
    assert reference_reads(o) == reads


def test_a_run_without_the_kl_term_logs_no_normal_kl():
    from dsunlearn.objective import term_means, term_sums

    generator = torch.Generator().manual_seed(1)
    forget, _, normal = step_sequences(generator)
    batch = build_step_batch(forget, [], normal, pad_id=0,
                             objective=ObjectiveConfig(retain_loss="nll", random_weight=0.0))
    token_ce = torch.rand(batch.targets.numel(), generator=generator)
    means = term_means(term_sums(batch, token_ce, torch.zeros_like(token_ce)))
    assert means["normal_kl"] is None and means["random_ce"] is None
    normal_sequence_ce = [float(token_ce[batch.token_sequence == i].mean()) for i in (3, 4)]
    assert means["normal_ce"] == pytest.approx(sum(normal_sequence_ce) / 2)
