"""JSON that other readers accept: a diverged run's non-finite values are written as null, never Infinity or NaN."""

from __future__ import annotations

import json
import math


def to_json(value, **dumps_kwargs) -> str:
    """``json.dumps`` with every non-finite float (a diverged run's values) written as null: ``Infinity`` and ``NaN``
    are not JSON, and other readers reject them."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **dumps_kwargs)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value
