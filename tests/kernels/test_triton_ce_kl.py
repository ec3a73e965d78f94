"""The ``triton`` backend against a float64 formula written here.

Without CUDA the kernel runs in Triton's interpreter on the CPU. ``TRITON_INTERPRET`` is read when a kernel is
decorated, so it is set before the backend module is imported (the kernel uses no @jit function of
triton.language, so triton itself may have been imported earlier). On a CUDA machine the same checks run
compiled, through the ``gpu``-marked test, and the interpreter tests are skipped (one process cannot hold both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

from dsunlearn.kernels import triton_ce_kl  # noqa: E402
from dsunlearn.kernels.triton_ce_kl import triton_fused_linear_ce_kl  # noqa: E402

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU tests run the kernel in Triton's interpreter")


def reference_loss(hidden, weight, targets, ce_weight, ref_hidden=None, ref_weight=None, kl_weight=None, softcap=None):
    """The contract in float64 with materialised logits: (loss, token_ce [N], token_kl [N], hidden64, weight64)."""
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    vocab_size = weight.shape[0]
    logits = hidden64 @ weight64.T  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = (targets >= 0) & (targets < vocab_size)
    target_log_probs = log_probs.gather(1, targets.clamp(0, vocab_size - 1).unsqueeze(1)).squeeze(1)
    token_ce = torch.where(valid, -target_log_probs, torch.zeros_like(target_log_probs))
    loss = (ce_weight.double() * token_ce).sum()
    token_kl = torch.zeros_like(token_ce)
    if kl_weight is not None:
        ref_logits = ref_hidden.double() @ ref_weight.double().T  # [N, V]
        if softcap is not None:
            ref_logits = softcap * torch.tanh(ref_logits / softcap)
        ref_log_probs = torch.log_softmax(ref_logits, dim=-1)
        token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
        loss = loss + (kl_weight.double() * token_kl).sum()
    return loss, token_ce.detach(), token_kl.detach(), hidden64, weight64


def make_problem(num_tokens, hidden_size, vocab_size, dtype, device, terms, seed):
    """Random inputs with mixed positive / negative / zero weights and ignore-index targets on zero-CE rows."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    hidden = randn(num_tokens, hidden_size)
    weight = randn(vocab_size, hidden_size, scale=hidden_size**-0.5 * 3)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    # Each weight is positive, negative or zero with equal odds; "both zero" rows must cost nothing.
    choice = torch.randint(0, 3, (num_tokens,), generator=generator)
    magnitude = torch.rand(num_tokens, generator=generator)
    ce_weight = torch.where(choice == 0, 0.0, torch.where(choice == 1, 0.7, -0.4)) * magnitude
    choice = torch.randint(0, 3, (num_tokens,), generator=generator)
    magnitude = torch.rand(num_tokens, generator=generator)
    kl_weight = torch.where(choice == 0, 0.0, torch.where(choice == 1, 1.3, -0.2)) * magnitude
    if terms == "ce":
        kl_weight = None
    elif terms == "kl":
        ce_weight = torch.zeros(num_tokens)
    targets = torch.where(ce_weight == 0, torch.where(torch.arange(num_tokens) % 2 == 0, -100, targets), targets)
    ref_hidden = randn(num_tokens, hidden_size)
    ref_weight = (weight.float() + randn(vocab_size, hidden_size, scale=0.1).float()).to(dtype)
    inputs = dict(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets.to(device),
        ce_weight=ce_weight.to(device),
    )
    if kl_weight is not None:
        inputs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, kl_weight=kl_weight.to(device))
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (the whole tensor's scale)."""
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected.double().cpu()).abs().max() / scale).item()


def check_against_reference(inputs, tolerance, softcap=None, upstream=2.5, chunk_rows=None, through_dispatcher=False):
    if through_dispatcher:  # with the dispatcher's input checks
        from dsunlearn.kernels import fused_linear_ce_kl

        loss, token_ce, token_kl = fused_linear_ce_kl(
            **inputs, softcap=softcap, return_token_terms=True, backend="triton"
        )
    else:
        loss, token_ce, token_kl = triton_fused_linear_ce_kl(
            **inputs, softcap=softcap, return_token_terms=True, chunk_rows=chunk_rows
        )
    (loss * upstream).backward()
    cpu_inputs = {k: v.detach().cpu() for k, v in inputs.items()}
    expected, expected_ce, expected_kl, hidden64, weight64 = reference_loss(**cpu_inputs, softcap=softcap)
    (expected * upstream).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss_error = abs(loss.item() - expected.item()) / max(abs(expected.item()), 1e-30)
    assert loss_error < tolerance, (loss.item(), expected.item())
    assert inputs["hidden"].grad.dtype == inputs["hidden"].dtype
    assert inputs["weight"].grad.dtype == inputs["weight"].dtype
    assert relative_error(inputs["hidden"].grad, hidden64.grad) < tolerance
    assert relative_error(inputs["weight"].grad, weight64.grad) < tolerance
    # Per-token terms are exact values where a weight asks for them, 0 elsewhere.
    active = inputs["ce_weight"].cpu() != 0
    kl_weight = inputs.get("kl_weight")
    if kl_weight is not None:
        active = active | (kl_weight.cpu() != 0)
        expected_kl = torch.where(kl_weight.cpu() != 0, expected_kl, torch.zeros_like(expected_kl))
    expected_ce = torch.where(active, expected_ce, torch.zeros_like(expected_ce))
    assert relative_error(token_ce, expected_ce) < tolerance
    assert relative_error(token_kl, expected_kl) < tolerance
    assert not token_ce.requires_grad and not token_kl.requires_grad
    if kl_weight is not None:
        assert inputs["ref_hidden"].grad is None and inputs["ref_weight"].grad is None


@needs_interpreter
@pytest.mark.parametrize("terms", ["both", "ce", "kl"])
def test_matches_float64_reference_fp32_odd_shapes(terms):
    inputs = make_problem(37, 19, 1013, torch.float32, "cpu", terms, seed=1)
    check_against_reference(inputs, tolerance=1e-5)


@needs_interpreter
@pytest.mark.parametrize("chunk_rows", [3, 11])
def test_several_chunks_with_kl_rows_split_across_them(chunk_rows):
    # Rows are ordered [CE only; with KL]; here 9 are CE only, so 3-row chunks have chunks without any KL row
    # and 11-row chunks put the boundary inside the first chunk.
    inputs = make_problem(37, 19, 1013, torch.float32, "cpu", "both", seed=2)
    ce_only = (inputs["ce_weight"] != 0) & (inputs["kl_weight"] == 0)
    assert 3 < ce_only.sum().item() < 11
    check_against_reference(inputs, tolerance=1e-5, chunk_rows=chunk_rows)


@needs_interpreter
def test_softcap_matches_reference():
    inputs = make_problem(29, 16, 515, torch.float32, "cpu", "both", seed=3)
    check_against_reference(inputs, tolerance=1e-5, softcap=2.0, upstream=-1.5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_within_1e_2(dtype):
    inputs = make_problem(37, 19, 1013, dtype, "cpu", "both", seed=4)
    check_against_reference(inputs, tolerance=1e-2, softcap=4.0)


@needs_interpreter
@pytest.mark.parametrize("chunk_rows, through_dispatcher", [(None, True), (7, False)])
def test_reference_of_another_width(chunk_rows, through_dispatcher):
    # reference_path may name another model with the same vocabulary: ref_hidden [N, H_ref], ref_weight [V, H_ref].
    inputs = make_problem(37, 19, 1013, torch.float32, "cpu", "both", seed=16)
    generator = torch.Generator().manual_seed(17)
    inputs["ref_hidden"] = torch.randn(37, 27, generator=generator).requires_grad_()
    inputs["ref_weight"] = (torch.randn(1013, 27, generator=generator) * 27**-0.5 * 3).requires_grad_()
    check_against_reference(
        inputs, tolerance=1e-5, softcap=3.0, chunk_rows=chunk_rows, through_dispatcher=through_dispatcher
    )


def assert_fp16_precision(actual: torch.Tensor, exact: torch.Tensor):
    """``actual`` (fp16) is the ``exact`` gradient (float64) to fp16 precision: no entry flushed to zero, most are
    exactly ``exact`` rounded to fp16 (dL/dz is fp16 too, so not all), and none is further from it than fp16
    precision of the largest entry."""
    assert actual.dtype == torch.float16
    rounded = exact.to(torch.float16)
    flushed = int(((actual == 0) & (rounded != 0)).sum())
    assert flushed == 0, f"{flushed} of {actual.numel()} entries flushed to zero"
    exactly_rounded = (actual == rounded).double().mean().item()
    assert exactly_rounded > 0.5, f"only {exactly_rounded:.0%} of the entries are the exact gradient rounded to fp16"
    assert relative_error(actual, exact) < 2.0**-9


def check_fp16_gradients_of_small_token_weights(device, upstream):
    # The objective's per-token weights are ~1e-3 and a freshly initialised head (std 0.02) gives a near-uniform
    # softmax, so dL/dz and the gradients of hidden and weight are far below fp16's normal range until the backward
    # multiplies in the upstream gradient (in fp16 training DeepSpeed's loss scale, here 2^12).
    inputs = make_problem(48, 32, 1013, torch.float16, device, "both", seed=14)
    generator = torch.Generator().manual_seed(15)
    head = torch.randn(inputs["weight"].shape, generator=generator) * 0.02
    inputs["weight"] = head.half().to(device).requires_grad_()
    inputs["ref_weight"] = (head + torch.randn(head.shape, generator=generator) * 0.002).half().to(device)
    inputs["ce_weight"] = inputs["ce_weight"] * 1e-3
    inputs["kl_weight"] = inputs["kl_weight"] * 1e-3
    (triton_fused_linear_ce_kl(**inputs) * upstream).backward()
    expected, _, _, hidden64, weight64 = reference_loss(**{k: v.detach().cpu() for k, v in inputs.items()})
    (expected * upstream).backward()
    active = ((inputs["ce_weight"] != 0) | (inputs["kl_weight"] != 0)).cpu()
    assert_fp16_precision(inputs["hidden"].grad.cpu()[active], hidden64.grad[active])
    assert_fp16_precision(inputs["weight"].grad.cpu(), weight64.grad)


@needs_interpreter
@pytest.mark.parametrize("upstream", [2.0**12, 1.0], ids=["loss_scale_2^12", "upstream_1"])
def test_fp16_gradients_of_small_token_weights_keep_fp16_precision(upstream):
    check_fp16_gradients_of_small_token_weights("cpu", upstream)


@needs_interpreter
def test_all_masked_tokens_cost_nothing():
    inputs = make_problem(13, 8, 257, torch.float32, "cpu", "both", seed=5)
    inputs["ce_weight"].zero_()
    inputs["kl_weight"].zero_()
    inputs["targets"].fill_(-100)  # any target is allowed on a masked token
    loss, token_ce, token_kl = triton_fused_linear_ce_kl(**inputs, return_token_terms=True)
    (loss * 3.0).backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(token_ce) == 0 and torch.count_nonzero(token_kl) == 0
    assert torch.count_nonzero(inputs["hidden"].grad) == 0
    assert torch.count_nonzero(inputs["weight"].grad) == 0


@needs_interpreter
def test_masked_rows_get_zero_gradient_and_do_not_change_the_loss():
    inputs = make_problem(24, 8, 300, torch.float32, "cpu", "both", seed=6)
    masked = (inputs["ce_weight"] == 0) & (inputs["kl_weight"] == 0)
    assert masked.any() and not masked.all()
    loss = triton_fused_linear_ce_kl(**inputs)
    loss.backward()
    assert torch.count_nonzero(inputs["hidden"].grad[masked]) == 0
    # The same loss from the active rows alone.
    keep = ~masked
    alone = triton_fused_linear_ce_kl(
        inputs["hidden"].detach()[keep],
        inputs["weight"].detach(),
        inputs["targets"][keep],
        inputs["ce_weight"][keep],
        inputs["ref_hidden"][keep],
        inputs["ref_weight"],
        inputs["kl_weight"][keep],
    )
    assert abs(alone.item() - loss.item()) <= 1e-6 * abs(loss.item())


@needs_interpreter
def test_kl_is_exactly_zero_when_reference_equals_policy():
    inputs = make_problem(16, 12, 400, torch.float32, "cpu", "kl", seed=7)
    inputs["kl_weight"] = torch.ones(16)
    inputs["ref_hidden"] = inputs["hidden"].detach().clone()
    inputs["ref_weight"] = inputs["weight"].detach().clone()
    loss, _, token_kl = triton_fused_linear_ce_kl(**inputs, return_token_terms=True)
    loss.backward()
    assert token_kl.abs().max().item() <= 1e-6
    assert abs(loss.item()) <= 1e-5
    assert inputs["weight"].grad.abs().max().item() <= 1e-5


@needs_interpreter
def test_no_grad_and_frozen_inputs_give_the_same_loss():
    inputs = make_problem(20, 8, 300, torch.float32, "cpu", "both", seed=8)
    expected = reference_loss(**{k: v.detach() for k, v in inputs.items()})[0].item()
    with torch.no_grad():
        loss = triton_fused_linear_ce_kl(**inputs)
    assert not loss.requires_grad
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)
    frozen = dict(inputs, hidden=inputs["hidden"].detach(), weight=inputs["weight"].detach())
    assert abs(triton_fused_linear_ce_kl(**frozen).item() - expected) <= 1e-5 * abs(expected)


@needs_interpreter
def test_only_hidden_needs_grad():
    inputs = make_problem(20, 8, 300, torch.float32, "cpu", "ce", seed=9)
    inputs["weight"] = inputs["weight"].detach()
    (triton_fused_linear_ce_kl(**inputs) * 2.0).backward()
    expected, _, _, hidden64, _ = reference_loss(**{k: v.detach() for k, v in inputs.items()})
    (expected * 2.0).backward()
    assert inputs["weight"].grad is None
    assert relative_error(inputs["hidden"].grad, hidden64.grad) < 1e-5


@needs_interpreter
def test_dispatcher_routes_to_triton():
    kernels = pytest.importorskip("dsunlearn.kernels")
    if not hasattr(kernels, "fused_linear_ce_kl"):
        pytest.skip("the dispatcher is not in dsunlearn.kernels yet")
    inputs = make_problem(37, 19, 1013, torch.float32, "cpu", "both", seed=10)
    loss = kernels.fused_linear_ce_kl(**inputs, backend="triton")
    (loss * 2.5).backward()
    expected, _, _, hidden64, weight64 = reference_loss(**{k: v.detach() for k, v in inputs.items()})
    (expected * 2.5).backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert relative_error(inputs["hidden"].grad, hidden64.grad) < 1e-5
    assert relative_error(inputs["weight"].grad, weight64.grad) < 1e-5


@pytest.mark.parametrize(
    "num_rows, hidden_size, vocab_size, has_kl, expected_rows",
    [
        # Llama-3 8B head, bf16: the budget 8·16384·4096·2 B / (128256·10 B) = 837 rows, under the floor: 16 x 1024.
        (16384, 4096, 128256, True, 1024),
        # Gemma-2 9B's 256k vocabulary: budget 367 rows (256-row chunks before the floor rose): 16 x 1024.
        (16384, 3584, 256000, True, 1024),
        # V = 32k: budget 1073741824 / 320000 = 3355 rows: 16384 // 3355 = 4 chunks of 4096.
        (16384, 4096, 32000, True, 4096),
        # CE only, 6 B per logit: budget 5592 rows: 2 chunks of 8192.
        (16384, 4096, 32000, False, 8192),
        # Odd N at the floor: budget 255 rows -> 1024: 5001 // 1024 = 4 chunks, 5001 / 4 = 1250.25 -> 1251 (1251 x 3
        # + 1248, not 1024 x 4 + 905).
        (5001, 4096, 128256, True, 1251),
        # Just over the floor: one chunk, not 1024 + 1.
        (1025, 3584, 256000, True, 1025),
        # Fewer rows than the floor: one chunk.
        (777, 4096, 256000, True, 777),
        (5, 4096, 128256, False, 5),
    ],
)
def test_default_chunk_rows(num_rows, hidden_size, vocab_size, has_kl, expected_rows):
    rows = triton_ce_kl.default_chunk_rows(num_rows, hidden_size, vocab_size, 2, has_kl=has_kl)
    assert rows == expected_rows


@pytest.mark.parametrize("vocab_size", [32000, 128256, 256000])
@pytest.mark.parametrize("num_rows", [1, 999, 1023, 1024, 1025, 2047, 3001, 16383, 65537])
def test_default_chunk_rows_balanced_above_the_floor_within_the_budget(num_rows, vocab_size):
    hidden_size, itemsize = 4096, 2
    rows = triton_ce_kl.default_chunk_rows(num_rows, hidden_size, vocab_size, itemsize, has_kl=True)
    num_chunks = -(-num_rows // rows)
    last_chunk = num_rows - (num_chunks - 1) * rows
    floor = min(num_rows, triton_ce_kl.MIN_CHUNK_ROWS)
    # Every chunk, the last included, has at least the floor's rows (or all of them); they differ by less than one
    # row per chunk.
    assert floor <= last_chunk <= rows <= num_rows
    assert rows - last_chunk < num_chunks
    # The buffers stay within twice the budget, or twice the floor's buffers.
    budget = triton_ce_kl.CHUNK_BYTES_PER_INPUT_BYTE * num_rows * hidden_size * itemsize
    bytes_per_row = vocab_size * (4 + 4 + itemsize)
    assert rows * bytes_per_row <= 2 * max(budget, triton_ce_kl.MIN_CHUNK_ROWS * bytes_per_row)


@needs_interpreter
def test_mixed_dtypes_warn_of_the_fp32_copy_and_still_match():
    inputs = make_problem(37, 19, 1013, torch.bfloat16, "cpu", "both", seed=3)
    inputs["ref_hidden"] = inputs["ref_hidden"].float()  # fp32 reference rows, bf16 reference head
    with pytest.warns(triton_ce_kl.SlowPathWarning) as caught:
        check_against_reference(inputs, tolerance=1e-2)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1, messages
    assert "ref_hidden is torch.float32 but ref_weight is torch.bfloat16" in messages[0]
    assert "fp32 copy of ref_weight" in messages[0] and "ref_hidden.to(ref_weight.dtype)" in messages[0]


@needs_interpreter
def test_matching_dtypes_take_no_reported_slow_path():
    inputs = make_problem(37, 19, 1013, torch.bfloat16, "cpu", "both", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_ce_kl.SlowPathWarning)
        triton_fused_linear_ce_kl(**inputs).backward()


# Compiled in a fresh process: in this one the kernel may be the interpreter's.
COMPILE_FOR_SM90 = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsunlearn.kernels.triton_ce_kl import _ce_kl_rows_kernel, MAX_BLOCK_V
pointers = ["logits_ptr", "ref_logits_ptr", "grad_logits_ptr", "targets_ptr", "ce_weight_ptr", "kl_weight_ptr",
            "token_ce_ptr", "token_kl_ptr"]
scalars = ["stride_logits", "stride_ref_logits", "stride_grad_logits", "vocab_size"]
flags = ["HAS_KL", "HAS_SOFTCAP", "COMPUTE_GRAD"]
signature = dict.fromkeys(pointers, "*fp32") | {"targets_ptr": "*i64", "grad_logits_ptr": "*bf16"}
signature |= dict.fromkeys(scalars, "i32") | {"softcap": "fp32"} | dict.fromkeys(flags + ["BLOCK_V"], "constexpr")
for values in itertools.product([False, True], repeat=3):
    constexprs = dict(zip(flags, values), BLOCK_V=MAX_BLOCK_V)
    source = ASTSource(fn=_ce_kl_rows_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"], values
print("compiled", 2**3)
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", COMPILE_FOR_SM90]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 8" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("terms", ["both", "ce", "kl"])
def test_cuda_matches_float64_reference(dtype, tolerance, terms, monkeypatch):
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel is not compiled in this process")
    # TF32 would change fp32 products; the contract is fp32 accumulation of fp32 products.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for seed, (num_tokens, hidden_size, vocab_size), chunk_rows, softcap in [
        (11, (37, 19, 1013), None, None),
        (12, (300, 64, 5003), 128, None),
        (13, (64, 32, 2049), None, 3.0),
    ]:
        inputs = make_problem(num_tokens, hidden_size, vocab_size, dtype, "cuda", terms, seed=seed)
        check_against_reference(inputs, tolerance=tolerance, chunk_rows=chunk_rows, softcap=softcap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("upstream", [2.0**12, 1.0], ids=["loss_scale_2^12", "upstream_1"])
def test_cuda_fp16_gradients_of_small_token_weights_keep_fp16_precision(upstream):
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel is not compiled in this process")
    check_fp16_gradients_of_small_token_weights("cuda", upstream)
