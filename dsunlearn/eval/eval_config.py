"""The settings of an evaluation (:class:`EvalConfig`: ``dsunlearn eval``'s flags, or derived from a training run)
and the tokenisation and generation context every set shares (:class:`EvalContext`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from dsunlearn.data.tokenization import resolve_pad_id, special_prefix_ids
from dsunlearn.eval import applications, metrics
from dsunlearn.settings.config import DataConfig, RunConfig, names_a_local_path
from dsunlearn.settings.dataset import BENCHMARK_ROUGE
from dsunlearn.settings.eval_names import SET_ORDER
from dsunlearn.settings.prompt_format import PromptFormat

logger = logging.getLogger(__name__)


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
    reference_revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of ``reference_path`` (None: its default branch); recorded in
    ``eval.json``. ``--run_dir`` and the end-of-training evaluation take the run's (``model.reference_revision``, or
    ``model.revision`` when the reference is the model itself)."""
    trust_remote_code: bool = False
    """Allow model code from the models' folders or hub repositories (``--run_dir``: the run's
    ``model.trust_remote_code``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Forget and normal data, prompt format, max length and split seed: give the training run's values
    so that the train/held-out split is the one the trainer used."""
    sets: list[str] = field(default_factory=lambda: list(SET_ORDER))
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
    and open-unlearning report it), ``muse`` = F1 without the stemmer (as MUSE reports it). Data of TOFU's or MUSE's
    format needs its benchmark's (``--run_dir`` and the end-of-training evaluation pick it)."""
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
    whether a generation is hallucinated (as well as the ROUGE-L rule; dsunlearn/eval/applications.py). Never
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
    collective_timeout_s: float = 600.0
    """Several ranks: the bound on every collective, and how long a silent rank is waited for before every rank ends
    (as the trainer's ``train.collective_timeout_s``; ``--run_dir``: the run's)."""
    retrained_path: Optional[str] = None
    """A model trained without the forget data (local folder or hub id): the reference AUC of MUSE's PrivLeak
    (None: no PrivLeak), and with ``data.forget.format: tofu`` the retain model of TOFU's forget quality (its truth
    ratios on ``forget_train``). Membership inference runs when ``data.holdout`` is given and ``forget_train`` is
    evaluated."""
    retain_eval: Optional[str] = None
    """``data.forget.format: tofu``: the saved ``eval.json`` of a retain model (``dsunlearn eval --model_path
    RETAIN_MODEL`` on the same data settings), whose truth ratios on ``forget_train`` give TOFU's forget quality
    without loading that model again (instead of ``retrained_path``; None: from ``retrained_path``, else no forget
    quality)."""

    @classmethod
    def from_run(cls, run: RunConfig, model_path: str) -> EvalConfig:
        """The end-of-training evaluation of ``run``: its data, split, precision, ``output.eval_*`` and classifier
        settings, the run's original model as reference (its path, revision and trust_remote_code as the trainer loads
        it), results in ``output.dir/eval``."""
        from dsunlearn.runtime.engines import pretrained_source

        out_dir = Path(run.output.dir)
        # The trainer's own source of its reference: the same path, revision and remote-code permission.
        reference_path, reference_kwargs = pretrained_source(run, reference=True)
        return cls(
            model_path=model_path,
            reference_path=reference_path,
            reference_revision=reference_kwargs.get("revision"),
            trust_remote_code=run.model.trust_remote_code,
            data=run.data,
            max_samples=run.output.eval_max_samples,
            max_new_tokens=run.output.eval_max_new_tokens,
            rouge=benchmark_rouge(run.data),
            dtype=run.model.precision,
            output_dir=str(out_dir / "eval"),
            name=out_dir.name or "unlearned",
            metrics_jsonl=str(out_dir / "metrics.jsonl"),
            collective_timeout_s=run.train.collective_timeout_s,
            harm_classifier=run.output.harm_classifier,
            harmful_label=run.output.harmful_label,
            harm_classifier_input=run.output.harm_classifier_input,
            judge_classifier=run.output.judge_classifier,
            judge_label=run.output.judge_label,
            judge_classifier_input=run.output.judge_classifier_input,
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
        unknown = [s for s in self.sets if s not in SET_ORDER]
        if unknown:
            found.append(f"sets: unknown {unknown}; choose from {list(SET_ORDER)}")
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
        if not self.collective_timeout_s > 0:
            found.append(f"collective_timeout_s={self.collective_timeout_s} must be > 0")
        if not 0.0 < self.mia_k <= 1.0:
            found.append(f"mia_k={self.mia_k} must lie in (0, 1]")
        formats = {"data.forget": self.data.forget.format, "data.normal": self.data.normal.format}
        for setting, fmt in formats.items():
            preset = BENCHMARK_ROUGE.get(fmt)
            if preset is not None and self.rouge_settings != metrics.ROUGE_PRESETS[preset]:
                found.append(
                    f"{setting}.format={fmt!r} is scored with ROUGE-L {_rouge_words(metrics.ROUGE_PRESETS[preset])} "
                    f"(rouge: {preset!r}), but the ROUGE settings give {_rouge_words(self.rouge_settings)}"
                )
        if self.retain_eval is not None:
            if self.data.forget.format != "tofu":
                found.append(f"retain_eval gives TOFU's forget quality, which needs data.forget.format=tofu "
                             f"(got {self.data.forget.format!r})")
            if self.retrained_path is not None:
                found.append("retain_eval and retrained_path both give the retain model of forget quality: give one")
            if not Path(self.retain_eval).expanduser().is_file():
                found.append(f"retain_eval: file {self.retain_eval!r} does not exist")
        if self.retrained_path is not None and (
            not self.retrained_path
            or names_a_local_path(self.retrained_path) and not Path(self.retrained_path).expanduser().is_dir()
        ):
            found.append(f"retrained_path: local folder {self.retrained_path!r} does not exist")
        return found


def benchmark_rouge(data: DataConfig) -> str:
    """The ROUGE preset of the data's benchmark (TOFU's or MUSE's format, the forget data's first), else ``tofu``."""
    for spec in (data.forget, data.normal):
        if spec.format in BENCHMARK_ROUGE:
            return BENCHMARK_ROUGE[spec.format]
    return "tofu"


def _rouge_words(settings: tuple[str, bool]) -> str:
    return f"{settings[0]}, stemmer {'on' if settings[1] else 'off'}"


class EvalContext:
    """Tokenisation and generation settings shared by every set."""

    def __init__(self, tokenizer, cfg: EvalConfig, world_size: int):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.world_size = world_size
        self.prompt_format = PromptFormat(cfg.data.template, cfg.data.use_chat_template)
        self.prefix_ids = special_prefix_ids(tokenizer)
        self.pad_id = resolve_pad_id(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: generations could not end")

    @staticmethod
    def device(model) -> torch.device:
        return next(model.parameters()).device
