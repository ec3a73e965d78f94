"""What every op of dsunlearn.kernels shares: the choice of backend and fp32 accumulation under autocast."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "chunked", "compiled", "triton")


# Head weights (V x H) from which ``auto`` compiles on the CPU. A process's first compiled call costs 12 s with a cold
# Inductor cache and 3.4 s with a warm one (2 cores, kernels/BENCHMARKS.md); a call saves 0.8 s at V = 32000, H = 256,
# N = 2048 (8.2M weights), but next to nothing at a test model's head (V of a few thousand, H = 32), where the
# compilation would only add to every short training run.
COMPILE_MIN_HEAD_WEIGHTS = 2**22


def resolve_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend that runs: ``auto`` is triton for CUDA tensors when Triton is installed; else compiled for an fp32
    head of at least ``COMPILE_MIN_HEAD_WEIGHTS`` weights (which falls back to chunked, saying so once, where
    torch.compile fails) and chunked for a smaller or low-precision one (the compiled graph reads an fp32 copy of the
    head weight, chunked casts it a block at a time); triton on CPU tensors is refused unless Triton's interpreter is
    on (tests)."""
    if backend == "auto":
        if hidden.is_cuda and importlib.util.find_spec("triton") is not None:
            return "triton"
        if weight.dtype == torch.float32 and weight.numel() >= COMPILE_MIN_HEAD_WEIGHTS:
            return "compiled"
        return "chunked"
    if backend == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests); "
            "use backend='auto' or 'chunked' on the CPU"
        )
    return backend


def without_autocast(device_type: str):
    """A context that turns an enclosing autocast off: under it the products would run in low precision, and the
    ops' contract is fp32 accumulation."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
