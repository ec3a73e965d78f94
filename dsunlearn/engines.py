"""DeepSpeed set-up: the ZeRO-3 policy engine, the ZeRO-3 inference reference engine, checkpoints and export.

Rules kept here (DESIGN.md §5): both models are loaded with partitioned loading (an ``HfDeepSpeedConfig`` alive
before each ``from_pretrained``), so no rank ever holds a full copy of either model; the output head's weight is a
shard outside the head's own forward, so the fused loss runs *inside* the head module's forward, where ZeRO-3 has
gathered it; every rank calls the same modules the same number of times.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import socket
import types
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsunlearn.config import ConfigError, RunConfig, resolve_path
from dsunlearn.kernels import torch_ce_kl_from_logits

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECKPOINT_PREFIX = "step_"


# --------------------------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPU ranks) and return (rank, world_size, local_rank).

    A plain ``python -m dsunlearn train`` has no launcher variables: it becomes a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks at start-up (minutes on a small machine, and
        # again whenever the environment changes). Only tensor-parallel inference uses it; ZeRO uses the process group.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs: "auto" fields come from the CLI; explicit fields must agree with it
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def from_pretrained_partitioned(path: str, ds_config: dict, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with ZeRO-3 partitioned loading: each rank materialises only its
    shard. A collective: call it on every rank."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # transformers holds this in a weak reference: it must stay alive through from_pretrained, and no longer (while
    # it lives, every from_pretrained runs zero.Init collectives).
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    del hf_ds_config
    return model


def load_causal_lm(path: str, ds_config: dict, cfg: RunConfig):
    """The run's model (or reference) from ``path``, partitioned, with the run's precision and loading options."""
    kwargs: dict[str, Any] = {"dtype": PRECISION_DTYPES[cfg.model.precision], "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    return from_pretrained_partitioned(path, ds_config, **kwargs)


def unset_hf_deepspeed_config() -> None:
    """Drop transformers' global ZeRO-3 config so later single-rank ``from_pretrained`` calls do not run collectives."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config as unset

    unset()


def fused_head_problem(lm: nn.Module) -> Optional[str]:
    """Why the fused loss cannot stand in for this model's head (None when it can, exactly)."""
    head = lm.get_output_embeddings()
    config = lm.config
    if not isinstance(head, nn.Linear):
        return f"the output head is a {type(head).__name__}, not a plain linear layer"
    if head.bias is not None:
        return "the output head has a bias"
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        scale = getattr(config, name, None)
        if scale not in (None, 1, 1.0):
            return f"the model scales its logits ({name}={scale})"
    return None


def head_softcap(lm: nn.Module) -> Optional[float]:
    return getattr(lm.config, "final_logit_softcapping", None) or None


class UnlearningModel(nn.Module):
    """The causal LM plus the entry points the objective needs, behind one ``forward`` that DeepSpeed wraps.

    ``mode="hidden"``: final hidden states at the flat positions ``token_index`` of the [B, L] grid, [M, H] (the state
    at position t predicts token t+1). ``mode="logits"``: the model's own logits there, [M, V]. ``mode="loss"``: the
    loss; on the fused path it is computed inside the head module's forward so ZeRO-3 gathers the head weight for it,
    on the logits path from the model's own logits (materialised: [B, L, V]).
    """

    def __init__(self, lm: nn.Module, head_path: str = "auto", loss_backend: str = "auto"):
        super().__init__()
        self.lm = lm
        problem = fused_head_problem(lm)
        if head_path == "fused" and problem:
            raise ValueError(f"model.head_path=fused is not exact for this model: {problem}; use auto or logits")
        self.head_path = "logits" if head_path == "logits" or problem else "fused"
        if head_path == "auto" and problem:
            logger.warning("%s: the loss runs on materialised logits (model.head_path=logits)", problem)
        self.loss_backend = loss_backend
        self.softcap = head_softcap(lm)
        if self.head_path == "fused":
            _attach_fused_loss(lm.get_output_embeddings(), self.softcap, loss_backend)

    def forward(self, input_ids, attention_mask, token_index, mode: str = "hidden", **loss_inputs):
        if mode == "logits" or (mode == "loss" and self.head_path == "logits"):
            # The model's own forward, so every head transformation (bias, scaling, softcap) is applied:
            # logits [B, L, V] -> [B*L, V] -> the selected positions [M, V].
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, token_index)
            if mode == "logits":
                return logits
            return torch_ce_kl_from_logits(logits, **loss_inputs, return_token_terms=True)
        # hidden: [B, L, H] -> [B*L, H] -> the selected positions [M, H]
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_index)
        if mode == "hidden":
            return hidden
        if mode == "loss":
            return self.lm.get_output_embeddings()(hidden, **loss_inputs)
        raise ValueError(f"unknown mode {mode!r}")


def _attach_fused_loss(head: nn.Linear, softcap: Optional[float], backend: str) -> None:
    """Give the head a forward that, called with loss inputs, returns the fused loss instead of logits.

    Called without them it is the plain linear layer, so ``generate`` and evaluation still work.
    """
    from dsunlearn.kernels import fused_linear_ce_kl

    def forward(self, hidden, targets=None, ce_weight=None, ref_hidden=None, ref_weight=None, kl_weight=None):
        if targets is None:
            return F.linear(hidden, self.weight)
        if kl_weight is not None and ref_weight is None:
            # LoRA: the reference is this model with its adapters off, and the head carries no adapter.
            ref_weight = self.weight.detach()
        return fused_linear_ce_kl(
            hidden, self.weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight,
            softcap=softcap, backend=backend, return_token_terms=True,
        )

    head.forward = types.MethodType(forward, head)


# --------------------------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------------------------


def build_optimizer(params, cfg: RunConfig, ds_config: dict):
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    train = cfg.train
    if train.optimizer == "sgd":
        # ZeRO lists only Adam-family optimizers as tested; SGD's update is simple enough to trust.
        ds_config["zero_allow_untested_optimizer"] = True
        if offload:
            ds_config["zero_force_ds_cpu_optimizer"] = False
        return torch.optim.SGD(params, lr=train.lr)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up, then linear decay
    to 0 at ``max_steps`` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.model.lora_rank,
        lora_alpha=cfg.model.lora_alpha,
        lora_dropout=cfg.model.lora_dropout,
        target_modules=cfg.model.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def add_lora_adapters(lm: nn.Module, cfg: RunConfig) -> nn.Module:
    """Inject LoRA adapters into ``lm`` in place (base weights frozen) and return it: the causal LM itself, not
    peft's wrapper, so the rest of the code sees the same module tree with or without LoRA."""
    from peft import get_peft_model

    return get_peft_model(lm, lora_config(cfg)).base_model.model


@contextlib.contextmanager
def reference_mode(lm: nn.Module):
    """Run the LoRA-adapted ``lm`` as the reference: adapters off, dropout off, no gradients."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for module in adapted:
                module.enable_adapters(False)
            yield
    finally:
        for module in adapted:
            module.enable_adapters(True)
        lm.train(was_training)


def build_policy_engine(lm: nn.Module, cfg: RunConfig, ds_config: dict):
    import deepspeed

    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    if cfg.model.lora_rank > 0:
        lm = add_lora_adapters(lm, cfg)
    model = UnlearningModel(lm, cfg.model.head_path, cfg.model.loss_backend)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, ds_config)
    train = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, train.warmup_steps, train.max_steps, train.lr_schedule)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.train()
    return engine


def build_reference_engine(lm: nn.Module, cfg: RunConfig, ds_config: dict):
    """The frozen original model as a ZeRO-3 inference engine (no optimizer), in eval mode, no gradients."""
    import deepspeed

    lm.requires_grad_(False)
    model = UnlearningModel(lm, cfg.model.head_path, cfg.model.loss_backend)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def load_inference_engine(model_path: str, ds_config: dict, dtype: torch.dtype):
    """A causal LM from ``model_path`` as a ZeRO-3 inference engine; ``engine.module`` is the Hugging Face model."""
    import deepspeed

    lm = from_pretrained_partitioned(model_path, ds_config, dtype=dtype)
    lm.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=lm, config=ds_config)
    engine.eval()
    return engine


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


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# --------------------------------------------------------------------------------------------------------------------


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """A DeepSpeed checkpoint (all ranks), tagged by step; old ones beyond ``keep`` are removed by rank 0."""
    tag = f"{CHECKPOINT_PREFIX}{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0 and keep > 0:
        for old in sorted(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return checkpoint_dir / tag


def load_latest_checkpoint(engine, checkpoint_dir: Path) -> Optional[dict]:
    """Load the checkpoint named in ``latest`` (written last by DeepSpeed, so a crash mid-save leaves the previous
    one); return its client state, or None when there is none."""
    if not (checkpoint_dir / "latest").is_file():
        return None
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint named in {checkpoint_dir / 'latest'}")
    return client_state


def export_hf(engine, lm: nn.Module, tokenizer, out_dir: Path, cfg: RunConfig, prefix: str = "lm.") -> None:
    """Write a Hugging Face folder (safetensors, config, tokenizer) that ``from_pretrained`` loads.

    The consolidated state dict is gathered on every rank (a collective) and written by rank 0. LoRA adapters are
    merged into the weights, so the export is a plain model.
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if torch.distributed.get_rank() == 0:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.lora_rank > 0:
            merged = merge_lora(state_dict, lm.config, cfg)
            merged.save_pretrained(out_dir, safe_serialization=True)
        else:
            lm.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    torch.distributed.barrier()


def merge_lora(state_dict: dict, config, cfg: RunConfig) -> nn.Module:
    """A plain CPU model with the adapters of ``state_dict`` merged in, by peft's own merge (fan-in/fan-out layouts
    and scaling as peft defines them). Rank 0 only: the full model is built in CPU memory."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state_dict.values())).dtype
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=dtype), lora_config(cfg))
    adapted = peft_model.base_model.model
    missing, unexpected = adapted.load_state_dict(state_dict, strict=False)
    # Tied weights appear once in the consolidated state dict; anything else missing would be a silent bug.
    missing = [k for k in missing if k not in _tied_keys(adapted)]
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return peft_model.merge_and_unload()


def _tied_keys(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied
