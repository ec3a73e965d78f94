"""Relearning robustness: ``python -m dsunlearn relearn``. How fast does an unlearned behaviour come back?

A model (the original, the unlearned export, or one never taught the behaviour) is fine-tuned for ``steps`` steps on
part of the forget data, and every ``eval_every`` steps (and at step 0) the application's behaviour rate
(:func:`dsunlearn.eval.applications.behaviour_flags` on greedy generations) is measured on the forget prompts it is NOT
fine-tuned on. A behaviour that was truly removed comes back about as slowly as in a model that never had it; one
that was only hidden comes back within a few steps.

The forget pairs are split as the trainer splits them (``data.*`` as in training, same seed): of the forget *train*
pairs, ``relearn_fraction`` of the prompts (grouped by prompt, :func:`dsunlearn.data.split.split_pairs` seeded with
``seed``) are fine-tuned on; the other train prompts and every forget held-out pair are measured. Fine-tuning is
plain PyTorch in one process (CUDA when present, else CPU): AdamW at a constant ``lr``, cross-entropy summed over
the response tokens of a batch and divided by their number, batches drawn from a seeded stream
(:class:`dsunlearn.data.sampling.StepSampler`).

``output_dir`` gets ``relearn.json`` (the curve: step -> behaviour rate with its bootstrap interval, and the steps
until the rate first reaches 0.5 and 0.9 of the original model's rate) and ``generations.jsonl`` (every measured
generation). ``python -m dsunlearn relearn --compare A/relearn.json B/relearn.json ... --names ... --out_dir DIR``
plots the curves of several models in one PNG with a markdown table (``relearn.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from dsunlearn.data.load import load_pairs
from dsunlearn.data.pairs import Pair
from dsunlearn.data.sampling import StepSampler
from dsunlearn.data.split import split_pairs
from dsunlearn.data.tokenization import pad_batch, tokenize_pairs, tokenize_prompt
from dsunlearn.eval import applications, metrics
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.generation import generate
from dsunlearn.settings import noise
from dsunlearn.settings.cli import settings_parser
from dsunlearn.settings.config import ConfigError, DataConfig, names_a_local_path
from dsunlearn.settings.strict_json import to_json

logger = logging.getLogger(__name__)

RECOVERY_FRACTIONS = (0.5, 0.9)
"""Recovery is reported as the steps until the behaviour rate first reaches these fractions of the original's."""

RESULT_FILE = "relearn.json"
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class RelearnConfig:
    """Fine-tune a model on part of the forget data and measure how fast the unlearned behaviour returns."""

    model_path: str = ""
    """The model fine-tuned: a local Hugging Face folder (e.g. a run's ``final/``) or a hub id."""
    original_path: Optional[str] = None
    """The original model (before unlearning): its behaviour rate on the measured prompts, taken once, is what
    recovery is counted against. None: ``model_path`` is the original (its own step-0 rate)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Forget data, prompt format, max length and split seed: give the training run's values so that the forget
    train/held-out split is the trainer's."""
    steps: int = 50
    """Fine-tuning steps."""
    eval_every: int = 10
    """Measure the behaviour rate every this many steps (and at step 0 and the last step)."""
    relearn_fraction: float = 0.5
    """Part of the forget *train* prompts fine-tuned on, in (0, 1); the rest, with the forget held-out pairs, is
    measured."""
    lr: float = 1e-5
    """AdamW learning rate (constant, no weight decay)."""
    batch_size: int = 8
    """Sequences per fine-tuning step, and per ``generate`` call."""
    seed: int = 0
    """Seed of the relearn/measure split and of the batch order."""
    max_new_tokens: int = 48
    """Length limit of the greedy generations."""
    max_eval_samples: Optional[int] = None
    """Measure on only the first this many measured pairs (None: all)."""
    reproduction_threshold: float = metrics.DEFAULT_REPRODUCTION_THRESHOLD
    """A generation reproduces its forget response when its ROUGE-L (the preset's measure) is at least this."""
    rouge: Literal["tofu", "muse"] = "tofu"
    """ROUGE-L preset (see ``dsunlearn eval``): ``tofu`` = recall with the stemmer, ``muse`` = F1 without."""
    harm_classifier: Optional[str] = None
    """Local folder of a sequence-classification model that judges harmfulness (None: ROUGE-L reproduction)."""
    harmful_label: str = "harmful"
    """The harm classifier's label that means harmful."""
    judge_classifier: Optional[str] = None
    """Local folder of a sequence-classification model that judges hallucinations (the ``hallucination``
    application; None: the ROUGE-L rule alone)."""
    judge_label: str = "hallucinated"
    """The judge's label that means hallucinated."""
    confidence_level: float = 0.95
    """Level of the bootstrap interval of each measured rate."""
    bootstrap_resamples: int = 1000
    """Resamples of each bootstrap interval."""
    dtype: Literal["bf16", "fp32"] = "fp32"
    """Precision the model is loaded and fine-tuned in."""
    output_dir: str = "outputs/relearn"
    """Folder for ``relearn.json`` and ``generations.jsonl``."""
    name: str = "model"
    """Name of this curve in plots and tables."""
    progress: bool = True
    """Show a progress bar."""

    def problems(self) -> list[str]:
        """Every problem with these settings that is found without reading data or models (empty when all is well)."""
        found = []
        for name in ("model_path", "original_path"):
            value = getattr(self, name)
            if name == "model_path" and not value:
                found.append("model_path is empty: give a local model folder or a hub id")
            elif value and names_a_local_path(value) and not Path(value).expanduser().is_dir():
                found.append(f"{name}: local folder {value!r} does not exist")
        if not 0.0 < self.relearn_fraction < 1.0:
            found.append(f"relearn_fraction={self.relearn_fraction} must lie strictly between 0 and 1")
        if self.steps < 1:
            found.append(f"steps={self.steps} must be >= 1")
        if not 1 <= self.eval_every <= max(self.steps, 1):
            found.append(f"eval_every={self.eval_every} must lie in [1, steps={self.steps}]")
        if self.lr <= 0:
            found.append(f"lr={self.lr} must be > 0")
        for name in ("batch_size", "max_new_tokens", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                found.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            found.append(f"max_eval_samples={self.max_eval_samples} must be >= 1 (or None for all)")
        if self.seed < 0:
            found.append(f"seed={self.seed} must be >= 0")
        if not self.name:
            found.append("name is empty")
        return found + self.data.problems() + self.evaluation_settings().evaluation_problems()

    def evaluation_settings(self):
        """The :class:`~dsunlearn.eval.eval_config.EvalConfig` the measurements use (generation, ROUGE, classifier)."""
        return EvalConfig(
            model_path=self.model_path,
            reference_path=self.model_path,
            data=self.data,
            sets=["forget_train", "forget_held_out"],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            reproduction_threshold=self.reproduction_threshold,
            rouge=self.rouge,
            harm_classifier=self.harm_classifier,
            harmful_label=self.harmful_label,
            judge_classifier=self.judge_classifier,
            judge_label=self.judge_label,
            confidence_level=self.confidence_level,
            bootstrap_resamples=self.bootstrap_resamples,
            dtype=self.dtype,
            output_dir=self.output_dir,
            name=self.name,
        )


def relearn_split(cfg: RelearnConfig) -> tuple[list[Pair], list[Pair]]:
    """(pairs fine-tuned on, pairs measured), no prompt on both sides; ConfigError when either side is empty."""
    forget_train, forget_held_out = split_pairs(
        load_pairs(cfg.data.forget), cfg.data.forget.held_out_fraction, cfg.data.seed
    )
    relearn, rest = split_pairs(forget_train, 1.0 - cfg.relearn_fraction, cfg.seed)
    measured = (rest + forget_held_out)[: cfg.max_eval_samples]
    if not relearn or not measured:
        raise ConfigError(
            [
                f"too few forget pairs: {len(forget_train)} train ({len({p.prompt for p in forget_train})} prompts) "
                f"and {len(forget_held_out)} held out give {len(relearn)} to fine-tune on and {len(measured)} to "
                "measure; relearning needs at least one of each (more forget data, or another relearn_fraction)"
            ]
        )
    return relearn, measured


def recovery_steps(curve: list[dict], original_rate: float) -> dict[str, Optional[int]]:
    """``{fraction: first measured step whose rate >= fraction * original_rate, or None}`` for each
    :data:`RECOVERY_FRACTIONS` (the resolution is ``eval_every``: the behaviour came back at or before that step)."""
    return {
        str(fraction): next(
            (point["step"] for point in curve if point["behaviour_rate"] >= fraction * original_rate), None
        )
        for fraction in RECOVERY_FRACTIONS
    }


class _Measurer:
    """Greedy generations on the measured prompts and the application's behaviour flags, as the evaluation makes
    them (:func:`dsunlearn.eval.generation.generate` and its :class:`~dsunlearn.eval.eval_config.EvalContext`)."""

    def __init__(self, cfg: RelearnConfig, tokenizer, pairs: list[Pair], device: torch.device):
        self.cfg = cfg
        self.settings = cfg.evaluation_settings()
        self.context = EvalContext(tokenizer, self.settings, world_size=1)
        fitting = tokenize_pairs(
            tokenizer, pairs, self.context.prompt_format, cfg.data.max_length, name="measured forget"
        )
        if fitting.dropped:
            logger.warning("measured prompts: %s", fitting.summary())
        self.pairs = fitting.pairs
        self.prompts = [
            tokenize_prompt(
                tokenizer, pair.prompt, self.context.prompt_format, cfg.data.max_length, self.context.prefix_ids
            )
            for pair in self.pairs
        ]
        self.classifiers = applications.load_classifiers(self.settings, device)
        self.application = cfg.data.application

    @torch.no_grad()
    def __call__(self, model, step: int) -> tuple[dict, list[dict]]:
        """(the curve's point at ``step``, one row per measured generation)."""

        was_training = model.training
        model.eval()
        generations = generate(model, self.prompts, self.context)
        model.train(was_training)
        tokenizer = self.context.tokenizer
        outputs = [tokenizer.decode(generated, skip_special_tokens=True).strip() for generated in generations]
        flags = applications.behaviour_flags(self.application, self.pairs, outputs, self.settings, self.classifiers)
        interval = metrics.bootstrap_ci(
            [float(flag) for flag in flags], "mean", self.cfg.confidence_level, self.cfg.bootstrap_resamples
        )
        point = {"step": step, "behaviour_rate": sum(flags) / len(flags), "ci": list(interval)}
        rows = [
            {"step": step, "index": i, "prompt": pair.prompt, "response": pair.response, "output": output,
             "behaviour": bool(flag)}
            for i, (pair, output, flag) in enumerate(zip(self.pairs, outputs, flags))
        ]
        return point, rows


def _load_model(path: str, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)


def run_relearn(cfg: RelearnConfig) -> dict:
    """Fine-tune ``cfg.model_path`` and measure the behaviour rate along the way; write and return the result."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    relearn_pairs, measured_pairs = relearn_split(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    measure = _Measurer(cfg, tokenizer, measured_pairs, device)
    taught = tokenize_pairs(
        tokenizer, relearn_pairs, measure.context.prompt_format, cfg.data.max_length, name="relearn forget"
    )
    sequences, pad_id = taught.sequences, measure.context.pad_id

    original_rate = None
    if cfg.original_path:
        original = _load_model(cfg.original_path, cfg.dtype, device)
        original_rate = measure(original, 0)[0]["behaviour_rate"]
        del original

    model = _load_model(cfg.model_path, cfg.dtype, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sampler = StepSampler(len(sequences), cfg.batch_size, seed=cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generations_file = open(out_dir / GENERATIONS_FILE, "w")
    curve = []

    def record(step: int, loss: Optional[float]) -> None:
        point, rows = measure(model, step)
        point["train_loss"] = loss
        curve.append(point)
        for row in rows:
            generations_file.write(to_json(row, ensure_ascii=False) + "\n")

    with generations_file:
        record(0, None)
        model.train()
        bar = tqdm(range(1, cfg.steps + 1), desc=f"relearning {cfg.name}", disable=not cfg.progress)
        for step in bar:
            batch = pad_batch([sequences[i] for i in sampler.indices(step - 1)], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Position t predicts token t + 1; only response tokens are learned.
            targets = batch["input_ids"][:, 1:].masked_fill(batch["response_mask"][:, 1:] == 0, -100)  # [B, L-1]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            ) / batch["response_mask"][:, 1:].sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}", rate=f"{curve[-1]['behaviour_rate']:.2f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record(step, loss.item())

    if original_rate is None:
        original_rate = curve[0]["behaviour_rate"]
    result = {
        "name": cfg.name,
        "model": cfg.model_path,
        "original": cfg.original_path or cfg.model_path,
        "application": measure.application,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "num_relearn_pairs": len(taught.pairs),
        "num_measured_pairs": len(measure.pairs),
        "original_rate": original_rate,
        "curve": curve,
        "recovery_steps": recovery_steps(curve, original_rate),
    }
    (out_dir / RESULT_FILE).write_text(to_json(result, indent=2) + "\n")
    logger.info("relearning written to %s (%s, %s)", out_dir, RESULT_FILE, GENERATIONS_FILE)
    return result


def compare(result_paths: list[str], out_dir: str, names: Optional[list[str]] = None) -> Path:
    """Plot several ``relearn.json`` curves in ``out_dir/relearn_curves.png`` with a table in ``relearn.md``; return
    the markdown's path."""
    from dsunlearn.eval.report import read_relearning, relearning_section

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "relearn.md"
    report.write_text("\n".join(["# Relearning", "", *relearning_section(out, read_relearning(result_paths, names))]))
    return report


def build_parser():
    """The parser of ``dsunlearn relearn``: ``--config relearn.yaml`` plus one flag per field."""
    return settings_parser(RelearnConfig, "dsunlearn relearn")


def main(argv: Optional[list[str]] = None) -> dict | Path:
    """``dsunlearn relearn --model_path M [--data.* as in training] --steps N ...``, or
    ``dsunlearn relearn --compare A/relearn.json B/relearn.json [--names ...] --out_dir DIR``."""
    from dsunlearn.runtime.distributed import EXIT_USAGE

    noise.silence_known_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:
        parser = argparse.ArgumentParser(prog="dsunlearn relearn --compare", description=compare.__doc__)
        parser.add_argument("--compare", nargs="+", required=True, help="relearn.json files")
        parser.add_argument("--names", nargs="+", help="curve names, one per file (default: each run's name)")
        parser.add_argument("--out_dir", required=True, help="where relearn_curves.png and relearn.md go")
        args = parser.parse_args(argv)
        report = compare(args.compare, args.out_dir, args.names)
        print(report)
        return report
    parser = build_parser()
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    parsed = parser.instantiate(namespace)
    cfg = RelearnConfig(**{name: parsed[name] for name in RelearnConfig.__dataclass_fields__})
    try:
        return run_relearn(cfg)
    except ConfigError as error:
        print(f"dsunlearn relearn: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main()
