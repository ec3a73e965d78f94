"""The models and their DeepSpeed engines: the ZeRO-3 policy engine and the ZeRO-3 inference reference engine.

Rules kept here (DESIGN.md §5): both models are loaded with partitioned loading (an ``HfDeepSpeedConfig`` alive
before each ``from_pretrained``), so no rank ever holds a full copy of either model; the output head's weight is a
shard outside the head's own forward, so the fused loss runs *inside* the head module's forward, where ZeRO-3 has
gathered it; every rank calls the same modules the same number of times.
"""

from __future__ import annotations

import contextlib
import logging
import re
import types
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsunlearn.kernels import torch_ce_kl_from_logits
from dsunlearn.kernels.sequence_forget import fused_linear_sequence_forget, with_sequence_forget
from dsunlearn.objective import PACKED, PADDED, VARLEN, Segment, pack_sequences
from dsunlearn.settings.config import RunConfig

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


def pretrained_source(cfg: RunConfig, reference: bool = False) -> tuple[str, dict[str, Any]]:
    """Where the run's model (or, ``reference=True``, its reference) comes from: the path and the keyword arguments
    of its ``from_pretrained``. The reference takes the policy's revision only when it is the same repository."""
    model = cfg.model
    path, revision = model.name_or_path, model.revision
    if reference:
        path = model.reference_path or model.name_or_path
        same_repository = path == model.name_or_path
        revision = model.reference_revision or (model.revision if same_repository else None)
    kwargs: dict[str, Any] = {"dtype": PRECISION_DTYPES[model.precision], "trust_remote_code": model.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    return path, kwargs


def load_causal_lm(ds_config: dict, cfg: RunConfig, reference: bool = False):
    """The run's model (or its reference), partitioned, with the run's precision and loading options."""
    path, kwargs = pretrained_source(cfg, reference)
    return from_pretrained_partitioned(path, ds_config, **kwargs)


def text_hidden_size(config) -> int:
    """The width of the language model's hidden states inside its layers (a multimodal config such as Gemma 3's keeps
    it in its text config): what DeepSpeed's bucket sizes scale with. Not the width of the rows the head reads, which
    a model may project first (OPT-350m: 1024 -> 512): that is ``head_input_width``."""
    return config.get_text_config().hidden_size


def head_input_width(lm: nn.Module) -> int:
    """The width of the rows the output head reads: its weight's second dimension, [V, H_head] (under ZeRO-3 the
    weight is a shard and its full shape is ``ds_shape``). It differs from ``config.hidden_size`` where the model
    projects its last hidden states before the head (OPT's ``word_embed_proj_dim``)."""
    weight = lm.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[-1])


def text_vocab_size(config) -> int:
    """The language model's vocabulary size (kept in the text config of a multimodal config, as the width is)."""
    return config.get_text_config().vocab_size


def unset_hf_deepspeed_config() -> None:
    """Drop transformers' global ZeRO-3 config so later single-rank ``from_pretrained`` calls do not run collectives."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config as unset

    unset()


# A rate a model reads in forward (attention_dropout, hidden_dropout_prob, resid_pdrop, summary_first_dropout, ...).
DROPOUT_RATE_NAME = re.compile(r"dropout|pdrop")


def disable_dropout(lm: nn.Module) -> None:
    """Set every dropout probability of ``lm`` to 0: ``nn.Dropout`` modules, and the rates that modules copied from
    the config at construction or read from it in ``forward`` (``F.dropout(p=config.attention_dropout)``)."""
    from transformers import PretrainedConfig

    configs = [lm.config, *(value for value in vars(lm.config).values() if isinstance(value, PretrainedConfig))]
    for owner in [*configs, *lm.modules()]:
        if isinstance(owner, nn.modules.dropout._DropoutNd):
            owner.p = 0.0
            continue
        for name, value in vars(owner).items():
            if DROPOUT_RATE_NAME.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(owner, name, 0.0)


def head_structure_problem(lm: nn.Module) -> Optional[str]:
    """Why the fused loss, which computes ``hidden @ W^T``, cannot stand in for this head, seen from its structure."""
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"the output head is a {type(head).__name__}, not a plain linear layer"
    if head.bias is not None:
        return "the output head has a bias"
    return None


def head_softcap(config) -> Optional[float]:
    """The final-logit softcap, on the config or on its text config (Gemma 3 keeps it in ``text_config``)."""
    sources = [config, getattr(config, "text_config", None)]
    if hasattr(config, "get_text_config"):
        sources.append(config.get_text_config())
    for source in sources:
        softcap = getattr(source, "final_logit_softcapping", None)
        if softcap:
            return float(softcap)
    return None


# Largest difference between the model's own logits and the fused loss's, relative to the largest logit, that is
# rounding: the two run the same matmul on the same hidden states, so anything beyond is another head.
HEAD_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
HEAD_PROBE_TOKENS = 8
# The same bound between the hidden states of packed sequences and of the sequences run one by one: the same layers on
# other shapes. Packed in rows of at most 7 tokens as real batches are (several rows, padded tails): the 5 and a 2 fill
# one row, the 4 and the other 2 share the second, with a padded tail of 1. Each row holds two sequences at other
# boundaries, so a model that let a sequence see another, read its positions as continuing another's, or kept only one
# packed row apart (the first row's sequence boundaries applied to every row) gives them other hidden states.
PACKING_PROBE_TOLERANCE = HEAD_PROBE_TOLERANCE
PACKING_PROBE_LENGTHS = (4, 5, 2, 2)
PACKING_PROBE_ROW_CAPACITY = 7


class UnlearningModel(nn.Module):
    """The causal LM plus the entry points the objective needs, behind one ``forward`` that DeepSpeed wraps.

    ``forward`` runs the model once per segment (objective.Segment: packed sequences in one row, or padded rows).
    ``mode="hidden"``: final hidden states at each segment's flat positions ``token_index``, segment after segment,
    [M, H] (the state at position t predicts token t+1). ``mode="logits"``: the model's own logits there, [M, V].
    ``mode="loss"``: the loss over those M tokens, once; on the fused path it is computed inside the head module's
    forward so ZeRO-3 gathers the head weight for it, on the logits path from the model's own logits (materialised:
    [R, L, V] per segment). The path is the logits path until ``choose_head_path`` has probed the head, and the
    layout the batches must take (``packing``) is padded until ``choose_packing`` has probed the model.
    """

    def __init__(self, lm: nn.Module, head_path: str = "auto", loss_backend: str = "auto", packing: str = "auto"):
        super().__init__()
        self.lm = lm
        self.requested_head_path = head_path
        self.head_path = "logits"
        self.loss_backend = loss_backend
        self.softcap = head_softcap(lm.config)
        self.requested_packing = packing
        self.packing = PADDED

    def choose_packing(self) -> None:
        """Take a packed layout where the model keeps packed sequences apart, checked on four short sequences, else
        the padded one (saying why): one row for FlashAttention's variable-length kernels, rows for an attention that
        applies a mask (objective: layouts). Runs the model's forward: under ZeRO-3 a collective, so call it on every
        rank, after ``deepspeed.initialize``."""
        if self.requested_packing == PADDED:
            return
        attention = getattr(self.lm.config, "_attn_implementation", None) or ""
        layout = VARLEN if "flash" in attention else PACKED
        problem = self._packing_probe_problem(layout)
        if problem and self.requested_packing == PACKED:
            from dsunlearn.runtime.distributed import UsageError

            raise UsageError(f"model.packing=packed is not exact for this model: {problem}; use auto or padded")
        if problem and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            logger.warning("%s: each term runs its own padded forward (model.packing=padded)", problem)
        self.packing = PADDED if problem else layout

    def _packing_probe_problem(self, layout: str) -> Optional[str]:
        """Compare the final hidden states of four sequences packed in ``layout`` (positions restarting at 0, no
        attention mask; in rows: two rows of two sequences, one with a padded tail) with those of each sequence run
        alone; None when they agree to the dtype's rounding."""
        device = next(self.lm.parameters()).device
        # The same tokens on every rank (every rank runs the same collectives), from the first half of the
        # vocabulary as in the head probe.
        tokens = torch.linspace(1, text_vocab_size(self.lm.config) // 2, sum(PACKING_PROBE_LENGTHS)).long().tolist()
        starts = [sum(PACKING_PROBE_LENGTHS[:i]) for i in range(len(PACKING_PROBE_LENGTHS))]
        sequences = [
            types.SimpleNamespace(input_ids=tokens[start:start + length], response_mask=[True] * length)
            for start, length in zip(starts, PACKING_PROBE_LENGTHS)
        ]
        one_row = layout == VARLEN
        segment, _, _ = pack_sequences(sequences, pad_id=0, one_row=one_row,
                                       row_capacity=None if one_row else PACKING_PROBE_ROW_CAPACITY)
        if not one_row and (segment.input_ids.shape[0] < 2 or segment.input_ids.numel() == len(tokens)):
            raise AssertionError("the packing probe must pack in several rows with a padded tail")
        segment = segment.to(device)  # it selects every position of every sequence but its last, in sequence order
        base_model = self.lm.base_model
        was_training = self.lm.training
        self.lm.eval()
        try:
            with torch.no_grad():
                packed = _selected(base_model(**segment.model_inputs(), use_cache=False)[0], segment)  # [T - 4, H]
                alone = torch.cat([
                    base_model(input_ids=torch.tensor([sequence.input_ids], device=device), use_cache=False)[0][0, :-1]
                    for sequence in sequences
                ])  # [T - 4, H]
        finally:
            self.lm.train(was_training)
        tolerance = PACKING_PROBE_TOLERANCE[packed.dtype]
        packed, alone = packed.float(), alone.float()
        scale = float(alone.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
        difference = float((packed - alone).abs().max()) / scale
        if difference <= tolerance:
            return None
        attention = getattr(self.lm.config, "_attn_implementation", None)
        return (f"packed sequences do not get the hidden states they get one by one with {attention} attention "
                f"(they differ by {difference:.3g} of their largest value)")

    def choose_head_path(self) -> None:
        """Take the fused path where it computes the model's own logits, checked on a fixed short input, else the
        logits path (saying why). Runs the model's forward: under ZeRO-3 a collective, so call it on every rank,
        after ``deepspeed.initialize``."""
        if self.requested_head_path == "logits":
            return
        problem = head_structure_problem(self.lm) or self._head_probe_problem(self.softcap)
        if not self._refuse_or_report(problem):
            self.head_path = "fused"
            _attach_fused_loss(self.lm.get_output_embeddings(), self.softcap, self.loss_backend)

    def check_reference_head(self, reference: "UnlearningModel") -> None:
        """The fused loss computes the reference's logits as softcap(ref_hidden @ W_ref^T) with this model's softcap:
        for a reference that is another model, check that these are its own logits, else take the logits path. A
        collective under ZeRO-3 (the reference's forward): call it on every rank."""
        if self.head_path != "fused":
            return
        problem = head_structure_problem(reference.lm) or reference._head_probe_problem(self.softcap)
        if self._refuse_or_report(problem and f"the reference: {problem}"):
            self.head_path = "logits"
            del self.lm.get_output_embeddings().forward  # the attached loss: back to the class's plain forward

    def _refuse_or_report(self, problem: Optional[str]) -> bool:
        """Whether ``problem`` sends the loss to the logits path; an error when model.head_path=fused asks for the
        fused one."""
        if problem and self.requested_head_path == "fused":
            from dsunlearn.runtime.distributed import UsageError

            raise UsageError(f"model.head_path=fused is not exact for this model: {problem}; use auto or logits")
        if problem and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            logger.warning("%s: the loss runs on materialised logits (model.head_path=logits)", problem)
        return bool(problem)

    def _head_probe_problem(self, softcap: Optional[float]) -> Optional[str]:
        """Compare the model's own logits on a few tokens with ``softcap(hidden @ W^T)``, which the fused loss would
        compute; None when they agree to the head dtype's rounding."""
        head = self.lm.get_output_embeddings()
        device = next(self.lm.parameters()).device
        # The same tokens on every rank, so every rank runs the same collectives; spread over the first half of the
        # vocabulary (multimodal models keep their image placeholder tokens at its end).
        input_ids = torch.linspace(0, head.out_features // 2, HEAD_PROBE_TOKENS, device=device).long()[None]  # [1, T]
        was_training = self.lm.training
        self.lm.eval()  # no dropout (LoRA's included): both forwards must see the same model
        try:
            with torch.no_grad():
                logits = self.lm(input_ids=input_ids, use_cache=False).logits[0].float()  # [T, V]
                hidden = self.lm.base_model(input_ids=input_ids, use_cache=False)[0][0]  # [T, H]
                fused = head(hidden).float()  # the head module's own call, so ZeRO-3 gathers its weight: [T, V]
        finally:
            self.lm.train(was_training)
        if softcap:
            fused = softcap * torch.tanh(fused / softcap)
        scale = float(logits.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
        difference = float((logits - fused).abs().max()) / scale
        if difference <= HEAD_PROBE_TOLERANCE[head.weight.dtype]:
            return None
        # Least-squares factor: names a logit multiplier (Falcon-H1's lm_head_multiplier, Cohere's logit_scale).
        factor = float((logits * fused).sum() / (fused * fused).sum().clamp_min(torch.finfo(torch.float32).tiny))
        if float((logits - factor * fused).abs().max()) / scale <= HEAD_PROBE_TOLERANCE[head.weight.dtype]:
            return f"the model's logits are {factor:.3g} x hidden @ W^T"
        capped = f" with softcap {softcap:g}" if softcap else ""
        return f"the model's logits differ from hidden @ W^T{capped} by {difference:.3g} of their largest value"

    def forward(self, segments: Sequence[Segment], mode: str = "hidden", **loss_inputs):
        if mode == "logits" or (mode == "loss" and self.head_path == "logits"):
            # The model's own forward, so every head transformation (bias, scaling, softcap) is applied.
            logits = torch.cat([
                _selected(self.lm(**segment.model_inputs(), use_cache=False).logits, segment) for segment in segments
            ])  # [M, V]
            if mode == "logits":
                return logits
            sequence_forget = loss_inputs.pop("sequence_forget", None)
            if sequence_forget is None:
                return torch_ce_kl_from_logits(logits, **loss_inputs, return_token_terms=True)
            forget_logits = logits[:sequence_forget.num_tokens].detach()  # [M_f, V]
            first_pass = torch_ce_kl_from_logits(
                forget_logits, loss_inputs["targets"][:sequence_forget.num_tokens],
                torch.ones(forget_logits.shape[0], device=logits.device), return_token_terms=True,
            )
            return with_sequence_forget(
                sequence_forget, first_pass[1], loss_inputs.pop("ce_weight"),
                lambda ce_weight: torch_ce_kl_from_logits(logits, ce_weight=ce_weight, **loss_inputs,
                                                          return_token_terms=True),
            )
        hidden = torch.cat([
            _selected(self.lm.base_model(**segment.model_inputs(), use_cache=False)[0], segment) for segment in segments
        ])  # [M, H]
        if mode == "hidden":
            return hidden
        if mode == "loss":
            return self.lm.get_output_embeddings()(hidden, **loss_inputs)
        raise ValueError(f"unknown mode {mode!r}")


def _selected(states: torch.Tensor, segment: Segment) -> torch.Tensor:
    """[R, L, D] states of a segment -> [R*L, D] -> the rows at its response positions, [M_s, D]."""
    return states.reshape(-1, states.shape[-1]).index_select(0, segment.token_index)


def _attach_fused_loss(head: nn.Linear, softcap: Optional[float], backend: str) -> None:
    """Give the head a forward that, called with loss inputs, returns the fused loss instead of logits.

    Called without them it is the plain linear layer, so ``generate`` and evaluation still work. ``ref_head`` is the
    reference engine's head: its weight [V, H_ref] is a ZeRO-3 shard, gathered here, where the loss reads it, and
    released when the loss is done (the loss keeps no reference to it for the backward pass).
    """
    import deepspeed

    from dsunlearn.kernels import fused_linear_ce_kl

    def forward(self, hidden, targets=None, ce_weight=None, ref_hidden=None, ref_head=None, kl_weight=None,
                sequence_forget=None):
        if targets is None:
            return F.linear(hidden, self.weight)
        # LoRA passes no reference head: the reference is this model with its adapters off, and the head has none.
        ref_weight_owner = self if ref_head is None else ref_head
        gathered = [ref_head.weight] if ref_head is not None and kl_weight is not None else []
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=bool(gathered)):
            ref_weight = ref_weight_owner.weight.detach() if kl_weight is not None else None

            if sequence_forget is None:
                return fused_linear_ce_kl(
                    hidden, self.weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight,
                    softcap=softcap, backend=backend, return_token_terms=True,
                )
            # npo/simnpo: the forget tokens' CE at the current weights first, one head forward over them alone
            return fused_linear_sequence_forget(
                hidden, self.weight, targets, ce_weight, ref_hidden, ref_weight, kl_weight,
                sequence_forget=sequence_forget, softcap=softcap, backend=backend,
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
    # Fused: one pass over each parameter. ZeRO hands the optimizer one flat fp32 partition per group, and torch's
    # default AdamW walks that whole tensor once per operation: 7x slower on a 20M-element partition on one CPU core
    # (dsunlearn/BENCHMARKS.md), and on the GPU the fused kernel is torch's fastest too.
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay, fused=True)


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up, then linear decay
    to 0 at ``max_steps`` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def continue_lr_schedule(engine) -> None:
    """After a resume: the learning rate of the next step from this run's schedule (``train.max_steps`` may have
    grown since the checkpoint, README "Resuming"). The checkpoint restored the optimizer's rate for that step as the
    old schedule computed it (e.g. 0 after a linear decay that ended); the same settings give the same number."""
    scheduler = engine.lr_scheduler
    for group, schedule, base_lr in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


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

    adapted = get_peft_model(lm, lora_config(cfg)).base_model.model
    problem = tied_lora_target_problem(adapted)
    if problem:  # before any step: the export, which merges the adapters, could not write this model
        from dsunlearn.runtime.distributed import UsageError

        raise UsageError(f"model.lora_target_modules: {problem}")
    _register_adapters_read_outside_their_modules(adapted)
    return adapted


def tied_lora_target_problem(lm: nn.Module) -> Optional[str]:
    """Why the adapters of the LoRA-adapted ``lm`` cannot be merged into a plain model: a targeted layer whose weight
    is tied to another (an input embedding tied to the head), where the merged weight would change both."""
    from peft.tuners.lora import LoraLayer

    names: dict[int, list[str]] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, module in lm.named_modules():
        if isinstance(module, LoraLayer):
            weight_names = names[id(module.get_base_layer().weight)]
            if len(weight_names) > 1:
                return (f"{name} is targeted but its weight is tied to another ({' and '.join(weight_names)}): "
                        f"merging its adapter would change both. Leave it out of the targets (the other targets, "
                        f"Linear and untied embedding layers, train and merge), or use a model with untied embeddings")
    return None


def _register_adapters_read_outside_their_modules(lm: nn.Module) -> None:
    """Make ZeRO-3 gather the adapters a LoRA layer reads as tensors rather than by calling a module.

    peft's ``lora.Embedding`` keeps ``lora_embedding_A/B`` in ``nn.ParameterDict``s and reads them in its own forward
    (``F.embedding(x, A.T)``, ``@ B.T``). ZeRO-3 gathers a module's own parameters around that module's forward and
    backward, and a ParameterDict never runs one: its entries would stay 1-D shards ("'weight' must be 2-D"). Registered
    as external parameters of the LoRA layer, they are gathered with it. The adapters that are modules (``lora_A``,
    ``lora_B`` of a Linear or Conv layer) are gathered by their own forward already."""
    import deepspeed
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in lm.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for child in module.children():
            if isinstance(child, nn.ParameterDict):
                for param in child.parameters():
                    deepspeed.zero.register_external_parameter(module, param)


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
    if cfg.model.disable_dropout:  # before the adapters: their lora_dropout is the user's own setting
        disable_dropout(lm)
    if cfg.model.lora_rank > 0:
        lm = add_lora_adapters(lm, cfg)
    model = UnlearningModel(lm, cfg.model.head_path, cfg.model.loss_backend, cfg.model.packing)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, ds_config)
    train = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, train.warmup_steps, train.max_steps, train.lr_schedule)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    model.choose_head_path()
    model.choose_packing()
    engine.train()
    return engine


def build_reference_engine(lm: nn.Module, cfg: RunConfig, ds_config: dict):
    """The frozen original model as a ZeRO-3 inference engine (no optimizer), in eval mode, no gradients."""
    import deepspeed

    lm.requires_grad_(False)
    model = UnlearningModel(lm, cfg.model.head_path, cfg.model.loss_backend, cfg.model.packing)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    model.choose_packing()  # the reference may be another model (model.reference_path): its layout is its own
    engine.eval()
    return engine


def release_all_but_head(engine, keep_head: bool = True) -> nn.Module:
    """Free a reference engine's parameters except its output head's, end the engine (its hooks) and return the head:
    a ZeRO-3 shard still, which ``GatheredParameters`` gathers without the engine. For a reference whose rows are
    cached (reference_cache.py): nothing but the fused loss reads it again. ``keep_head=False`` frees the head too
    (nothing reads the reference again; the module returned then holds no weights)."""
    lm = engine.module.lm
    head = lm.get_output_embeddings()
    # tied embeddings: the embedding is the head's weight
    kept = {id(param) for param in head.parameters()} if keep_head else set()
    for param in lm.parameters():
        if id(param) in kept:
            continue
        # Under ZeRO-3 ``data`` is an empty placeholder and the shard lives in ``ds_tensor``.
        if hasattr(param, "ds_tensor"):
            param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    engine.destroy()
    return head


def load_inference_engine(model_path: str, ds_config: dict, dtype: torch.dtype, **from_pretrained_kwargs):
    """A causal LM from ``model_path`` as a ZeRO-3 inference engine; ``engine.module`` is the Hugging Face model.
    ``from_pretrained_kwargs``: ``revision``, ``trust_remote_code``, ... as ``from_pretrained`` takes them."""
    import deepspeed

    lm = from_pretrained_partitioned(model_path, ds_config, dtype=dtype, **from_pretrained_kwargs)
    lm.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=lm, config=ds_config)
    engine.eval()
    return engine


def load_original_engine(cfg: RunConfig, ds_config: dict):
    """The run's original model (its reference) as a ZeRO-3 inference engine, for an evaluation after the reference
    engine was freed (or never built): from the same source as the trainer's reference (``pretrained_source``: path,
    revision, trust_remote_code, precision, attention), so every "original" number is the trained-against model's."""
    path, kwargs = pretrained_source(cfg, reference=True)
    return load_inference_engine(path, ds_config, **kwargs)
