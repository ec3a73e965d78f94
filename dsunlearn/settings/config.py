"""Run settings: litgpt-style dataclasses that jsonargparse turns into the CLI and YAML.

Every dataclass lists its own problems in ``problems()``; ``RunConfig.__post_init__`` gathers them all and raises a
single ``ConfigError`` so a user fixes a bad config in one go instead of one error per launch.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from dsunlearn.settings.classifiers import classifier_problems
from dsunlearn.settings.cli import settings_parser
from dsunlearn.settings.dataset import BENCHMARK_ROUGE, DatasetSpec
from dsunlearn.settings.paths import resolve_path
from dsunlearn.settings.prompt_format import DEFAULT_TEMPLATE, PromptFormat


class ConfigError(ValueError):
    """Invalid settings; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    """The model to unlearn and how it is run."""

    name_or_path: str = "facebook/opt-1.3b"
    """Hugging Face hub id or local folder of the causal LM to unlearn."""
    reference_path: Optional[str] = None
    """Frozen reference for the KL term; defaults to ``name_or_path`` (the original model)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the model."""
    reference_revision: Optional[str] = None
    """Hub revision of the reference. None: ``revision`` when the reference is the model itself (``reference_path``
    unset or equal to ``name_or_path``), else the default branch of ``reference_path`` (another repository's
    revisions are its own)."""
    disable_dropout: bool = True
    """Set every dropout probability of the trained model to 0 (``nn.Dropout`` modules and the dropout rates models
    read from their config in ``forward``), as TRL does for reference-KL training: with dropout the KL is not 0 at
    step 0 and the logged terms are noisy. LoRA's ``lora_dropout`` is a setting of its own and is kept."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Compute precision of both engines (fp16 only on GPUs; ZeRO keeps fp32 master weights)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (may change on resume)."""
    attn_implementation: Optional[str] = None
    """Attention implementation passed to ``from_pretrained`` (e.g. ``sdpa``, ``flash_attention_2``; may change on
    resume)."""
    trust_remote_code: bool = False
    """Allow model code from the model folder or hub repository (may change on resume)."""
    head_path: Literal["auto", "fused", "logits"] = "auto"
    """How the output head meets the loss: ``fused`` never materialises tokens x vocabulary logits (plain linear heads,
    optional softcap); ``logits`` runs the model's own head (any head: bias, logit scaling); ``auto`` picks fused when
    the model's own logits for a few tokens, checked at start-up, are softcap(hidden @ W^T), and says why when not
    (``fused`` then is an error). May change on resume (the same numbers within float tolerance)."""
    packing: Literal["auto", "packed", "padded"] = "auto"
    """How a micro-batch's sequences reach the model (the reference's too): ``packed`` concatenates them with
    ``position_ids`` restarting at 0 at each sequence and attention kept within each sequence, as transformers derives
    from the position ids: into one row with no padding for flash_attention_2/3 (varlen kernels), else into rows as
    long as the longest sequence (a block-causal mask; only the rows' tails are padding);
    ``padded`` runs one forward per term (forget, random, normal), each padded to its own longest sequence; ``auto``
    packs when a model's hidden states for packed sequences, checked at start-up, equal those of the sequences run
    one by one, and says why when not (``packed`` then is an error; OPT, whose attention mask ignores position ids,
    is padded). May change on resume (the same numbers within float tolerance)."""
    loss_backend: Literal["auto", "torch", "chunked", "compiled", "triton"] = "auto"
    """Backend of the fused loss: ``auto`` is triton on CUDA, elsewhere compiled for an fp32 head of at least 2^22
    weights and chunked for a smaller or low-precision one (may change on resume)."""
    reference_offload: bool = False
    """Keep the reference engine's parameter shards in CPU memory (ZeRO-3 ``offload_param``; may change on
    resume)."""
    reference_cache: Literal["auto", "off", "memory", "disk"] = "auto"
    """Compute the reference's hidden states for every normal training example once, at start, then free the
    reference model except its output head: no reference forward in the loop (with LoRA: no adapters-off forward).
    ``memory``: the rows in a tensor on every rank; ``disk``: in one file per node under ``reference_cache_dir``,
    memory-mapped by its ranks, reused by a later run whose reference, precision and normal data are the same;
    ``auto``: memory up to ``reference_cache_memory_limit``, else disk, and off on the logits head path (which
    memory and disk refuse); ``off``: a reference forward every step. May change on resume (the same numbers within
    float tolerance)."""
    reference_cache_dir: Optional[str] = None
    """Folder of the disk cache file (None: ``output.dir/reference_cache``). Runs sharing it share their file while
    its key matches; may change on resume."""
    reference_cache_memory_limit: str = "2GiB"
    """Largest cache ``auto`` keeps in memory on each rank (the rows of the whole normal set: every rank may be handed
    any example); above it, ``auto`` takes disk. Units as ``output.max_shard_size``; may change on resume."""
    lora_rank: int = 0
    """0: train every weight. > 0: train LoRA adapters of this rank (peft) and use the same engine with its adapters
    disabled as the reference, so no second model is loaded. The export merges the adapters into the weights."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the weight update is lora_alpha / lora_rank * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: Optional[list[str]] = None
    """Names of the modules to adapt (None: every linear layer except the output head)."""

    def problems(self) -> list[str]:
        found = []
        if self.lora_rank < 0:
            found.append(f"model.lora_rank={self.lora_rank} must be >= 0")
        if self.lora_rank > 0:
            if self.lora_alpha <= 0:
                found.append(f"model.lora_alpha={self.lora_alpha} must be > 0")
            if not 0 <= self.lora_dropout < 1:
                found.append(f"model.lora_dropout={self.lora_dropout} must lie in [0, 1)")
            if self.reference_path and self.reference_path != self.name_or_path:
                found.append("model.reference_path: with LoRA the reference is the base model itself (adapters off)")
            if self.reference_revision:
                found.append("model.reference_revision: with LoRA the reference is the base model (adapters off)")
            if importlib.util.find_spec("peft") is None:
                found.append("model.lora_rank > 0 needs peft: pip install 'dsunlearn[lora]'")
        if self.packing not in ("auto", "packed", "padded"):
            found.append(f"model.packing={self.packing!r} must be auto, packed or padded")
        if not self.name_or_path:
            found.append("model.name_or_path is empty: give a hub id or a local folder")
        if self.reference_cache in ("memory", "disk") and self.head_path == "logits":
            found.append(f"model.reference_cache={self.reference_cache} keeps hidden states for the fused head, but "
                         f"model.head_path=logits: use reference_cache auto or off")
        try:
            parse_size(self.reference_cache_memory_limit)
        except ValueError as err:
            found.append(f"model.reference_cache_memory_limit: {err}")
        for name in ("name_or_path", "reference_path"):
            value = getattr(self, name)
            if value and names_a_local_path(value) and not Path(value).expanduser().is_dir():
                found.append(f"model.{name}: local folder {value!r} does not exist")
        return found


@dataclass
class DataConfig:
    """Forget and normal data and how samples become token sequences."""

    forget: DatasetSpec = field(
        default_factory=lambda: DatasetSpec(source="PKU-Alignment/PKU-SafeRLHF", format="pku_saferlhf")
    )
    """Forget data: unwanted (prompt, response) pairs (default PKU-SafeRLHF, unsafe responses)."""
    normal: DatasetSpec = field(
        default_factory=lambda: DatasetSpec(
            source="truthfulqa/truthful_qa", format="truthfulqa", name="generation", split="validation"
        )
    )
    """Normal data whose behaviour must be kept (default TruthfulQA, question -> best answer)."""
    holdout: Optional[DatasetSpec] = None
    """Never-seen samples of the forget data's kind (never trained on, by the original model either): the
    non-members of the membership-inference attacks, against ``forget_train`` (None: no MIA). Read whole
    (``held_out_fraction`` is ignored); prompts it shares with the forget data are reported in a warning."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template with ``{prompt}`` and ``{response}``; the response part is what the losses see."""
    use_chat_template: bool = False
    """Format prompts with the tokenizer's chat template instead of ``template``."""
    max_length: int = 512
    """Longest token sequence. A prompt is never cut: a response that does not fit loses its tail, and a pair whose
    prompt leaves no room for one response token is dropped (counted and named in the log; an error when every pair
    of a data set is dropped)."""
    seed: int = 42
    """Seed of the train/held-out splits, the shuffling and the random answers (non-negative)."""
    application: Literal["harmful", "copyright", "hallucination"] = "harmful"
    """What is unlearned, which picks the evaluation's behaviour metric (dsunlearn/eval/applications.py): ``harmful``
    answers (a harm classifier's verdict, else reproduction of the forget response), ``copyright`` text (BLEU and
    ROUGE-L of the book's continuation), ``hallucination`` (answers closer to the hallucinated answer than to the
    right one; needs ``forget.format: halueval``)."""

    def problems(self) -> list[str]:
        found = [f"data.forget: {p}" for p in self.forget.problems()]
        found += [f"data.normal: {p}" for p in self.normal.problems()]
        if self.holdout is not None:
            found += [f"data.holdout: {p}" for p in self.holdout.problems()]
        if self.application not in ("harmful", "copyright", "hallucination"):
            found.append(f"data.application={self.application!r} must be harmful, copyright or hallucination")
        if self.application == "hallucination" and self.forget.format != "halueval":
            found.append(
                f"data.application=hallucination compares answers with the right and the hallucinated answer, which "
                f"data.forget.format=halueval provides (got {self.forget.format!r})"
            )
        if self.application == "hallucination" and self.normal.format not in ("truthfulqa", "halueval"):
            found.append(
                f"data.application=hallucination compares answers with right and wrong ones, which "
                f"data.normal.format truthfulqa (or halueval) provides (got {self.normal.format!r})"
            )
        # The evaluation scores a benchmark's data with its ROUGE-L convention (eval_config.py): one for both sets.
        conventions = {BENCHMARK_ROUGE.get(spec.format) for spec in (self.forget, self.normal)} - {None}
        if len(conventions) > 1:
            found.append(
                f"data.forget.format={self.forget.format!r} and data.normal.format={self.normal.format!r} are scored "
                "with different ROUGE-L conventions (TOFU's recall, MUSE's F1), and one evaluation reports one"
            )
        try:
            PromptFormat(self.template, self.use_chat_template)
        except ValueError as err:
            found.append(f"data.template: {err}")
        if self.max_length < 8:
            found.append(f"data.max_length={self.max_length} is too small (at least 8)")
        if self.seed < 0:
            found.append(f"data.seed={self.seed} must be >= 0")
        return found


@dataclass
class ObjectiveConfig:
    """The unlearning objective: theta <- theta - e1*grad(L_fgt) - e2*grad(L_rdn) - e3*grad(L_nor), each term in a slot
    (dsunlearn/objective.py): the forget term (``forget_loss``), the random mismatch (``random_weight``; 0: off) and
    the retain term on normal data (``retain_loss``). The defaults are Yao et al.'s method; the presets of the other
    methods are bundled YAML files, ``--config configs/presets/NAME.yaml`` (yao, ga, graddiff, npo, simnpo)."""

    forget_loss: Literal["ga", "npo", "simnpo"] = "ga"
    """The forget term on forget responses y (s(y): their summed log-likelihood, n(y): their tokens): ``ga`` gradient
    ascent, -CE (Yao et al.); ``npo`` -(2/beta) log sigmoid(-beta (s_theta(y) - s_ref(y))) with s_ref(y) of the
    frozen reference, computed once before the loop (Zhang et al. 2024, "Negative Preference Optimization", as
    open-unlearning's src/trainer/unlearn/npo.py and trainer/utils.py compute_dpo_loss: sums, not length-normalised);
    ``simnpo`` -(2/beta) log sigmoid(beta (-s_theta(y)/n(y) - delta)), no reference (Fan et al. 2024, "Simplicity
    Prevails", as open-unlearning's src/trainer/unlearn/simnpo.py)."""
    retain_loss: Literal["kl", "nll"] = "kl"
    """The retain term on normal responses: ``kl`` the token-level forward KL(reference || model) (Yao et al.; the
    reference's rows are cached or forwarded every step), ``nll`` their cross-entropy (GradDiff's, NPO's and SimNPO's
    ``retain_loss_type: NLL`` in open-unlearning's configs/trainer/GradDiff.yaml, NPO.yaml, SimNPO.yaml): no
    reference at all."""
    forget_weight: float = 0.5
    """e1: weight of the forget term (Yao et al.'s paper: 0.5; open-unlearning's ``gamma``: 1 for GradDiff and NPO,
    0.125 for SimNPO, its configs/trainer/SimNPO.yaml after the SimNPO authors' ``npo_coeff``)."""
    random_weight: float = 1.0
    """e2: weight of the cross-entropy on random answers to forget prompts (paper: 1; 0 turns the term off, as the
    presets other than yao do: open-unlearning has no such term)."""
    normal_weight: float = 1.0
    """e3: weight of the retain term on normal responses (paper: 1; open-unlearning's ``alpha``: 1)."""
    npo_beta: float = 0.1
    """beta of ``forget_loss: npo`` (open-unlearning's configs/trainer/NPO.yaml: 0.1, the NPO authors' value)."""
    simnpo_beta: float = 4.5
    """beta of ``forget_loss: simnpo`` (open-unlearning's configs/trainer/SimNPO.yaml: 4.5, the SimNPO authors' TOFU
    value)."""
    simnpo_delta: float = 0.0
    """delta, the reward margin of ``forget_loss: simnpo`` (open-unlearning's configs/trainer/SimNPO.yaml: 0, the
    SimNPO authors' ``gamma`` in their TOFU config)."""
    num_random_answers: int = 5
    """K: random answers drawn independently for each forget prompt."""
    reduction: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    """``sequence_mean``: mean over each sequence's response tokens, then over sequences (the authors' code);
    ``token_mean``: mean over all response tokens of the term in the whole optimizer step (every rank, micro-step).
    The npo and simnpo forget terms are one value per sequence: ``sequence_mean`` averages them over sequences (as
    open-unlearning does), ``token_mean`` weighs each sequence by its response tokens over the step's."""
    forget_eos: bool = False
    """Whether the forget term also ascends the end of each forget answer (EOS, or the chat template's turn end).
    Off by default: pushing down the end-of-answer token after a harmful answer teaches the model not to stop, and
    the authors' OPT set-up appended none. Random and normal answers always keep theirs."""
    stop_forget_ce: Optional[float] = None
    """The authors' stopping rule: once the forget cross-entropy of a step exceeds this, unlearning is done (the run
    checkpoints, exports, evaluates and exits 0). None: run all ``train.max_steps``."""

    def problems(self) -> list[str]:
        found = []
        if self.stop_forget_ce is not None and not self.stop_forget_ce > 0:
            found.append(f"objective.stop_forget_ce={self.stop_forget_ce} must be > 0 (or null: off)")
        for name in ("forget_weight", "random_weight", "normal_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                found.append(f"objective.{name}={value} must be a finite number >= 0")
        if self.forget_weight == 0 and self.random_weight == 0:
            found.append("objective: forget_weight and random_weight are both 0, so nothing would be unlearned")
        if self.num_random_answers < 1 and self.random_weight > 0:
            found.append("objective.num_random_answers must be >= 1 when random_weight > 0")
        if self.forget_loss not in ("ga", "npo", "simnpo"):
            found.append(f"objective.forget_loss={self.forget_loss!r} must be ga, npo or simnpo")
        if self.retain_loss not in ("kl", "nll"):
            found.append(f"objective.retain_loss={self.retain_loss!r} must be kl or nll")
        for name in ("npo_beta", "simnpo_beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                found.append(f"objective.{name}={value} must be a finite number > 0")
        if not math.isfinite(self.simnpo_delta):
            found.append(f"objective.simnpo_delta={self.simnpo_delta} must be a finite number")
        return found


@dataclass
class TrainConfig:
    """Optimisation, DeepSpeed and checkpointing."""

    max_steps: int = 1000
    """Optimizer steps (paper: 1000). May grow on resume (never below the checkpoint's step): from the resumed step on
    the learning-rate schedule is that of the new value, e.g. a linear decay ends at the new ``max_steps``."""
    forget_batch_size: int = 2
    """Forget samples per rank per micro-step (paper: 2). May change on resume if the global batch (this x
    gradient_accumulation_steps x ranks) stays the same."""
    normal_batch_size: int = 2
    """Normal samples per rank per micro-step (paper: 2). May change on resume like ``forget_batch_size``."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step. May change on resume if both global batches stay the same."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer (AdamW as in the paper; plain SGD for checks)."""
    lr: float = 2e-6
    """Peak learning rate (paper: 2e-6)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """Learning-rate schedule after warm-up (paper: linear decay to 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps (paper: none)."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    deepspeed_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON for the trained model; its "auto" fields are filled from these settings, other fields must agree
    with them. A relative path is looked up from the working directory, then among the files dsunlearn ships (the
checkout's or the installed package's ds_configs/: dsunlearn/settings/paths.py). On resume
    the file may change, but its numbers must not (except memory knobs: bucket sizes, live parameters, ...)."""
    checkpoint_every: int = 200
    """Save a DeepSpeed checkpoint every this many steps (0: only at the end; may change on resume)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep, the one just written included (0: keep all; may change on resume).
    Only complete checkpoints older than the one just written are removed."""
    time_phases: bool = False
    """Time each step's phases (batch, policy forward, reference forward, head and loss, backward, optimizer, ZeRO-3
    gathers and reduces) and record them with peak memory and the step's token counts in metrics.jsonl
    (dsunlearn/runtime/step_timing.py). Synchronises the device at every phase boundary, so it slows the step a
    little; may change on resume."""
    log_every: int = 1
    """Update the progress bar every this many steps (metrics.jsonl gets every step; may change on resume)."""
    seed: int = 42
    """Seed of model-side randomness (dropout); data randomness uses data.seed."""
    collective_timeout_s: float = 600.0
    """Seconds a collective, the connection to MASTER_ADDR:MASTER_PORT, or a rank without heartbeat (stopped, frozen)
    may take before every rank ends with a message naming the cause. Raise it if one rank legitimately works alone
    for longer (e.g. loading a huge model from slow storage)."""
    max_fp16_skips: Optional[int] = 10
    """fp16: consecutive steps DeepSpeed may skip for overflow (lowering the loss scale each time) before the run stops
    as diverged (exit 3). None: no limit. In bf16 and fp32 any skipped step (non-finite gradient) stops the run."""
    max_normal_kl: Optional[float] = 5.0
    """Collapse guard: stop as diverged (exit 3) when the normal KL of a step (nats per token against the original
    model) exceeds this; a healthy run stays well below 1. None: off."""
    max_zero_grad_steps: Optional[int] = 3
    """Collapse guard: stop as diverged (exit 3) after this many consecutive steps with gradient norm exactly 0 (the
    model stopped learning, e.g. saturated to a uniform output). None: off."""

    def problems(self) -> list[str]:
        found = []
        if not self.collective_timeout_s > 0:
            found.append(f"train.collective_timeout_s={self.collective_timeout_s} must be > 0")
        for name in ("max_fp16_skips", "max_zero_grad_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                found.append(f"train.{name}={getattr(self, name)} must be >= 1 (or null: off)")
        if self.max_normal_kl is not None and not self.max_normal_kl > 0:
            found.append(f"train.max_normal_kl={self.max_normal_kl} must be > 0 (or null: off)")
        for name in ("max_steps", "forget_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                found.append(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("normal_batch_size", "warmup_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                found.append(f"train.{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            found.append(f"train.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            found.append(f"train.weight_decay={self.weight_decay} must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            found.append(f"train.betas={self.betas} must lie in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            found.append(f"train.max_grad_norm={self.max_grad_norm} must be > 0 (or null for no clipping)")
        if self.warmup_steps > self.max_steps:
            found.append(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}")
        if resolve_path(self.deepspeed_config) is None:
            found.append(f"train.deepspeed_config: file {self.deepspeed_config!r} not found")
        return found


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "outputs/run"
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, final/ (the Hugging Face export). A folder that
    holds a run is refused unless ``resume`` or ``overwrite`` is set. Every ``output`` setting may change on
    resume."""
    export: bool = True
    """Write the unlearned model in Hugging Face format (safetensors, config, tokenizer) to ``dir/final``."""
    max_shard_size: str = "5GB"
    """Largest safetensors file of the export, written as Hugging Face does ("5GB", "500MB"; KB/MB/GB are powers of
    10, KiB/MiB/GiB of 2): model.safetensors, or model-0000i-of-0000N.safetensors and an index when it takes several.
    The export gathers one module at a time and rank 0 holds one shard and one module in CPU memory, never the whole
    model."""
    evaluate: bool = False
    """Run the evaluation (original vs unlearned) at the end and write eval.json and report.md."""
    eval_max_samples: Optional[int] = None
    """Cap on prompts per evaluation set (None: all)."""
    eval_max_new_tokens: int = 48
    """Greedy generation length in the end-of-run evaluation."""
    harm_classifier: Optional[str] = None
    """Local folder of a Hugging Face sequence-classification model that judges the generations of the end-of-training
    and the in-loop evaluations (``harmful_rate``; the ``harmful`` application's behaviour), as ``dsunlearn eval
    --harm_classifier`` does. None: none. Never downloaded."""
    harmful_label: str = "harmful"
    """The harm classifier's label (from its config's ``id2label``, case-insensitive) that means harmful."""
    harm_classifier_input: str = "{prompt}\n{response}"
    """Text the harm classifier reads for one generation; ``{prompt}`` and ``{response}`` are filled in."""
    judge_classifier: Optional[str] = None
    """``data.application: hallucination``: local folder of a sequence-classification model that judges whether a
    generation is hallucinated, in the end-of-training and the in-loop evaluations (``dsunlearn eval
    --judge_classifier``). None: the ROUGE-L rule alone. Never downloaded."""
    judge_label: str = "hallucinated"
    """The judge's label (from its config's ``id2label``, case-insensitive) that means hallucinated."""
    judge_classifier_input: str = "{knowledge}\n{prompt}\n{response}"
    """Text the judge reads for one generation; ``{knowledge}``, ``{prompt}`` and ``{response}`` are filled in."""
    # ---- evaluation during training (dsunlearn/eval/eval_during.py) ----
    eval_every: Optional[int] = None
    """Evaluate the model every this many steps inside the training loop, on every rank (sharded as the end-of-run
    evaluation is), and append the results to ``dir/eval_during.jsonl`` (None or 0: off). The original model's side
    is measured once at start-up; the unlearned model's ``fluency_ppl`` is left out (the original model, its judge, is
    freed after start-up)."""
    eval_during_max_samples: Optional[int] = 32
    """Prompts per evaluation set in the evaluations during training: the first this many of each set, as
    ``eval_max_samples`` takes them (None: ``eval_max_samples``, the end-of-run evaluation's subset). The original's
    log-probabilities over the vocabulary on these prompts' response tokens are kept (fp32, on the CPU) for the KL."""
    keep_best: Optional[str] = None
    """``SET/METRIC`` of the evaluation during training that picks the best step, e.g.
    ``forget_train/reproduction_rate``; the best step is exported to ``dir/final_best`` (beside ``final/``) when it is
    evaluated, and the choice is kept in ``dir/best_step.json`` across resumes. Needs ``eval_every``."""
    keep_best_mode: Literal["min", "max"] = "min"
    """Whether the lowest (``min``) or the highest (``max``) value of ``keep_best`` is best."""
    keep_best_constraint: Optional[str] = None
    """Condition a step must meet to be kept as best: ``SET/METRIC OP NUMBER`` with OP one of <=, <, >=, >, several
    joined by ``and``, e.g. ``normal_held_out/kl <= 0.1``. None: every evaluated step qualifies."""
    tensorboard: Union[bool, str] = False
    """Also write the training metrics and the evaluations during training as TensorBoard scalars (rank 0): a folder,
    or true for ``dir/tensorboard`` (needs the tensorboard package: pip install 'dsunlearn[tensorboard]')."""

    def problems(self) -> list[str]:
        found = []
        try:
            parse_size(self.max_shard_size)
        except ValueError as err:
            found.append(f"output.max_shard_size: {err}")
        if self.eval_every is not None and self.eval_every < 0:
            found.append(f"output.eval_every={self.eval_every} must be >= 0 (0 or null: off)")
        if self.eval_during_max_samples is not None and self.eval_during_max_samples < 1:
            found.append(f"output.eval_during_max_samples={self.eval_during_max_samples} must be >= 1 (or null)")
        if self.keep_best is not None:
            if not self.eval_every:
                found.append("output.keep_best needs output.eval_every: the best step is chosen among the evaluated "
                             "steps")
            found += [f"output.keep_best: {p}" for p in eval_metric_problems(self.keep_best)]
        elif self.keep_best_constraint is not None:
            found.append("output.keep_best_constraint is set but output.keep_best is not")
        if self.keep_best_constraint is not None:
            try:
                for metric, _, _ in parse_constraint(self.keep_best_constraint):
                    found += [f"output.keep_best_constraint: {p}" for p in eval_metric_problems(metric)]
            except ValueError as err:
                found.append(f"output.keep_best_constraint: {err}")
        found += [f"output.{p}" for p in classifier_problems(
            "harm_classifier", self.harm_classifier, "harmful_label", self.harmful_label)]
        if "{response}" not in self.harm_classifier_input:
            found.append("output.harm_classifier_input must contain {response}")
        found += [f"output.{p}" for p in classifier_problems(
            "judge_classifier", self.judge_classifier, "judge_label", self.judge_label)]
        if "{response}" not in self.judge_classifier_input:
            found.append("output.judge_classifier_input must contain {response}")
        if self.tensorboard not in (False, True) and not str(self.tensorboard).strip():
            found.append("output.tensorboard is empty: give a folder, or true for output.dir/tensorboard")
        if self.tensorboard is not False and importlib.util.find_spec("tensorboard") is None:
            found.append("output.tensorboard needs the tensorboard package: pip install 'dsunlearn[tensorboard]'")
        return found


_CONSTRAINT = re.compile(r"\s*([\w./-]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_constraint(text: str) -> list[tuple[str, str, float]]:
    """``"normal_held_out/kl <= 0.1 and forget_train/nll > 2"`` -> ``[("normal_held_out/kl", "<=", 0.1), ...]``."""
    parts = []
    for part in re.split(r"\s+and\s+", text.strip()):
        match = _CONSTRAINT.fullmatch(part)
        if match is None:
            raise ValueError(f"{part!r} is not SET/METRIC OP NUMBER (OP one of <=, <, >=, >), e.g. "
                             f"'normal_held_out/kl <= 0.1'")
        parts.append((match.group(1), match.group(2), float(match.group(3))))
    return parts


def eval_metric_problems(name: str) -> list[str]:
    """Problems of a ``SET/METRIC`` name of the evaluation during training (empty when it names one)."""
    from dsunlearn.settings.eval_names import METRIC_DESCRIPTIONS, SET_ORDER  # every metric an evaluation may report

    set_name, _, metric = name.partition("/")
    found = []
    if set_name not in SET_ORDER:
        found.append(f"{name!r}: unknown set {set_name!r}; choose from {list(SET_ORDER)} (as SET/METRIC)")
    if metric == "fluency_ppl":
        found.append(f"{name!r}: the unlearned model's fluency_ppl is not measured during training (its judge, the "
                     f"original model, is freed)")
    elif metric not in METRIC_DESCRIPTIONS:
        found.append(f"{name!r}: unknown metric {metric!r}; choose from "
                     f"{[m for m in METRIC_DESCRIPTIONS if m != 'fluency_ppl']}")
    return found


@dataclass
class RunConfig:
    """All settings of one unlearning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Outputs."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``output.dir/checkpoints`` (a fresh start if there is none).
    Every setting must equal the checkpoint's (it is refused, naming each that differs) except those documented
    "may change on resume": memory and speed switches, checkpointing, logging and outputs, and the split of the
    global batch into ranks x micro-steps x per-rank batch. ``train.max_steps`` may grow (or shrink to no fewer steps
    than the checkpoint's): from the resumed step on, the learning-rate schedule is the one of the new ``max_steps``
    (a linear decay then ends at the new ``max_steps``). A run ended by ``objective.stop_forget_ce`` stays done: its
    resume goes straight to the outputs (unless the bound was raised above the forget CE that ended it, or turned
    off). A SLURM job that is requeued into the folder it owns resumes without this flag."""
    overwrite: bool = False
    """Start afresh in an ``output.dir`` that holds a run: its metrics, checkpoints and ``final/`` are removed
    first. Without this (or ``resume``) such a folder is refused."""

    def __post_init__(self):
        found = self.model.problems() + self.data.problems() + self.objective.problems() + self.train.problems()
        found += self.output.problems()
        if self.resume and self.overwrite:
            found.append("resume and overwrite are both true: continue the run in output.dir or replace it, not both")
        if self.output.eval_every and self.output.eval_every > self.train.max_steps:
            found.append(f"output.eval_every={self.output.eval_every} is larger than train.max_steps="
                         f"{self.train.max_steps}: no step would be evaluated")
        if self.output.judge_classifier is not None and self.data.application != "hallucination":
            found.append(f"output.judge_classifier judges hallucinations, but data.application is "
                         f"{self.data.application!r}")
        if self.objective.normal_weight > 0 and self.train.normal_batch_size == 0:
            found.append("train.normal_batch_size is 0 but objective.normal_weight > 0: the retain term needs "
                         "normal data")
        if found:
            raise ConfigError(found)

    def to_dict(self) -> dict:
        return asdict(self)


# Settings free to differ between a checkpoint and the run resuming it (a name covers the fields below it); every
# other field must be equal. Per-rank batch sizes and accumulation are compared through the global batch instead.
CHANGEABLE_ON_RESUME = (
    "resume", "overwrite", "output",
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.time_phases",
    "train.deepspeed_config",
    "train.forget_batch_size", "train.normal_batch_size", "train.gradient_accumulation_steps",
    "model.gradient_checkpointing", "model.attn_implementation", "model.trust_remote_code", "model.head_path",
    "model.packing", "model.loss_backend", "model.reference_offload", "model.reference_cache",
    "model.reference_cache_dir", "model.reference_cache_memory_limit",
    "train.collective_timeout_s", "train.max_fp16_skips", "train.max_normal_kl", "train.max_zero_grad_steps",
    "objective.stop_forget_ce",
    "train.max_steps",  # may grow (or shrink to no fewer than the checkpoint's steps): the schedule follows it
)

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in a size such as "5GB", "500MB" or "1.5GiB" (Hugging Face's ``max_shard_size`` units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", text, flags=re.IGNORECASE)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: a number and a unit, e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"{text!r} must be at least 1 byte")
    return size


def names_a_local_path(name: str) -> bool:
    """Whether a model name means a local folder: hub ids are "org/name" or "name", anything path-like is local."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def build_parser():
    """The parser of a run: ``--config run.yaml`` plus one flag per field (``--train.lr 2e-6``)."""
    return settings_parser(RunConfig, "dsunlearn train", launched=True)


def parse_run_config(argv: Optional[list[str]] = None) -> tuple[RunConfig, str]:
    """Parse ``argv`` into a validated ``RunConfig`` and the resolved settings as YAML (saved with every run).

    Raises ``ConfigError`` listing every problem; unknown keys and wrong types exit with jsonargparse's message.
    """
    parser = build_parser()
    namespace = parser.parse_args(_with_shipped_config_files(sys.argv[1:] if argv is None else argv))
    namespace.pop("config", None)
    namespace.pop("local_rank", None)
    resolved_yaml = parser.dump(namespace)
    run = parser.instantiate_classes(namespace)
    fields = {name: run[name] for name in RunConfig.__dataclass_fields__}
    return RunConfig(**fields), resolved_yaml


def _with_shipped_config_files(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` file that is missing from the working directory replaced by the one dsunlearn
    ships under that name, so ``--config configs/demo.yaml`` works from any folder and from an installed wheel."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_path(argv[i + 1]) or argv[i + 1])
        elif arg.startswith("--config="):
            name = arg.removeprefix("--config=")
            argv[i] = f"--config={resolve_path(name) or name}"
    return argv
