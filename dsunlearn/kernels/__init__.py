"""Fused output-head losses: ``dsunlearn.kernels``, whose modules live in the checkout's top-level ``kernels/`` folder.

``fused_linear_ce_kl`` runs the policy's output head once over the concatenated [forget; random-answer; normal]
tokens and returns Σ_i ce_weight[i]·CE_i + kl_weight[i]·KL_i (DESIGN.md §4). Backends:

* ``torch``: materialises the logits, plain autograd (``reference.py``); the reference for tests and benchmarks.
* ``chunked``: pure PyTorch over token chunks, never allocates [N, V] (``chunked.py``); eager, the fallback.
* ``compiled``: the same chunks with each chunk's softmax work one ``torch.compile``'d graph (``compiled.py``);
  the CPU default for an fp32 head of at least 2^22 weights.
* ``triton``: CUDA kernels (``triton_ce_kl.py``), imported only when asked for.
* ``auto``: ``triton`` for CUDA tensors when Triton is installed, else ``compiled`` for an fp32 head of at least
  ``COMPILE_MIN_HEAD_WEIGHTS`` (2^22) weights (``chunked`` where torch.compile fails, said once in the log) and
  ``chunked`` for a smaller or low-precision one.

``fused_linear_sequence_forget`` (``sequence_forget.py``) runs the head for a batch whose forget term is npo or
simnpo, a function of each forget sequence's summed log-likelihood, whose derivative is the forget tokens' CE weight:
on ``chunked`` and ``compiled``, one pass whose chunks hold whole forget sequences and weigh them once their CE is
known; elsewhere, or where a sequence is longer than a chunk, a first pass over the forget tokens without a gradient,
then ``fused_linear_ce_kl`` with those weights (the trainer's head and the kernel benchmark's ``npo`` problem).

``token_log_prob_stats`` (``token_log_prob_stats.py``) gives, per token, log p(target) and the mean and variance of
log p under the model's own next-token distribution (Min-K%++ membership inference), with the same backends.

Why this file is not in ``kernels/``: a ``kernels/__init__.py`` at the top of the checkout made ``kernels`` a regular
package wherever the checkout root is on sys.path (``python -m``, ``python -c``, pytest), and it then hid Hugging
Face's ``kernels``, which ``import transformers`` imports (>= 5.25). Without it ``kernels/`` is a namespace folder,
which loses to any installed package of that name (DESIGN.md §3). A wheel installs the folder's modules here, beside
this file (pyproject.toml); a checkout, editable or on PYTHONPATH, adds the folder to this package's path.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
if not (_PACKAGE_DIR / "ce_kl.py").is_file():
    _CHECKOUT_KERNELS = _PACKAGE_DIR.parents[1] / "kernels"
    if not (_CHECKOUT_KERNELS / "ce_kl.py").is_file():
        raise ImportError(
            f"dsunlearn.kernels: neither {_PACKAGE_DIR} (an installed wheel) nor {_CHECKOUT_KERNELS} (a checkout) "
            "holds the kernel modules; reinstall dsunlearn"
        )
    __path__.append(str(_CHECKOUT_KERNELS))

from .backends import BACKENDS  # noqa: E402
from .ce_kl import fused_linear_ce_kl  # noqa: E402
from .chunked import chunked_fused_linear_ce_kl  # noqa: E402
from .compiled import compiled_fused_linear_ce_kl  # noqa: E402
from .reference import torch_ce_kl_from_logits, torch_fused_linear_ce_kl  # noqa: E402
from .token_log_prob_stats import token_log_prob_stats  # noqa: E402

__all__ = [
    "BACKENDS", "fused_linear_ce_kl", "torch_fused_linear_ce_kl", "chunked_fused_linear_ce_kl",
    "compiled_fused_linear_ce_kl", "torch_ce_kl_from_logits", "token_log_prob_stats",
]
