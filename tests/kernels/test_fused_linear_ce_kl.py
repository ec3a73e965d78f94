"""The ``torch``, ``chunked`` and ``compiled`` backends of ``fused_linear_ce_kl`` against a float64 formula written
here. The compiled graphs are module globals of ``dsunlearn.kernels.compiled``: every test here shares them (one
compilation per graph for the whole file, the chunk's row count being dynamic)."""

import functools
import math

import pytest
import torch

import dsunlearn.kernels.backends as backends
import dsunlearn.kernels.ce_kl as ce_kl
import dsunlearn.kernels.chunked as chunked
from dsunlearn.kernels import fused_linear_ce_kl
from dsunlearn.kernels.chunked import chunked_fused_linear_ce_kl
from dsunlearn.kernels.compiled import compiled_fused_linear_ce_kl

IGNORE_INDEX = -100

# Each entry is called like the public function minus ``backend``. "chunked-5" forces several chunks
# (with a partial last one and chunks mixing KL and non-KL rows); the default budget fits these shapes in one.
# "compiled-5" likewise (its chunks stop at the boundary between rows without and with KL).
IMPLEMENTATIONS = {
    "torch": functools.partial(fused_linear_ce_kl, backend="torch"),
    "chunked": functools.partial(fused_linear_ce_kl, backend="chunked"),
    "chunked-5": functools.partial(chunked_fused_linear_ce_kl, chunk_size=5),
    "compiled": functools.partial(fused_linear_ce_kl, backend="compiled"),
    "compiled-5": functools.partial(compiled_fused_linear_ce_kl, chunk_rows=5),
}
SHAPES = {"odd": (37, 1013, 19), "small": (6, 8, 4)}  # (N, V, H)


def float64_formula(hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight, softcap):
    """Loss, grads of hidden and weight, per-token CE and KL: materialised logits, autograd, float64.

    Written from the contract: CE_i = logsumexp(z_i) − z_i[t_i], KL_i = Σ_v p_ref (log p_ref − log p_θ).
    """
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    ce_weight = ce_weight.double()
    kl_weight = torch.zeros_like(ce_weight) if kl_weight is None else kl_weight.double()

    def head(h, w):
        z = h @ w.T
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    logits = head(hidden, weight)
    vocab_size = logits.shape[1]
    has_weight = (ce_weight != 0) | (kl_weight != 0)
    has_target = (targets >= 0) & (targets < vocab_size)
    target_logits = logits.gather(1, targets.clamp(0, vocab_size - 1)[:, None])[:, 0]
    token_ce = torch.where(has_weight & has_target, torch.logsumexp(logits, 1) - target_logits, 0.0)
    loss = (ce_weight * token_ce).sum()

    token_kl = torch.zeros_like(token_ce)
    if ref_hidden is not None:
        ref_log_probs = torch.log_softmax(head(ref_hidden.double(), ref_weight.double()), 1)
        kl = (ref_log_probs.exp() * (ref_log_probs - torch.log_softmax(logits, 1))).sum(1)
        token_kl = torch.where(kl_weight != 0, kl, 0.0)
        loss = loss + (kl_weight * token_kl).sum()

    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    # Scale against which absolute errors are judged: the loss if every term added up with the same sign.
    loss_scale = ((ce_weight * token_ce).abs().sum() + (kl_weight * token_kl).abs().sum()).item()
    return loss.detach(), grad_hidden, grad_weight, token_ce.detach(), token_kl.detach(), loss_scale


def assert_close_relative(actual, expected, rel, scale=None):
    """max |actual − expected| <= rel · scale, scale defaulting to max |expected| (so near-zero entries are fine)."""
    actual, expected = actual.double(), expected.double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * max(scale, 1e-12), f"max abs error {error:.3g} > {rel} x scale {scale:.3g}"


def make_inputs(num_tokens, vocab_size, hidden_size, terms, dtype=torch.float32, ref_dtype=None, seed=0):
    """Random inputs with weights mixing positive, negative and zero values and garbage targets on unused tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) / 2).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    choices = torch.tensor([-1.0, 0.0, 0.5, 2.0, 0.0])
    ce_weight = choices[torch.randint(0, len(choices), (num_tokens,), generator=generator)]
    kl_weight = choices[torch.randint(0, len(choices), (num_tokens,), generator=generator)].abs()
    if terms == "ce":
        kl_weight = None
    if terms == "kl":
        ce_weight = torch.zeros(num_tokens)
    # At least one token per term even in tiny shapes.
    if terms != "kl":
        ce_weight[0] = 1.5
    if kl_weight is not None:
        kl_weight[-1] = 1.0
    # Tokens without CE may hold any target (a KL-only one then has no CE to report).
    without_ce = ce_weight == 0
    garbage = torch.where(torch.arange(num_tokens) % 2 == 0, IGNORE_INDEX, vocab_size + 3)
    targets = torch.where(without_ce & (torch.arange(num_tokens) % 3 != 1), garbage, targets)
    ref_hidden = ref_weight = None
    if kl_weight is not None:
        ref_dtype = ref_dtype or dtype
        ref_hidden = (hidden.detach().float() + torch.randn(num_tokens, hidden_size, generator=generator)).to(ref_dtype)
        ref_weight = (weight.detach().float() + torch.randn(vocab_size, hidden_size, generator=generator) / 4).to(dtype)
    return hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight


def run(implementation, inputs, softcap=None, upstream=2.5):
    """Loss, token terms and the grads of hidden and weight after ``(loss * upstream).backward()``."""
    hidden, weight = inputs[:2]
    hidden.grad = weight.grad = None
    loss, token_ce, token_kl = implementation(*inputs, softcap=softcap, return_token_terms=True)
    (loss * upstream).backward()
    return loss, token_ce, token_kl, hidden.grad, weight.grad


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("terms", ["ce", "kl", "both"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_fp32_matches_float64_formula(name, shape, terms, softcap):
    inputs = make_inputs(*shape, terms)
    upstream = 2.5
    loss, token_ce, token_kl, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs, softcap, upstream)
    expected_loss, expected_grad_hidden, expected_grad_weight, expected_ce, expected_kl, loss_scale = float64_formula(
        *inputs, softcap
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)
    assert_close_relative(grad_hidden, upstream * expected_grad_hidden, 1e-5)
    assert_close_relative(grad_weight, upstream * expected_grad_weight, 1e-5)
    assert_close_relative(token_ce, expected_ce, 1e-5)
    assert_close_relative(token_kl, expected_kl, 1e-5)
    assert token_ce.dtype == token_kl.dtype == torch.float32
    assert not token_ce.requires_grad and not token_kl.requires_grad
    if terms != "ce":
        assert (token_kl > 0).any()  # the KL term was really exercised


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_bf16_inputs_fp32_reference_inputs(name):
    inputs = make_inputs(*SHAPES["odd"], "both", dtype=torch.bfloat16, ref_dtype=torch.float32)
    loss, token_ce, token_kl, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs, upstream=-1.5)
    # The formula sees exactly the bf16 values, upcast.
    expected_loss, expected_grad_hidden, expected_grad_weight, expected_ce, expected_kl, loss_scale = float64_formula(
        *inputs, None
    )
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert_close_relative(loss, expected_loss, 1e-2, scale=loss_scale)
    assert_close_relative(grad_hidden, -1.5 * expected_grad_hidden, 1e-2)
    assert_close_relative(grad_weight, -1.5 * expected_grad_weight, 1e-2)
    assert_close_relative(token_ce, expected_ce, 1e-2)
    assert_close_relative(token_kl, expected_kl, 1e-2)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_reference_of_another_width(name, softcap):
    # reference_path may name another model with the same vocabulary: ref_hidden [N, H_ref], ref_weight [V, H_ref].
    num_tokens, vocab_size, hidden_size = SHAPES["odd"]
    hidden, weight, targets, ce_weight, _, _, kl_weight = make_inputs(*SHAPES["odd"], "both")
    generator = torch.Generator().manual_seed(2)
    ref_hidden = torch.randn(num_tokens, hidden_size + 13, generator=generator).requires_grad_()
    ref_weight = (torch.randn(vocab_size, hidden_size + 13, generator=generator) / 2).requires_grad_()
    inputs = (hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight)
    loss, token_ce, token_kl, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs, softcap, upstream=-1.5)
    expected_loss, expected_grad_hidden, expected_grad_weight, expected_ce, expected_kl, loss_scale = float64_formula(
        *inputs, softcap
    )
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)
    assert_close_relative(grad_hidden, -1.5 * expected_grad_hidden, 1e-5)
    assert_close_relative(grad_weight, -1.5 * expected_grad_weight, 1e-5)
    assert_close_relative(token_ce, expected_ce, 1e-5)
    assert_close_relative(token_kl, expected_kl, 1e-5)
    assert (token_kl > 0).any()
    assert ref_hidden.grad is None and ref_weight.grad is None


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_bf16_head_cast_block_by_block_accumulates_in_fp32(monkeypatch, chunk_size, softcap):
    # Vocabulary blocks of 100 rows (the last one 13): the fp32 cast of W and W_ref is made per block, never whole.
    num_tokens, vocab_size, hidden_size = SHAPES["odd"]
    monkeypatch.setattr(chunked, "WEIGHT_BLOCK_BYTES", 4 * hidden_size * 100)
    inputs = make_inputs(num_tokens, vocab_size, hidden_size, "both", dtype=torch.bfloat16)
    implementation = functools.partial(chunked_fused_linear_ce_kl, chunk_size=chunk_size)
    loss, token_ce, token_kl, grad_hidden, grad_weight = run(implementation, inputs, softcap, upstream=-1.5)
    expected_loss, expected_grad_hidden, expected_grad_weight, expected_ce, expected_kl, loss_scale = float64_formula(
        *inputs, softcap
    )
    # fp32 accumulation on the exact bf16 values: the loss and the token terms are fp32-accurate; the gradients
    # are rounded once to bf16 (relative step 2^-8).
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)
    assert_close_relative(token_ce, expected_ce, 1e-5)
    assert_close_relative(token_kl, expected_kl, 1e-5)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert_close_relative(grad_hidden, -1.5 * expected_grad_hidden, 2**-8)
    assert_close_relative(grad_weight, -1.5 * expected_grad_weight, 2**-8)


def test_hand_derived_two_token_vocabulary():
    # V = 2, H = 1, one token: hidden = 1, weight = [ln 3, 0] → z = [ln 3, 0], p_θ = [3/4, 1/4].
    # Reference weight [0, 0] → p_ref = [1/2, 1/2]. Target 1, ce_weight 2, kl_weight 3.
    #   CE = logsumexp(z) − z[1] = ln(3 + 1) − 0 = ln 4
    #   KL = ½(ln ½ − ln ¾) + ½(ln ½ − ln ¼) = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3)
    #   loss = 2 ln 4 + 3 · ½ ln(4/3)
    #   dL/dz = (2 + 3)·[¾, ¼] − 2·[0, 1] − 3·[½, ½] = [9/4, −9/4]
    #   dL/dweight = dL/dz ⊗ hidden = [[9/4], [−9/4]];  dL/dhidden = dL/dz · weight = (9/4) ln 3
    hand_loss = 2 * math.log(4) + 1.5 * math.log(4 / 3)
    for name, implementation in IMPLEMENTATIONS.items():
        hidden = torch.tensor([[1.0]], requires_grad=True)
        weight = torch.tensor([[math.log(3)], [0.0]], requires_grad=True)
        loss, token_ce, token_kl = implementation(
            hidden,
            weight,
            torch.tensor([1]),
            torch.tensor([2.0]),
            torch.tensor([[1.0]]),
            torch.zeros(2, 1),
            torch.tensor([3.0]),
            return_token_terms=True,
        )
        loss.backward()
        assert loss.item() == pytest.approx(hand_loss, rel=1e-6), name
        assert token_ce.item() == pytest.approx(math.log(4), rel=1e-6), name
        assert token_kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6), name
        torch.testing.assert_close(weight.grad, torch.tensor([[2.25], [-2.25]]))
        torch.testing.assert_close(hidden.grad, torch.tensor([[2.25 * math.log(3)]]))


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_all_masked_costs_nothing(name):
    hidden, weight, targets, _, ref_hidden, ref_weight, _ = make_inputs(*SHAPES["odd"], "both")
    targets = torch.full_like(targets, IGNORE_INDEX)
    zeros = torch.zeros(len(targets))
    inputs = (hidden, weight, targets, zeros, ref_hidden, ref_weight, zeros)
    loss, token_ce, token_kl, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs)
    assert loss.item() == 0.0
    assert not token_ce.any() and not token_kl.any()
    assert not grad_hidden.any() and not grad_weight.any()
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_kl_is_zero_when_reference_equals_policy(name):
    hidden, weight, targets, ce_weight, _, _, kl_weight = make_inputs(*SHAPES["odd"], "both")
    ref_hidden, ref_weight = hidden.detach().clone(), weight.detach().clone()
    inputs = (hidden, weight, targets, torch.zeros_like(ce_weight), ref_hidden, ref_weight, kl_weight)
    loss, _, token_kl, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs, softcap=4.0)
    assert abs(loss.item()) <= 1e-6
    assert token_kl.abs().max().item() <= 1e-6
    # KL's gradient vanishes at ref == policy too.
    assert grad_hidden.abs().max().item() <= 1e-5 and grad_weight.abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_gradients_reach_hidden_and_weight_only(name):
    hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight = make_inputs(*SHAPES["small"], "both")
    ref_hidden.requires_grad_()
    ref_weight.requires_grad_()
    ce_weight.requires_grad_()
    kl_weight.requires_grad_()
    loss = IMPLEMENTATIONS[name](hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert ce_weight.grad is None and kl_weight.grad is None


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_frozen_head_or_frozen_hidden(name):
    inputs = make_inputs(*SHAPES["odd"], "both")
    _, expected_grad_hidden, expected_grad_weight, *_ = float64_formula(*inputs, None)
    hidden, weight = inputs[:2]

    weight.requires_grad_(False)
    IMPLEMENTATIONS[name](*inputs).backward()
    assert weight.grad is None
    assert_close_relative(hidden.grad, expected_grad_hidden, 1e-5)

    hidden.grad = None
    hidden.requires_grad_(False)
    weight.requires_grad_(True)
    IMPLEMENTATIONS[name](*inputs).backward()
    assert hidden.grad is None
    assert_close_relative(weight.grad, expected_grad_weight, 1e-5)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_no_grad_and_inputs_without_grad(name):
    inputs = make_inputs(*SHAPES["odd"], "both")
    expected_loss, *_, loss_scale = float64_formula(*inputs, None)
    with torch.no_grad():
        loss = IMPLEMENTATIONS[name](*inputs)
    assert not loss.requires_grad
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)

    detached = (inputs[0].detach(), inputs[1].detach(), *inputs[2:])
    loss = IMPLEMENTATIONS[name](*detached)
    assert not loss.requires_grad
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)


@pytest.mark.parametrize("upstream", [2.0**12, 1.0], ids=["loss_scale_2^12", "upstream_1"])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_fp16_gradients_of_small_token_weights_keep_fp16_precision(name, upstream):
    # As tests/kernels/test_triton_ce_kl.py checks for the triton backend: the objective's weights (~1e-3) and a
    # near-uniform softmax put the gradients below fp16's normal range until the upstream gradient (a loss scale)
    # is applied; these backends keep them in fp32 until then, so they come out as the exact ones rounded to fp16.
    hidden, _, targets, ce_weight, ref_hidden, _, kl_weight = make_inputs(*SHAPES["odd"], "both", dtype=torch.float16)
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(SHAPES["odd"][1], SHAPES["odd"][2], generator=generator) * 0.02
    weight = head.half().requires_grad_()
    ref_weight = (head + torch.randn(head.shape, generator=generator) * 0.002).half()
    inputs = (hidden, weight, targets, ce_weight * 1e-3, ref_hidden, ref_weight, kl_weight * 1e-3)
    *_, grad_hidden, grad_weight = run(IMPLEMENTATIONS[name], inputs, upstream=upstream)
    _, exact_grad_hidden, exact_grad_weight, *_ = float64_formula(*inputs, None)
    active = (inputs[3] != 0) | (inputs[6] != 0)
    for actual, exact in ((grad_hidden[active], exact_grad_hidden[active]), (grad_weight, exact_grad_weight)):
        assert actual.dtype == torch.float16
        rounded = (upstream * exact).to(torch.float16)
        assert not ((actual == 0) & (rounded != 0)).any()
        assert (actual == rounded).double().mean() > 0.9


def test_backward_twice_with_retain_graph():
    inputs = make_inputs(*SHAPES["small"], "both")
    hidden = inputs[0]
    loss = fused_linear_ce_kl(*inputs, backend="chunked")
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


@pytest.mark.parametrize(
    "vocab_size, dtype, expected",
    [(2**16, torch.float32, "compiled"), (2**16, torch.bfloat16, "chunked"), (2**16 - 1, torch.float32, "chunked")],
)
def test_auto_backend_on_cpu_is_compiled_for_a_large_fp32_head_else_chunked(monkeypatch, vocab_size, dtype, expected):
    # H = 64: 2^16 x 64 = 2^22 weights, COMPILE_MIN_HEAD_WEIGHTS; one vocabulary row fewer stays on chunked.
    assert backends.COMPILE_MIN_HEAD_WEIGHTS == 2**16 * 64
    calls = []

    def recording(name):
        def record(hidden, *args, **kwargs):
            calls.append((name, kwargs))
            return hidden.sum()  # only the choice matters here

        return record

    monkeypatch.setattr(ce_kl, "chunked_fused_linear_ce_kl", recording("chunked"))
    monkeypatch.setattr(ce_kl, "compiled_fused_linear_ce_kl", recording("compiled"))
    inputs = make_inputs(4, vocab_size, 64, "ce", dtype=dtype)
    fused_linear_ce_kl(*inputs, softcap=3.0, backend="auto")
    assert calls == [(expected, {"softcap": 3.0, "return_token_terms": False})]


def test_autocast_does_not_lower_precision():
    inputs = make_inputs(*SHAPES["odd"], "both")
    expected_loss, *_, loss_scale = float64_formula(*inputs, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_ce_kl(*inputs, backend="chunked")
    assert_close_relative(loss, expected_loss, 1e-5, scale=loss_scale)


def _valid_small():
    hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight = make_inputs(*SHAPES["small"], "both")
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        ce_weight=ce_weight,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        kl_weight=kl_weight,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be 2-D"),
        (lambda a: a.update(weight=torch.randn(8, 5)), "weight must have shape"),
        (lambda a: a.update(targets=a["targets"][:-1]), "targets must have shape"),
        (lambda a: a.update(targets=a["targets"].int()), "targets must have dtype"),
        (lambda a: a.update(ce_weight=torch.ones(7)), "ce_weight must have shape"),
        (lambda a: a.update(ce_weight=torch.ones(6, dtype=torch.long)), "ce_weight must be a floating-point"),
        (lambda a: a.update(kl_weight=torch.ones(5)), "kl_weight must have shape"),
        (lambda a: a.update(ref_hidden=None), "kl_weight needs both ref_hidden and ref_weight"),
        (lambda a: a.update(ref_weight=None), "kl_weight needs both ref_hidden and ref_weight"),
        (lambda a: a.update(kl_weight=None), "without kl_weight"),
        (lambda a: a.update(ref_hidden=torch.randn(5, 4)), r"ref_hidden must have shape \[6, H_ref\]"),
        (lambda a: a.update(ref_hidden=torch.randn(6, 5)), r"ref_weight must have shape \[8, 5\]"),
        (lambda a: a.update(ref_weight=torch.randn(9, 4)), r"ref_weight must have shape \[8, 4\]"),
        (lambda a: a.update(hidden=a["hidden"].detach().double()), "hidden must have dtype"),
        (lambda a: a["targets"].__setitem__(0, 8), r"targets\[0\] = 8 is outside \[0, 8\)"),
        (lambda a: a["targets"].__setitem__(0, IGNORE_INDEX), r"targets\[0\] = -100 is outside"),
        (lambda a: a.update(softcap=0.0), "softcap must be None or > 0"),
        (lambda a: a.update(backend="cuda"), "backend must be one of"),
    ],
)
def test_clear_errors(change, message):
    arguments = _valid_small()
    change(arguments)
    with pytest.raises(ValueError, match=message):
        fused_linear_ce_kl(**arguments)


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_linear_ce_kl(hidden, weight, torch.zeros(3, dtype=torch.long), torch.ones(3), backend="triton")
