"""What only the ``compiled`` backend has: one graph whatever the token count, its chunk height, and the fallback
to the eager chunked backend where torch.compile fails. Its exactness (float64, gradients, every dtype) is checked
with the other backends in test_fused_linear_ce_kl.py."""

import logging
import subprocess
import sys

import pytest
import torch

import dsunlearn.kernels.compiled as compiled
from dsunlearn.kernels import fused_linear_ce_kl
from dsunlearn.kernels.compiled import compiled_fused_linear_ce_kl, default_chunk_rows


def _inputs(num_tokens, vocab_size=97, hidden_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).requires_grad_()
    weight = torch.randn(vocab_size, hidden_size, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    # Forget rows (CE weight -1), CE rows, KL-only rows: both graphs run.
    ce_weight = torch.tensor([-1.0, 1.0, 0.0]).repeat(num_tokens // 3 + 1)[:num_tokens]
    kl_weight = (ce_weight == 0).float()
    ref_hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    ref_weight = torch.randn(vocab_size, hidden_size, generator=generator)
    return hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight


def test_one_graph_for_every_token_count_and_chunk_height():
    # fullgraph=True makes a graph break an error; here no call after the first compiles anything, though the
    # token counts and the last chunk's height change (chunks of 5 rows: 12 CE rows → 5, 5, 2).
    compiled_fused_linear_ce_kl(*_inputs(30), chunk_rows=5).backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for num_tokens in (31, 19, 44):
        compiled_fused_linear_ce_kl(*_inputs(num_tokens), chunk_rows=5).backward()
        compiled_fused_linear_ce_kl(*_inputs(num_tokens)).backward()  # one chunk per group
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_chunk_height_from_the_vocabulary():
    # 256 rows, or fewer when one [rows, V] fp32 tensor would pass 256 MiB.
    assert default_chunk_rows(32_000) == 256
    assert default_chunk_rows(256_000) == 256  # 256 x 256000 x 4 B = 250 MiB
    assert default_chunk_rows(300_000) == 128  # 256 rows would be 293 MiB
    assert default_chunk_rows(2**40) == 1


def test_falls_back_to_chunked_when_torch_compile_fails(monkeypatch, caplog):
    def no_compiler(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(compiled, "_compile_failure", None)
    monkeypatch.setattr(compiled, "compiled_chunk_functions", lambda: (no_compiler, no_compiler))
    inputs = _inputs(12)
    expected = fused_linear_ce_kl(*inputs, backend="chunked")
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        for _ in range(2):
            assert fused_linear_ce_kl(*inputs, backend="compiled").item() == pytest.approx(expected.item(), rel=1e-6)
    assert [record.getMessage() for record in caplog.records] == [
        (
            "torch.compile does not work here (BackendCompilerFailed: backend='<lambda>' raised:): the fused CE + KL "
            "head runs the eager chunked backend"
        )
    ]


def test_the_trainer_imports_no_compiler_until_the_compiled_backend_runs():
    # torch.compile imports torch._dynamo (~1.5 CPU-s): a rank on the chunked or Triton backend must not pay it.
    code = (
        "import sys, torch, dsunlearn.train\n"
        "from dsunlearn.kernels import fused_linear_ce_kl\n"
        "x, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))\n"
        "fused_linear_ce_kl(x, w, t, torch.ones(4), backend='chunked')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor')))[:3])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
