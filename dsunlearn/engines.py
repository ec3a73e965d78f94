"""The models and their DeepSpeed engines: the ZeRO-3 policy engine and the ZeRO-3 inference reference engine.

Rules kept here (DESIGN.md §5): both models are loaded with partitioned loading (an ``HfDeepSpeedConfig`` alive
before each ``from_pretrained``), so no rank ever holds a full copy of either model; the output head's weight is a
shard outside the head's own forward, so the fused loss runs *inside* the head module's forward, where ZeRO-3 has
gathered it; every rank calls the same modules the same number of times.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsunlearn.config import RunConfig
from dsunlearn.kernels import torch_ce_kl_from_logits

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
