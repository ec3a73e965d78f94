"""Warnings from the libraries below dsunlearn that a user can do nothing about, silenced by message and module.

Only the ones named here: a warning about the user's own settings, data or model still shows.
"""

from __future__ import annotations

import warnings

# (message regex, module regex of the code the warning is attributed to, category)
KNOWN_NOISE = (
    # DeepSpeed's ZeRO-3 collectives call torch's renamed all-gather / reduce-scatter: every rank printed it about a
    # dozen times a run. Attributed to torch's collective wrapper (c10d_logger) or, in torch versions without that
    # wrapper, to DeepSpeed's call site.
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|_reduce_scatter_base)` "
     r"is (deprecated|a private function)", r"torch\.distributed|deepspeed", FutureWarning),
)


def silence_known_noise() -> None:
    """Install the filters in this process; call first thing in every entry point that starts ranks or engines."""
    for message, module, category in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
