"""The chunked backend never builds the [N, V] logits: its peak extra memory is a fraction of the torch backend's.

Each backend runs in a fresh interpreter so that one's allocator state cannot hide the other's peak. Extra
memory is the process's peak RSS (``ru_maxrss``) during forward + backward minus its RSS once the inputs exist.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

NUM_TOKENS, VOCAB_SIZE, HIDDEN_SIZE = 4096, 32000, 256

MEASURE_PEAK = r"""
import json, os, resource, sys
import torch
from dsunlearn.kernels import fused_linear_ce_kl

backend, num_tokens, vocab_size, hidden_size = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)

def make_inputs(n):
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab_size, hidden_size) / 16).requires_grad_()
    targets = torch.randint(0, vocab_size, (n,))
    ce_weight = torch.where(torch.arange(n) < n // 2, -1.0, 0.0)  # forget tokens: gradient ascent
    kl_weight = torch.where(torch.arange(n) < n // 2, 0.0, 1.0)  # normal tokens: KL to the reference
    ref_hidden = hidden.detach() + 0.1 * torch.randn(n, hidden_size)
    ref_weight = weight.detach().clone()
    return hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight

def current_rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# A tiny call first, so lazily created library state is part of the baseline rather than the measurement.
fused_linear_ce_kl(*make_inputs(8), backend=backend).backward()
inputs = make_inputs(num_tokens)
baseline = current_rss_bytes()
fused_linear_ce_kl(*inputs, backend=backend).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
print(json.dumps({"peak_extra_bytes": peak - baseline, "grad_norm": inputs[1].grad.norm().item()}))
"""


def peak_extra_bytes(backend):
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, backend, str(NUM_TOKENS), str(VOCAB_SIZE), str(HIDDEN_SIZE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc (Linux)")
def test_chunked_peak_memory_is_under_a_quarter_of_torch():
    torch_run = peak_extra_bytes("torch")
    chunked_run = peak_extra_bytes("chunked")
    mib = 2**20
    print(
        f"N={NUM_TOKENS} V={VOCAB_SIZE} H={HIDDEN_SIZE}: peak extra memory torch "
        f"{torch_run['peak_extra_bytes'] / mib:.0f} MiB, chunked {chunked_run['peak_extra_bytes'] / mib:.0f} MiB "
        f"(one [N, V] fp32 tensor is {NUM_TOKENS * VOCAB_SIZE * 4 / mib:.0f} MiB)"
    )
    # Both did the same work: the same weight gradient up to rounding.
    assert chunked_run["grad_norm"] == pytest.approx(torch_run["grad_norm"], rel=1e-4)
    # The torch backend must have materialised at least one [N, V] fp32 tensor, or the comparison means nothing.
    assert torch_run["peak_extra_bytes"] >= NUM_TOKENS * VOCAB_SIZE * 4
    assert chunked_run["peak_extra_bytes"] < torch_run["peak_extra_bytes"] / 4
