"""DeepSpeed configs: the JSON's "auto" fields come from the settings; explicit fields must agree with them."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch

from dsunlearn.settings.config import ConfigError, RunConfig
from dsunlearn.settings.paths import resolve_path


def load_ds_config(path: str) -> dict:
    resolved = resolve_path(path)
    if resolved is None:
        raise ConfigError([f"train.deepspeed_config: file {path!r} not found"])
    try:
        return json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError([f"train.deepspeed_config: {resolved} is not valid JSON: {err}"]) from None


def build_policy_ds_config(template: dict, cfg: RunConfig, world_size: int, hidden_size: int) -> dict:
    """The trained model's DeepSpeed config: ``template`` with its "auto" fields filled from ``cfg``.

    A field the template sets explicitly must agree with the CLI, so there is one source of truth; every
    disagreement is reported at once.
    """
    ds = copy.deepcopy(template)
    train = cfg.train
    problems: list[str] = []
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.forget_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.forget_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "bf16.enabled": cfg.model.precision == "bf16",
        "fp16.enabled": cfg.model.precision == "fp16",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for dotted, value in wanted.items():
        _fill(ds, dotted, value, problems)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        problems.append(f"deepspeed config: zero_optimization.stage is {stage!r}; dsunlearn runs ZeRO stage 3")
    for section, flag in (("optimizer", "--train.optimizer/--train.lr"), ("scheduler", "--train.lr_schedule")):
        if section in ds:
            problems.append(f"deepspeed config: remove the {section!r} section; it is built from {flag}")
    if problems:
        raise ConfigError(problems)
    return ds


def build_reference_ds_config(policy_ds: dict, offload: bool) -> dict:
    """The reference engine's config: ZeRO-3 inference (no optimizer), same precision, optional parameter offload."""
    zero = {k: v for k, v in policy_ds["zero_optimization"].items() if k not in ("offload_optimizer", "offload_param")}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": policy_ds["train_micro_batch_size_per_gpu"],
        "bf16": {"enabled": policy_ds.get("bf16", {}).get("enabled", False)},
        "fp16": {"enabled": policy_ds.get("fp16", {}).get("enabled", False)},
        "zero_optimization": zero,
        "steps_per_print": policy_ds.get("steps_per_print", 1_000_000_000),
        "wall_clock_breakdown": False,
    }


def _fill(ds: dict, dotted: str, value: Any, problems: list[str]) -> None:
    *parents, key = dotted.split(".")
    node = ds
    for name in parents:
        if name not in node:
            return  # section absent: nothing to fill or to contradict
        node = node[name]
    if key not in node:
        if not parents:
            node[key] = value
        return
    current = node[key]
    if current == "auto":
        node[key] = value
    elif not _same(current, value):
        problems.append(f"deepspeed config sets {dotted}={current!r} but the settings give {value!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b))
    return a == b


def inference_ds_config(dtype: torch.dtype, offload: bool = False) -> dict:
    """A minimal ZeRO-3 inference config for evaluation outside a training run."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
    }
