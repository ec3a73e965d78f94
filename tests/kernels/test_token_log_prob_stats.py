"""``token_log_prob_stats``: every backend against the float64 materialised formula written here.

Without CUDA the triton backend runs in Triton's interpreter (``TRITON_INTERPRET`` is set before any kernel module
is decorated, as in test_triton_ce_kl.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsunlearn.kernels import token_log_prob_stats  # noqa: E402
from dsunlearn.kernels.token_log_prob_stats import chunked_token_log_prob_stats  # noqa: E402

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
BACKENDS = ["torch", "chunked", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol) per input dtype: fp32 inputs must match the float64 formula to fp32 rounding; bf16 inputs are
# compared with the formula on the same bf16 values, so only the fp32 accumulation differs.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-4)}


def expected_stats(hidden, weight, targets, softcap=None):
    """(log p(target), E_p[log p], Var_p[log p]) in float64 from the materialised log-probabilities."""
    logits = hidden.double() @ weight.double().T  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)
    variance = (probs * (log_probs - mean[:, None]) ** 2).sum(-1)
    return log_probs.gather(1, targets[:, None].to(logits.device)).squeeze(1), mean, variance


def random_problem(num_tokens, hidden_size, vocab_size, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * scale * hidden_size**-0.5
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)


def assert_stats_close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    for name, got, want in zip(("target_log_prob", "mean", "variance"), actual, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 19, 1013), (1, 8, 5), (5, 16, 4099)])
def test_each_backend_equals_the_float64_formula(backend, dtype, shape):
    hidden, weight, targets = random_problem(*shape, dtype=dtype, seed=sum(shape))
    actual = token_log_prob_stats(hidden, weight, targets, backend=backend)
    assert_stats_close(actual, expected_stats(hidden, weight, targets), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap(backend):
    hidden, weight, targets = random_problem(11, 12, 777, torch.float32, seed=3, scale=20.0)
    actual = token_log_prob_stats(hidden, weight, targets, softcap=5.0, backend=backend)
    assert_stats_close(actual, expected_stats(hidden, weight, targets, softcap=5.0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_close_together(backend):
    """Logits near 1e4 that differ by O(1): E[z²] − E[z]² in fp32 would lose the whole variance (z² ~ 1e8 has an
    ulp of 8), the centred moments keep it."""
    hidden, weight, targets = random_problem(9, 6, 1500, torch.float32, seed=5, scale=1.0)
    offset_hidden = torch.cat([hidden, torch.full((9, 1), 1.0e4, device=DEVICE)], dim=1)  # [N, H+1]
    offset_weight = torch.cat([weight, torch.ones(1500, 1, device=DEVICE)], dim=1)  # every logit + 1e4
    actual = token_log_prob_stats(offset_hidden, offset_weight, targets, backend=backend)
    expected = expected_stats(hidden, weight, targets)  # the shift changes no log-probability
    # Each fp32 logit near 1e4 is rounded to ~5e-4 before any statistic: that, not the reduction, sets the bound.
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=0, atol=5e-3)
    logits = offset_hidden @ offset_weight.T
    probs = torch.softmax(logits, -1)
    naive_variance = (probs * logits.square()).sum(-1) - (probs * logits).sum(-1).square()
    assert (naive_variance.double().cpu() - expected[2].cpu()).abs().max() > 0.1  # the failure the design avoids


def test_chunked_merges_vocabulary_blocks_exactly():
    """Blocks of 7 columns over V = 100 (not a multiple): many merges, a last block shorter than the others."""
    hidden, weight, targets = random_problem(13, 10, 100, torch.float32, seed=7, scale=8.0)
    actual = chunked_token_log_prob_stats(hidden, weight, targets, vocab_block=7)
    assert_stats_close(actual, expected_stats(hidden, weight, targets), torch.float32)


def test_no_gradient_and_bad_inputs_rejected():
    hidden, weight, targets = random_problem(4, 8, 50, torch.float32, seed=1)
    hidden.requires_grad_()
    outputs = token_log_prob_stats(hidden, weight, targets, backend="chunked")
    assert not any(output.requires_grad for output in outputs)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\)"):
        token_log_prob_stats(hidden, weight, torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="backend must be one of"):
        token_log_prob_stats(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="softcap"):
        token_log_prob_stats(hidden, weight, targets, softcap=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_float64_with_several_chunks(dtype, monkeypatch):
    """The compiled kernel over several chunks of rows, a vocabulary that is not a multiple of the block."""
    from dsunlearn.kernels.triton_token_log_prob_stats import triton_token_log_prob_stats

    # TF32 would change fp32 products; the contract is fp32 accumulation of fp32 products.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hidden, weight, targets = random_problem(300, 64, 5003, dtype, seed=11)
    actual = triton_token_log_prob_stats(hidden, weight, targets, softcap=None, chunk_rows=128)
    assert_stats_close(actual, expected_stats(hidden, weight, targets), dtype)
