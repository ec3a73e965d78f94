"""Evaluation of an unlearned model against the original: ``python -m dsunlearn eval …``.

Three prompt sets, built with the trainer's own split (same seed and ``held_out_fraction``):

* ``forget_train``: the forget pairs the model was trained to forget;
* ``forget_held_out``: forget pairs kept out of training (does unlearning generalise?);
* ``normal_held_out``: normal pairs kept out of training (is utility kept?).

On every set both models (original and unlearned) get the same measurements, so each metric has a
before and an after:

* teacher-forced NLL per response token of the dataset response (``nll``, ``ppl``), and the mean
  per-token KL(original ‖ unlearned) over the same response tokens (``kl``; 0 for the original);
* greedy generations, scored with :mod:`dsunlearn.metrics`: ``reproduction_rate`` (ROUGE-L of
  the dataset response ≥ ``reproduction_threshold``), mean ROUGE-L (``rouge_l_recall`` under the
  default ``tofu`` preset; ``rouge_l_f1`` under ``muse``: the key names the measure), diversity
  (``distinct_1``, ``distinct_2``), fluency (``fluency_ppl``: perplexity of the generated tokens
  under the *original* model), ``generation_tokens``, and, with a harm classifier, ``harmful_rate``;
* for the unlearned model, ``similarity_to_original``: mean ROUGE-L F1 between its generation and
  the original model's generation for the same prompt;
* the behaviour of ``data.application`` (:mod:`dsunlearn.applications`): ``behaviour_rate`` on every
  set, and the application's own means (copyright ``bleu`` and ``rouge_l``, hallucination
  ``hallucination_rate``).

With ``data.holdout`` (never-seen samples of the forget data's kind), membership inference
(:mod:`dsunlearn.mia`) between ``forget_train`` and the holdout gives ``mia`` in ``eval.json``.

ROUGE-L is ``rouge-score``'s (see :mod:`dsunlearn.metrics`). Token-level means are over all
response tokens of a set (sum of NLL / number of tokens). A perplexity too large for a double (mean
NLL above ~709 nats, after heavy gradient ascent) is written as ``null`` (``Infinity`` is not
JSON); the report shows it as "–".

Every rate and mean of a set has a percentile bootstrap confidence interval over the set's samples
in ``summary[role][set]["ci"][metric] = [low, high]`` (:func:`dsunlearn.metrics.bootstrap_ci`,
seeded; token-level means resample whole samples; ``ppl`` and ``fluency_ppl`` are exp of their
mean NLL's interval). The corpus-level ``distinct_n`` has none.

Under ``torchrun``/``deepspeed`` (``WORLD_SIZE`` > 1) both models are ZeRO-3 inference engines:
each rank evaluates a contiguous shard of every set, every rank makes the same number of forward
and ``generate(synced_gpus=True)`` calls (a short shard is padded with repeated samples whose
results are dropped), and per-sample results are gathered in the original order, so the numbers
equal a single-process run. Rank 0 writes ``eval.json``, ``samples.jsonl`` and ``report.md`` (with
PNG plots) to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from dsunlearn import applications, metrics, mia, noise
from dsunlearn import data as data_lib
from dsunlearn.config import ConfigError, DataConfig, RunConfig, names_a_local_path
from dsunlearn.strict_json import to_json
from dsunlearn.report import write_report

logger = logging.getLogger(__name__)

SET_NAMES = ("forget_train", "forget_held_out", "normal_held_out")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODEL_ROLES = ("original", "unlearned")


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts, and where the results go."""

    model_path: str = ""
    """The unlearned model: a local Hugging Face folder (e.g. a run's ``final/`` export) or a hub id."""
    reference_path: str = ""
    """The original model, before unlearning, as a local folder or hub id (the "before" column, the KL
    reference and the fluency judge)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Forget and normal data, prompt format, max length and split seed: give the training run's values
    so that the train/held-out split is the one the trainer used."""
    sets: list[str] = field(default_factory=lambda: list(SET_NAMES))
    """Which prompt sets to evaluate, from ``forget_train``, ``forget_held_out``, ``normal_held_out``."""
    max_samples: Optional[int] = None
    """Evaluate only the first this many pairs of each set (None: all)."""
    max_new_tokens: int = 48
    """Length limit of the greedy generations."""
    batch_size: int = 8
    """Sequences per forward or ``generate`` call, per rank."""
    reproduction_threshold: float = metrics.DEFAULT_REPRODUCTION_THRESHOLD
    """A generation reproduces the dataset response when its ROUGE-L of the response (the preset's measure) is at
    least this."""
    rouge: Literal["tofu", "muse"] = "tofu"
    """ROUGE-L convention (``rouge-score``'s rougeL): ``tofu`` = recall with the Porter stemmer (the default, as TOFU
    and open-unlearning report it), ``muse`` = F1 without the stemmer (as MUSE reports it)."""
    rouge_measure: Optional[Literal["recall", "precision", "f1"]] = None
    """ROUGE-L measure reported and thresholded, overriding the preset's (None: the preset's)."""
    rouge_stemmer: Optional[bool] = None
    """Whether ROUGE-L Porter-stems words, overriding the preset's (None: the preset's)."""
    confidence_level: float = 0.95
    """Level of the bootstrap confidence intervals on every rate and mean (``ci`` in eval.json, brackets in the
    report)."""
    bootstrap_resamples: int = 1000
    """Resamples of each percentile bootstrap interval (``scipy.stats.bootstrap``, seeded)."""
    harm_classifier: Optional[str] = None
    """Local folder of a Hugging Face sequence-classification model that judges generations (None: no
    ``harmful_rate``). Never downloaded."""
    harmful_label: str = "harmful"
    """The classifier's label (from its config's ``id2label``, case-insensitive) that means harmful."""
    harm_classifier_input: str = "{prompt}\n{response}"
    """Text the classifier reads for one generation; ``{prompt}`` and ``{response}`` are filled in."""
    judge_classifier: Optional[str] = None
    """``data.application: hallucination``: local folder of a Hugging Face sequence-classification model that judges
    whether a generation is hallucinated (as well as the ROUGE-L rule; dsunlearn/applications.py). Never
    downloaded."""
    judge_label: str = "hallucinated"
    """The judge's label (from its config's ``id2label``, case-insensitive) that means hallucinated."""
    judge_classifier_input: str = "{knowledge}\n{prompt}\n{response}"
    """Text the judge reads for one generation; ``{knowledge}`` (HaluEval's), ``{prompt}`` and ``{response}`` are
    filled in."""
    output_dir: str = "outputs/eval"
    """Folder for ``eval.json``, ``samples.jsonl``, ``report.md`` and its PNG plots."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision both models run in (log-probabilities are always computed in fp32)."""
    offload_param: bool = False
    """Under ZeRO-3 (several ranks), keep the parameter shards in CPU memory."""
    name: str = "unlearned"
    """Column name of the unlearned model in the report."""
    metrics_jsonl: Optional[str] = None
    """The training run's ``metrics.jsonl``, to plot the objective terms over the steps (optional)."""
    mia_k: float = 0.4
    """Fraction of a sequence's least likely tokens that the Min-k% and Min-k%++ attacks average (MUSE: 0.4)."""
    retrained_path: Optional[str] = None
    """A model trained without the forget data (local folder or hub id): the reference AUC of MUSE's PrivLeak
    (None: no PrivLeak). Membership inference runs when ``data.holdout`` is given and ``forget_train`` is evaluated."""

    @classmethod
    def from_run(cls, run: RunConfig, model_path: str) -> EvalConfig:
        """The end-of-training evaluation of ``run``: its data, split, precision and ``output.eval_*`` settings,
        the run's original model as reference, results in ``output.dir/eval``."""
        out_dir = Path(run.output.dir)
        return cls(
            model_path=model_path,
            reference_path=run.model.reference_path or run.model.name_or_path,
            data=run.data,
            max_samples=run.output.eval_max_samples,
            max_new_tokens=run.output.eval_max_new_tokens,
            dtype=run.model.precision,
            output_dir=str(out_dir / "eval"),
            name=out_dir.name or "unlearned",
            metrics_jsonl=str(out_dir / "metrics.jsonl"),
        )

    @property
    def rouge_settings(self) -> tuple[str, bool]:
        """(measure, stemmer) of ROUGE-L: the preset's, each overridden when set."""
        return metrics.rouge_settings(self.rouge, self.rouge_measure, self.rouge_stemmer)

    @property
    def rouge_key(self) -> str:
        """The summary's key of the mean ROUGE-L: ``rouge_l_<measure>``."""
        return f"rouge_l_{self.rouge_settings[0]}"

    def problems(self) -> list[str]:
        """Every problem with these settings, as readable messages (empty when all is well)."""
        found = []
        for name in ("model_path", "reference_path"):
            value = getattr(self, name)
            if not value:
                found.append(f"{name} is empty: give a local model folder or a hub id")
            elif names_a_local_path(value) and not Path(value).expanduser().is_dir():
                found.append(f"{name}: local folder {value!r} does not exist")
        return found + self.data.problems() + self.evaluation_problems()

    def evaluation_problems(self) -> list[str]:
        """The problems of the settings :func:`evaluate_models` uses (it is given the models and the sets)."""
        found = []
        unknown = [s for s in self.sets if s not in SET_NAMES]
        if unknown:
            found.append(f"sets: unknown {unknown}; choose from {list(SET_NAMES)}")
        if not self.sets:
            found.append("sets is empty: evaluate at least one set")
        if len(set(self.sets)) != len(self.sets):
            found.append(f"sets lists a set twice: {self.sets}")
        if self.max_samples is not None and self.max_samples < 1:
            found.append(f"max_samples={self.max_samples} must be >= 1 (or None for all)")
        if self.max_new_tokens < 1:
            found.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            found.append(f"batch_size={self.batch_size} must be >= 1")
        if not 0.0 <= self.reproduction_threshold <= 1.0:
            found.append(f"reproduction_threshold={self.reproduction_threshold} must lie in [0, 1]")
        if self.rouge not in metrics.ROUGE_PRESETS:
            found.append(f"rouge: unknown preset {self.rouge!r}; choose from {list(metrics.ROUGE_PRESETS)}")
        if self.rouge_measure is not None and self.rouge_measure not in metrics.ROUGE_MEASURES:
            found.append(f"rouge_measure: unknown {self.rouge_measure!r}; choose from {list(metrics.ROUGE_MEASURES)}")
        if not 0.0 < self.confidence_level < 1.0:
            found.append(f"confidence_level={self.confidence_level} must lie strictly between 0 and 1")
        if self.bootstrap_resamples < 1:
            found.append(f"bootstrap_resamples={self.bootstrap_resamples} must be >= 1")
        found += applications.classifier_problems(
            "harm_classifier", self.harm_classifier, "harmful_label", self.harmful_label
        )
        if "{response}" not in self.harm_classifier_input:
            found.append("harm_classifier_input must contain {response}")
        found += applications.classifier_problems(
            "judge_classifier", self.judge_classifier, "judge_label", self.judge_label
        )
        if "{response}" not in self.judge_classifier_input:
            found.append("judge_classifier_input must contain {response}")
        if self.judge_classifier is not None and self.data.application != "hallucination":
            found.append(
                f"judge_classifier judges hallucinations, but data.application is {self.data.application!r}"
            )
        if self.dtype not in DTYPES:
            found.append(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.metrics_jsonl is not None and not Path(self.metrics_jsonl).is_file():
            found.append(f"metrics_jsonl: file {self.metrics_jsonl!r} does not exist")
        if not self.name:
            found.append("name is empty")
        if not 0.0 < self.mia_k <= 1.0:
            found.append(f"mia_k={self.mia_k} must lie in (0, 1]")
        if self.retrained_path is not None and (
            not self.retrained_path
            or names_a_local_path(self.retrained_path) and not Path(self.retrained_path).expanduser().is_dir()
        ):
            found.append(f"retrained_path: local folder {self.retrained_path!r} does not exist")
        return found


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def build_eval_sets(
    data_cfg: DataConfig, set_names: Sequence[str], max_samples: Optional[int] = None
) -> tuple[dict[str, list], dict[str, dict]]:
    """The requested prompt sets as ``{name: [Pair, ...]}``, split exactly as the trainer splits them (plus the
    never-seen ``holdout`` of ``data.holdout`` when ``forget_train`` is requested: membership inference), and a record
    of each split made (``{"forget" | "normal": data.split_record(...)}``: pairs, prompts, and the prompts both sides
    share, which must be 0).

    Forget and normal pairs are each split by prompt with their own ``held_out_fraction`` and ``data_cfg.seed``
    (:func:`dsunlearn.data.split_pairs`); the random-answer pool and training never see the held-out part.
    """
    sets, splits = {}, {}
    if any(name.startswith("forget") for name in set_names):
        forget = data_lib.load_pairs(data_cfg.forget)
        forget_train, forget_held_out = data_lib.split_pairs(forget, data_cfg.forget.held_out_fraction, data_cfg.seed)
        sets.update(forget_train=forget_train, forget_held_out=forget_held_out)
        splits["forget"] = data_lib.split_record(forget_train, forget_held_out)
        if data_cfg.holdout is not None and mia.MEMBER_SET in set_names:
            sets[mia.NONMEMBER_SET] = data_lib.load_pairs(data_cfg.holdout)
            overlap = mia.overlap_warning(forget, sets[mia.NONMEMBER_SET])
            if overlap:
                logger.warning(overlap)
            set_names = [*set_names, mia.NONMEMBER_SET]
    if "normal_held_out" in set_names:
        normal_train, sets["normal_held_out"] = data_lib.split_pairs(
            data_lib.load_pairs(data_cfg.normal), data_cfg.normal.held_out_fraction, data_cfg.seed
        )
        splits["normal"] = data_lib.split_record(normal_train, sets["normal_held_out"])
    return {name: sets[name][:max_samples] for name in set_names}, splits


def run_evaluation(cfg: EvalConfig) -> dict:
    """Load both models, evaluate every requested set, write the outputs on rank 0; return the summary.

    One process: plain ``from_pretrained`` on CUDA if there is one, else the CPU. Under a launcher
    with ``WORLD_SIZE`` > 1: ZeRO-3 inference engines, prompts sharded over the ranks.
    """
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    from transformers import AutoTokenizer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world_size > 1:
        from dsunlearn import distributed

        rank, world_size, _ = distributed.init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    sets, splits = build_eval_sets(cfg.data, cfg.sets, cfg.max_samples)
    # The engines own the ZeRO-3 hooks of the models: they stay referenced until the evaluation is done.
    model, reference, _engines = load_models(cfg, world_size)
    summary = evaluate_models(
        model, reference, tokenizer, sets, cfg, rank=rank, world_size=world_size, splits=splits
    )
    if world_size > 1:
        # Without the teardown, exit can abort in C++ now and then ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def load_models(cfg: EvalConfig, world_size: int):
    """(unlearned model, original model, engines): plain models in one process, else ZeRO-3 inference engines.

    With engines, the returned models are their ``.module`` (Hugging Face models whose parameters are
    ZeRO-3 shards); keep the engines alive while the models are used.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if world_size > 1:
        from dsunlearn import engines
        from dsunlearn.ds_config import inference_ds_config

        ds_config = inference_ds_config(dtype, offload=cfg.offload_param)
        model_engine = engines.load_inference_engine(cfg.model_path, ds_config, dtype)
        reference_engine = engines.load_inference_engine(cfg.reference_path, ds_config, dtype)
        return model_engine.module, reference_engine.module, (model_engine, reference_engine)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(cfg.reference_path, dtype=dtype).to(device).eval()
    return model, reference, ()


def evaluate_models(
    model,
    reference,
    tokenizer,
    sets: dict[str, list],
    cfg: EvalConfig,
    rank: int = 0,
    world_size: int = 1,
    splits: Optional[dict[str, dict]] = None,
) -> dict:
    """Evaluate ``model`` (unlearned) against ``reference`` (original) on ``sets`` and write the outputs.

    ``sets``: ``{set name: [data.Pair, ...]}``, the same on every rank (see :func:`build_eval_sets`).
    ``model``/``reference``: Hugging Face causal LMs, plain or the ``.module`` of ZeRO-3 engines; with
    ``world_size`` > 1 this is a collective: call it on every rank. Returns the summary written to
    ``eval.json`` (on every rank); rank 0 also writes ``samples.jsonl`` and ``report.md``. ``splits`` (from
    :func:`build_eval_sets`) goes into ``eval.json`` as ``split``. Pairs whose prompt leaves no room for a response
    within ``data.max_length`` are left out, as training leaves them out. With a never-seen ``holdout`` set beside
    ``forget_train`` (:func:`build_eval_sets` adds ``data.holdout``), ``summary["mia"]`` holds the membership-inference
    AUCs of :mod:`dsunlearn.mia` (the holdout gets no other measurement).
    """
    problems = cfg.evaluation_problems()
    if problems:
        raise ConfigError(problems)
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"the models' vocabularies differ ({model.config.vocab_size} vs {reference.config.vocab_size}): "
            "KL and fluency need the original model's tokenizer"
        )
    context = _Context(tokenizer, cfg, world_size)
    classifiers = applications.load_classifiers(cfg, context.device(model))

    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    summary: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model_path,
        "reference": cfg.reference_path,
        "metrics_jsonl": cfg.metrics_jsonl,
        "world_size": world_size,
        "config": _config_record(cfg),
        "split": splits or {},
        "num_samples": {},
        "original": {},
        "unlearned": {},
    }
    samples = []
    try:
        with torch.no_grad():
            for set_name, pairs in sets.items():
                if set_name == mia.NONMEMBER_SET:
                    continue  # never-seen samples serve the membership inference only (below)
                fitting = data_lib.tokenize_pairs(
                    tokenizer, pairs, context.prompt_format, cfg.data.max_length, name=set_name
                )
                if fitting.dropped and rank == 0:
                    logger.warning("set %s: %s", set_name, fitting.summary())
                pairs = fitting.pairs
                if not pairs:
                    if rank == 0:
                        logger.warning("set %s is empty (held_out_fraction 0?): skipped", set_name)
                    continue
                if rank == 0:
                    logger.info("evaluating %s: %d prompts on %d rank(s)", set_name, len(pairs), world_size)
                shard, num_real = _shard(len(pairs), rank, world_size)
                records = _evaluate_shard(model, reference, [pairs[i] for i in shard], context, classifiers)
                for index, record in zip(shard[:num_real], records[:num_real]):
                    record["index"] = index
                records = _gather(records[:num_real], world_size)
                summary["num_samples"][set_name] = len(records)
                for role in MODEL_ROLES:
                    summary[role][set_name] = _summarize(records, role, cfg)
                samples += [_sample_row(set_name, record, cfg.rouge_key) for record in records]
            if mia.MEMBER_SET in sets and mia.NONMEMBER_SET in sets:
                members, nonmembers = sets[mia.MEMBER_SET], sets[mia.NONMEMBER_SET]
                summary["mia"] = mia.evaluate_mia(
                    model, reference, tokenizer, members, nonmembers, context, rank, world_size
                )
    finally:
        model.train(modes[0])
        reference.train(modes[1])

    if rank == 0:
        write_outputs(cfg, summary, samples)
    if world_size > 1:
        torch.distributed.barrier()
    return summary


def write_outputs(cfg: EvalConfig, summary: dict, samples: list[dict]) -> Path:
    """Write ``eval.json``, ``samples.jsonl`` and ``report.md`` (+ PNGs) to ``cfg.output_dir``; return the folder."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(to_json(summary, indent=2) + "\n")
    with open(out_dir / "samples.jsonl", "w") as handle:
        for row in samples:
            handle.write(to_json(row, ensure_ascii=False) + "\n")
    report = write_report(out_dir, [(cfg.name, summary, cfg.metrics_jsonl)])
    logger.info("evaluation written to %s (eval.json, samples.jsonl, %s)", out_dir, report.name)
    return out_dir


def build_parser():
    """The jsonargparse parser of ``dsunlearn eval``: ``--config eval.yaml`` plus one flag per field."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="dsunlearn eval", description=EvalConfig.__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of settings (flags after it override)")
    parser.add_class_arguments(EvalConfig, as_group=False)
    # The deepspeed launcher appends --local_rank; the rank comes from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (ignored)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """``dsunlearn eval --model_path RUN/final --reference_path ORIGINAL [--data.forget.source …] …``, or
    ``dsunlearn eval --run_dir RUN [...]``: the run's export, original model, data settings and precision."""
    import argparse

    noise.silence_known_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir_parser = argparse.ArgumentParser(add_help=False)
    run_dir_parser.add_argument("--run_dir")
    known, argv = run_dir_parser.parse_known_args(argv)
    parser = build_parser()
    parser.add_argument("--run_dir", help="a training run's output folder: its settings become the defaults")
    if known.run_dir:
        parser.set_defaults(_run_defaults(Path(known.run_dir)))
    namespace = parser.parse_args(argv)
    namespace.pop("run_dir", None)
    namespace.pop("config", None)
    namespace.pop("local_rank", None)
    parsed = parser.instantiate(namespace)
    cfg = EvalConfig(**{name: parsed[name] for name in EvalConfig.__dataclass_fields__})
    return run_evaluation(cfg)


def _run_defaults(run_dir: Path) -> dict:
    """Flat ``{"data.forget.source": …}`` defaults from a training run's saved ``config.yaml``."""
    from dsunlearn.config import parse_run_config

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"dsunlearn eval: --run_dir {run_dir}: no config.yaml there (is it a training run's output?)")
    run, _ = parse_run_config(["--config", str(config_file)])
    defaults = EvalConfig.from_run(run, model_path=str(run_dir / "final"))
    defaults.output_dir = str(run_dir / "eval")

    def flatten(prefix: str, settings) -> dict:
        # A nested group (data, data.forget) has one argument per field; an optional one (data.holdout) is a single
        # argument whose value is the whole object.
        flat = {}
        declared = typing.get_type_hints(type(settings))
        for setting in fields(settings):
            value = getattr(settings, setting.name)
            if is_dataclass(declared[setting.name]):
                flat.update(flatten(f"{prefix}{setting.name}.", value))
            else:
                flat[prefix + setting.name] = asdict(value) if is_dataclass(value) else value
        return flat

    return flatten("", defaults)


# ----------------------------------------------------------------------------------------------------
# One rank's work
# ----------------------------------------------------------------------------------------------------


class _Context:
    """Tokenisation and generation settings shared by every set."""

    def __init__(self, tokenizer, cfg: EvalConfig, world_size: int):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.world_size = world_size
        self.prompt_format = data_lib.PromptFormat(cfg.data.template, cfg.data.use_chat_template)
        self.prefix_ids = data_lib.special_prefix_ids(tokenizer)
        self.pad_id = data_lib.resolve_pad_id(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: generations could not end")

    @staticmethod
    def device(model) -> torch.device:
        return next(model.parameters()).device


def _shard(num_samples: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """(this rank's indices, how many of them are real): a contiguous block of ``ceil(n / world_size)``.

    A short last block is padded by repeating its samples (sample 0 when it has none), so every rank
    makes the same number of collective forward and ``generate`` calls; padded results are dropped.
    """
    per_rank = math.ceil(num_samples / world_size)
    real = list(range(min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)))
    filler = real or [0]
    return real + [filler[i % len(filler)] for i in range(per_rank - len(real))], len(real)


def _gather(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's records, in sample order, on every rank."""
    if world_size == 1:
        return records
    parts: list[Optional[list[dict]]] = [None] * world_size
    torch.distributed.all_gather_object(parts, records)
    return sorted((record for part in parts for record in part), key=lambda record: record["index"])


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _evaluate_shard(
    model, reference, pairs: list, context: _Context, classifiers: applications.Classifiers
) -> list[dict]:
    """Per-pair measurements for one rank's shard (including its padding)."""
    cfg, tokenizer = context.cfg, context.tokenizer
    sequences = [
        data_lib.tokenize_pair(tokenizer, pair, context.prompt_format, cfg.data.max_length, context.prefix_ids)
        for pair in pairs
    ]
    records = _teacher_forced(model, reference, sequences, context)
    prompts = [
        data_lib.tokenize_prompt(tokenizer, pair.prompt, context.prompt_format, cfg.data.max_length, context.prefix_ids)
        for pair in pairs
    ]
    for role, generator in (("unlearned", model), ("original", reference)):
        generations = _generate(generator, prompts, context)
        # Fluency: the original model judges the generated tokens, prompt included as context.
        judged = [
            data_lib.TokenizedSequence(prompt + generated, [0] * len(prompt) + [1] * len(generated))
            for prompt, generated in zip(prompts, generations)
        ]
        fluency = _nll_sums(reference, judged, context)
        for record, side in zip(records, generation_fields(pairs, generations, fluency, context, classifiers)):
            record[role].update(side)
    for record, pair in zip(records, pairs):
        record.update(prompt=pair.prompt, response=pair.response)
        record["similarity_to_original"] = similarity(record["unlearned"]["output"], record["original"]["output"], cfg)
    return records


def generation_fields(
    pairs: list, generations: list[list[int]], fluency_nll_sums: list[float], context: _Context,
    classifiers: applications.Classifiers,
) -> list[dict]:
    """One model's side of each pair's record from its generated tokens: the text, its length, the fluency NLL sum
    (under the original), ROUGE-L of the dataset response (the ``rouge`` preset's measure) and the application's
    scores (``behaviour``, ``harmful`` with a harm classifier, ``bleu``, ``hallucinated``, ...). The in-loop
    evaluation (eval_during.py) builds its records with it too, so both give the same numbers."""
    cfg = context.cfg
    texts = [context.tokenizer.decode(generated, skip_special_tokens=True).strip() for generated in generations]
    scores = applications.sample_scores(cfg.data.application, pairs, texts, cfg, classifiers)
    return [
        {"output": text, "generated_tokens": len(generated), "fluency_nll_sum": nll_sum, "harmful": None,
         "rouge_l": metrics.rouge_l(text, pair.response, *cfg.rouge_settings), **score}
        for pair, generated, text, nll_sum, score in zip(pairs, generations, texts, fluency_nll_sums, scores)
    ]


def similarity(unlearned_output: str, original_output: str, cfg: EvalConfig) -> float:
    """ROUGE-L F1 of the unlearned model's generation against the original's (symmetric; the preset's stemmer)."""
    return metrics.rouge_l(unlearned_output, original_output, "f1", cfg.rouge_settings[1])


def _response_log_probs(model, batch: dict[str, torch.Tensor], device: torch.device):
    """fp32 log-softmax over the vocabulary at the positions that predict response tokens.

    Returns (log_probs [M, V], targets [M], row [M]): M response tokens of the batch, flattened; ``row``
    says which sequence each came from.
    """
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    # Position t predicts token t+1: drop the last position's logits and the first token's mask entry.
    predicts_response = batch["response_mask"][:, 1:].to(device).bool()  # [B, L-1]
    log_probs = F.log_softmax(logits[:, :-1][predicts_response].float(), dim=-1)  # [M, V]
    targets = input_ids[:, 1:][predicts_response]  # [M]
    row = predicts_response.nonzero()[:, 0]  # [M]
    return log_probs, targets, row


def _per_sequence_sums(values: torch.Tensor, row: torch.Tensor, num_sequences: int) -> list[float]:
    sums = torch.zeros(num_sequences, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, row, values.double()).tolist()


def _teacher_forced(model, reference, sequences: list, context: _Context) -> list[dict]:
    """Per sequence: NLL sums of the response under both models, the KL(original ‖ unlearned) sum, token count."""
    records = []
    for chunk in _chunks(sequences, context.cfg.batch_size):
        batch = data_lib.pad_batch(chunk, context.pad_id)
        log_probs, targets, row = _response_log_probs(model, batch, context.device(model))
        ref_log_probs, _, _ = _response_log_probs(reference, batch, context.device(model))
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
        ref_nll = -ref_log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
        kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)  # [M]
        sums = [_per_sequence_sums(values, row, len(chunk)) for values in (nll, ref_nll, kl)]
        for i, sequence in enumerate(chunk):
            records.append(
                {
                    "response_tokens": sum(sequence.response_mask),
                    "kl_sum": sums[2][i],
                    "unlearned": {"nll_sum": sums[0][i]},
                    "original": {"nll_sum": sums[1][i]},
                }
            )
    return records


def _nll_sums(model, sequences: list, context: _Context) -> list[float]:
    """Per sequence: summed NLL of its response-masked tokens under ``model``."""
    sums = []
    for chunk in _chunks(sequences, context.cfg.batch_size):
        batch = data_lib.pad_batch(chunk, context.pad_id)
        log_probs, targets, row = _response_log_probs(model, batch, context.device(model))
        sums += _per_sequence_sums(-log_probs.gather(1, targets[:, None]).squeeze(1), row, len(chunk))
    return sums


def _generate(model, prompts: list[list[int]], context: _Context) -> list[list[int]]:
    """Greedy continuations of ``prompts``: new token ids up to and including the first EOS."""
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, context.tokenizer)
    generation_config = GenerationConfig(
        max_new_tokens=context.cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=context.pad_id,
        eos_token_id=sorted(eos_ids),
    )
    device = context.device(model)
    generations = []
    for chunk in _chunks(prompts, context.cfg.batch_size):
        # Left padding: every prompt ends at the same position, where generation starts.
        width = max(len(prompt) for prompt in chunk)
        input_ids = torch.full((len(chunk), width), context.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            synced_gpus=context.world_size > 1,
        )
        for new_tokens in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(new_tokens) if token in eos_ids), len(new_tokens))
            generations.append(new_tokens[:end])
    return generations


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return {tokenizer.eos_token_id, *configured}


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------


def _summarize(records: list[dict], role: str, cfg: EvalConfig) -> dict:
    """The metrics of one model (``role``) on one set, from per-sample records in sample order, with the
    bootstrap confidence interval of every rate and mean under ``"ci"``."""
    tokens = [r["response_tokens"] for r in records]
    nll_sums = [r[role]["nll_sum"] for r in records]
    outputs = [r[role]["output"] for r in records]
    generated = [r[role]["generated_tokens"] for r in records]
    fluency_sums = [r[role]["fluency_nll_sum"] for r in records]
    rouge = [r[role]["rouge_l"] for r in records]
    # Per-sample values of each mean (a 0/1 flag for a rate) and (numerators, denominators) of each token-level mean.
    means = {
        "reproduction_rate": [float(value >= cfg.reproduction_threshold) for value in rouge],
        cfg.rouge_key: rouge,
    }
    ratios = {"nll": (nll_sums, tokens), "kl": ([0.0 if role == "original" else r["kl_sum"] for r in records], tokens)}
    if records[0][role]["harmful"] is not None:  # a harm classifier judged the generations
        means["harmful_rate"] = [float(r[role]["harmful"]) for r in records]
    # The application's rates and means (dsunlearn/applications.py): behaviour_rate, bleu, hallucination_rate.
    means.update(applications.sample_means([r[role] for r in records]))
    if role == "unlearned":
        means["similarity_to_original"] = [r["similarity_to_original"] for r in records]
    means["generation_tokens"] = generated
    ratios["fluency_nll"] = (fluency_sums, generated)

    result = {
        "nll": sum(nll_sums) / sum(tokens),
        "ppl": metrics.perplexity(sum(nll_sums), sum(tokens)),
        "kl": sum(ratios["kl"][0]) / sum(tokens),
    }
    result.update({name: sum(values) / len(values) for name, values in means.items()})
    result.update(
        distinct_1=metrics.distinct_n(outputs, 1),
        distinct_2=metrics.distinct_n(outputs, 2),
        fluency_ppl=metrics.perplexity(sum(fluency_sums), sum(generated)),
    )
    result["ci"] = _intervals(means, ratios, cfg)
    return result


def _intervals(means: dict[str, list], ratios: dict[str, tuple[list, list]], cfg: EvalConfig) -> dict:
    """``{metric: [low, high]}``: the bootstrap interval of each mean and token-level mean, and of the perplexities
    (exp of their mean NLL's interval: the percentile interval follows a monotone map exactly)."""
    def interval(values, statistic):
        return metrics.bootstrap_ci(values, statistic, cfg.confidence_level, cfg.bootstrap_resamples)

    found = {name: interval(values, "mean") for name, values in means.items()}
    found.update({name: interval(values, "ratio") for name, values in ratios.items()})
    found["ppl"] = tuple(map(_exp, found["nll"]))
    found["fluency_ppl"] = tuple(map(_exp, found.pop("fluency_nll")))
    return {name: list(bounds) for name, bounds in found.items()}


def _exp(mean_nll: float) -> float:
    # As metrics.perplexity: past ~709 nats exp overflows a double.
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _sample_row(set_name: str, record: dict, rouge_key: str) -> dict:
    row = {
        "set": set_name,
        "index": record["index"],
        "prompt": record["prompt"],
        "response": record["response"],
        "original_output": record["original"]["output"],
        "unlearned_output": record["unlearned"]["output"],
        "original_nll": record["original"]["nll_sum"] / record["response_tokens"],
        "unlearned_nll": record["unlearned"]["nll_sum"] / record["response_tokens"],
        "kl": record["kl_sum"] / record["response_tokens"],
        f"original_{rouge_key}": record["original"]["rouge_l"],
        f"unlearned_{rouge_key}": record["unlearned"]["rouge_l"],
        "similarity_to_original": record["similarity_to_original"],
    }
    if record["unlearned"]["harmful"] is not None:
        row.update(original_harmful=record["original"]["harmful"], unlearned_harmful=record["unlearned"]["harmful"])
    # ---- the application's per-sample scores (dsunlearn/applications.py) ----
    for role in MODEL_ROLES:
        row.update({f"{role}_{key}": value for key, value in record[role].items() if key in applications.SAMPLE_KEYS})
    return row


def _config_record(cfg: EvalConfig) -> dict:
    """The settings as JSON values (nested dataclasses become objects)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


if __name__ == "__main__":
    main()
