"""The chunked backend never builds the [N, V] logits: its peak extra memory is a fraction of the torch backend's.

Each backend runs in a fresh interpreter so that one's allocator state cannot hide the other's peak. Extra
memory is the process's peak RSS (``ru_maxrss``) during forward + backward minus its RSS once the inputs exist.
"""

import json
import os
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


# A head much larger than the chunk buffers, so that an fp32 copy of W (or W_ref) would dominate the peak.
BF16_NUM_TOKENS, BF16_VOCAB_SIZE, BF16_HIDDEN_SIZE = 64, 32000, 1024

MEASURE_BF16_PEAK = r"""
import json, sys
import torch
from dsunlearn.kernels import fused_linear_ce_kl

num_tokens, vocab_size, hidden_size = map(int, sys.argv[1:])
generator = torch.Generator().manual_seed(0)

def make_inputs(n):
    hidden = torch.randn(n, hidden_size, generator=generator).bfloat16().requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) / 32).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab_size, (n,), generator=generator)
    ce_weight = torch.where(torch.arange(n) < n // 2, -1.0, 0.0)
    kl_weight = torch.where(torch.arange(n) < n // 2, 0.0, 1.0)
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(n, hidden_size, generator=generator)).bfloat16()
    ref_weight = weight.detach().clone()
    return hidden, weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight

def status_kib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))

fused_linear_ce_kl(*make_inputs(8), backend="chunked").backward()
inputs = make_inputs(num_tokens)
# Reset the kernel's peak (VmHWM) to the current resident size: making the inputs peaked higher.
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
baseline = status_kib("VmRSS")
loss = fused_linear_ce_kl(*inputs, backend="chunked")
loss.backward()
print(json.dumps({"peak_extra_bytes": (status_kib("VmHWM") - baseline) * 1024, "loss": loss.item()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through /proc (Linux)")
def test_chunked_bf16_head_makes_no_fp32_copy_of_its_weights():
    # Freed tensors go back to the system, so the resident size follows what is alive.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_BF16_PEAK, str(BF16_NUM_TOKENS), str(BF16_VOCAB_SIZE), str(BF16_HIDDEN_SIZE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout.strip().splitlines()[-1])
    fp32_weight_bytes = BF16_VOCAB_SIZE * BF16_HIDDEN_SIZE * 4
    mib = 2**20
    print(f"peak extra {run['peak_extra_bytes'] / mib:.0f} MiB; one fp32 [V, H] is {fp32_weight_bytes / mib:.0f} MiB")
    # Alive at the peak: the fp32 weight-gradient accumulator, the bf16 gradient made from it, one chunk's buffers
    # and one cast block (~1.6x an fp32 [V, H] here). fp32 copies of W and W_ref would add 2x more.
    assert run["peak_extra_bytes"] < 2 * fp32_weight_bytes
