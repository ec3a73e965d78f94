"""Evaluation of an unlearned model against the original: ``python -m dsunlearn eval …``.

Three prompt sets, built with the trainer's own split (same seed and ``held_out_fraction``):

* ``forget_train``: the forget pairs the model was trained to forget;
* ``forget_held_out``: forget pairs kept out of training (does unlearning generalise?);
* ``normal_held_out``: normal pairs kept out of training (is utility kept?).

On every set both models (original and unlearned) get the same measurements, so each metric has a
before and an after:

* teacher-forced NLL per response token of the dataset response (``nll``, ``ppl``), and the mean
  per-token KL(original ‖ unlearned) over the same response tokens (``kl``; 0 for the original);
* greedy generations, scored with :mod:`dsunlearn.eval.metrics`: ``reproduction_rate`` (ROUGE-L of
  the dataset response ≥ ``reproduction_threshold``), mean ROUGE-L (``rouge_l_recall`` under the
  default ``tofu`` preset; ``rouge_l_f1`` under ``muse``: the key names the measure), diversity
  (``distinct_1``, ``distinct_2``), fluency (``fluency_ppl``: perplexity of the generated tokens
  under the *original* model), ``generation_tokens``, and, with a harm classifier, ``harmful_rate``;
* for the unlearned model, ``similarity_to_original``: mean ROUGE-L F1 between its generation and
  the original model's generation for the same prompt;
* the behaviour of ``data.application`` (:mod:`dsunlearn.eval.applications`): ``behaviour_rate`` on every
  set, and the application's own means (copyright ``bleu`` and ``rouge_l``, hallucination
  ``hallucination_rate``);
* on data of TOFU's shape (:mod:`dsunlearn.eval.benchmarks`): ``answer_prob`` and the truth ratio
  (``forget_truth_ratio`` on the forget sets, ``retain_truth_ratio`` on the normal set) of every set, and in
  ``eval.json``'s ``tofu`` the per-question truth ratios, forget quality against a retain model (``retrained_path``
  or ``retain_eval``) and model utility; on MUSE's shape, ``muse``: VerbMem and KnowMem (the sets' ROUGE-L F1).

With ``data.holdout`` (never-seen samples of the forget data's kind), membership inference
(:mod:`dsunlearn.eval.mia`) between ``forget_train`` and the holdout gives ``mia`` in ``eval.json``.

ROUGE-L is ``rouge-score``'s (see :mod:`dsunlearn.eval.metrics`). Token-level means are over all
response tokens of a set (sum of NLL / number of tokens). A perplexity too large for a double (mean
NLL above ~709 nats, after heavy gradient ascent) is written as ``null`` (``Infinity`` is not
JSON); the report shows it as "–".

Every rate and mean of a set has a percentile bootstrap confidence interval over the set's samples
in ``summary[role][set]["ci"][metric] = [low, high]`` (:func:`dsunlearn.eval.metrics.bootstrap_ci`,
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

import os
import signal

if __name__ == "__main__" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # `python -m dsunlearn.eval.evaluation` on several ranks runs the watchdog, which takes SIGTERM in its own thread:
    # blocked before any import that starts threads (why: train.py). `python -m dsunlearn eval` blocks it in __main__.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dsunlearn.data.load import load_pairs
from dsunlearn.data.split import overlap_warning, split_pairs, split_record
from dsunlearn.data.tokenization import TokenizedSequence, tokenize_pair, tokenize_pairs, tokenize_prompt
from dsunlearn.eval import applications, benchmarks, mia
from dsunlearn.eval.eval_config import DTYPES, MODEL_ROLES, EvalConfig, EvalContext
from dsunlearn.eval.generation import generate, generation_fields, similarity
from dsunlearn.eval.likelihood import nll_sums, teacher_forced
from dsunlearn.eval.sharding import gather_records, shard_indices
from dsunlearn.eval.summary import config_record, sample_row, summarize
from dsunlearn.settings import noise
from dsunlearn.settings.cli import settings_parser
from dsunlearn.settings.config import ConfigError, DataConfig
from dsunlearn.settings.strict_json import to_json

logger = logging.getLogger(__name__)


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
    (:func:`dsunlearn.data.split.split_pairs`); the random-answer pool and training never see the held-out part.
    """
    sets, splits = {}, {}
    if any(name.startswith("forget") for name in set_names):
        forget = load_pairs(data_cfg.forget)
        forget_train, forget_held_out = split_pairs(forget, data_cfg.forget.held_out_fraction, data_cfg.seed)
        sets.update(forget_train=forget_train, forget_held_out=forget_held_out)
        splits["forget"] = split_record(forget_train, forget_held_out)
        if data_cfg.holdout is not None and mia.MEMBER_SET in set_names:
            sets[mia.NONMEMBER_SET] = load_pairs(data_cfg.holdout)
            overlap = overlap_warning(forget, sets[mia.NONMEMBER_SET])
            if overlap:
                logger.warning(overlap)
            set_names = [*set_names, mia.NONMEMBER_SET]
    if "normal_held_out" in set_names:
        normal_train, sets["normal_held_out"] = split_pairs(
            load_pairs(data_cfg.normal), data_cfg.normal.held_out_fraction, data_cfg.seed
        )
        splits["normal"] = split_record(normal_train, sets["normal_held_out"])
    return {name: sets[name][:max_samples] for name in set_names}, splits


def run_evaluation(cfg: EvalConfig, watchdog=None) -> dict:
    """Load both models, evaluate every requested set, write the outputs on rank 0; return the summary.

    One process: plain ``from_pretrained`` on CUDA if there is one, else the CPU. Under a launcher
    with ``WORLD_SIZE`` > 1: ZeRO-3 inference engines, prompts sharded over the ranks. ``watchdog`` (a
    ``distributed.Watchdog``, as :func:`main` starts it on several ranks) ends every rank when one fails, with one
    message; it then also tears the process group down (``watchdog.close``).
    """
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world_size > 1:
        from dsunlearn.runtime import distributed

        rank, world_size, _ = distributed.init_distributed(cfg.collective_timeout_s)
        if watchdog is not None:
            watchdog.connect(world_size, cfg.collective_timeout_s)
    tokenizer, sets, splits = _read_inputs(cfg)
    if watchdog is not None:
        watchdog.agree_on_inputs()  # a rank whose inputs failed: every rank ends here, with one message
    # The engines own the ZeRO-3 hooks of the models: they stay referenced until the evaluation is done.
    model, reference, _engines = load_models(cfg, world_size)
    summary = evaluate_models(
        model, reference, tokenizer, sets, cfg, rank=rank, world_size=world_size, splits=splits
    )
    if world_size > 1 and watchdog is None:
        # Without the teardown, exit can abort in C++ now and then ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _read_inputs(cfg: EvalConfig):
    """The tokenizer, the sets and their splits, and a look at both models' configs (the original's at its revision):
    what the user must fix is a ``UsageError`` naming the setting, found before any model loads."""
    from transformers import AutoConfig, AutoTokenizer

    from dsunlearn.runtime.distributed import UsageError

    model_kwargs, reference_kwargs = reference_load_kwargs(cfg)
    for setting, path, kwargs in (("model_path", cfg.model_path, model_kwargs),
                                  ("reference_path", cfg.reference_path, reference_kwargs)):
        try:
            AutoConfig.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            revision = f" at revision {kwargs['revision']!r}" if kwargs.get("revision") else ""
            raise UsageError(f"{setting}: cannot read the model config of {path!r}{revision}: "
                             f"{' '.join(str(err).split())}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, **model_kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"model_path: cannot load the tokenizer of {cfg.model_path!r}: "
                         f"{' '.join(str(err).split())}") from None
    try:
        sets, splits = build_eval_sets(cfg.data, cfg.sets, cfg.max_samples)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return tokenizer, sets, splits


def load_models(cfg: EvalConfig, world_size: int):
    """(unlearned model, original model, engines): plain models in one process, else ZeRO-3 inference engines.

    With engines, the returned models are their ``.module`` (Hugging Face models whose parameters are
    ZeRO-3 shards); keep the engines alive while the models are used.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    model_kwargs, reference_kwargs = reference_load_kwargs(cfg)
    if world_size > 1:
        from dsunlearn.runtime import engines
        from dsunlearn.runtime.ds_config import inference_ds_config

        ds_config = inference_ds_config(dtype, offload=cfg.offload_param)
        model_engine = engines.load_inference_engine(cfg.model_path, ds_config, dtype, **model_kwargs)
        reference_engine = engines.load_inference_engine(cfg.reference_path, ds_config, dtype, **reference_kwargs)
        return model_engine.module, reference_engine.module, (model_engine, reference_engine)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype, **model_kwargs).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        cfg.reference_path, dtype=dtype, **reference_kwargs
    ).to(device).eval()
    return model, reference, ()


def reference_load_kwargs(cfg: EvalConfig) -> tuple[dict, dict]:
    """``from_pretrained`` keyword arguments of the unlearned model and of the original: the original at
    ``reference_revision``, both with ``trust_remote_code``."""
    model_kwargs = {"trust_remote_code": cfg.trust_remote_code}
    reference_kwargs = dict(model_kwargs)
    if cfg.reference_revision:
        reference_kwargs["revision"] = cfg.reference_revision
    return model_kwargs, reference_kwargs


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
    AUCs of :mod:`dsunlearn.eval.mia` (the holdout gets no other measurement).
    """
    problems = cfg.evaluation_problems()
    if problems:
        raise ConfigError(problems)
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"the models' vocabularies differ ({model.config.vocab_size} vs {reference.config.vocab_size}): "
            "KL and fluency need the original model's tokenizer"
        )
    # A saved retain evaluation that cannot give forget quality stops here, before any model runs.
    retain = (f"retain_eval: {cfg.retain_eval}", benchmarks.retain_ratios_from_eval(cfg.retain_eval)) \
        if cfg.retain_eval else None
    context = EvalContext(tokenizer, cfg, world_size)
    classifiers = applications.load_classifiers(cfg, context.device(model))
    formats = {name: (cfg.data.forget if name.startswith("forget") else cfg.data.normal).format for name in sets}

    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    summary: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model_path,
        "reference": cfg.reference_path,
        "reference_revision": cfg.reference_revision,
        "metrics_jsonl": cfg.metrics_jsonl,
        "world_size": world_size,
        "config": config_record(cfg),
        "split": splits or {},
        "num_samples": {},
        "original": {},
        "unlearned": {},
    }
    samples = []
    tofu_ratios: dict[str, dict[str, list[float]]] = {}  # {set: {role: [truth ratio, ...]}}
    measured_pairs: dict[str, list] = {}  # the pairs each set was measured on
    try:
        with torch.no_grad():
            for set_name, pairs in sets.items():
                if set_name == mia.NONMEMBER_SET:
                    continue  # never-seen samples serve the membership inference only (below)
                fitting = tokenize_pairs(
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
                measured_pairs[set_name] = pairs
                num_wrong = benchmarks.num_wrong_answers(pairs) if formats[set_name] == "tofu" else None
                shard, num_real = shard_indices(len(pairs), rank, world_size)
                records = _evaluate_shard(
                    model, reference, [pairs[i] for i in shard], context, classifiers, num_wrong
                )
                for index, record in zip(shard[:num_real], records[:num_real]):
                    record["index"] = index
                records = gather_records(records[:num_real], world_size)
                summary["num_samples"][set_name] = len(records)
                for role in MODEL_ROLES:
                    summary[role][set_name] = summarize(records, role, cfg, set_name)
                if num_wrong:
                    tofu_ratios[set_name] = {
                        role: [r[role]["truth_ratio"] for r in records if r[role]["truth_ratio"] is not None]
                        for role in MODEL_ROLES
                    }
                samples += [sample_row(set_name, record, cfg.rouge_key) for record in records]
            has_mia = mia.MEMBER_SET in sets and mia.NONMEMBER_SET in sets
            # TOFU's forget quality from a retrained model: its truth ratios on the forget set, as the others'.
            retrain_ratios = bool(cfg.retrained_path) and benchmarks.FORGET_SET in tofu_ratios
            # The engine owns the ZeRO-3 hooks of the retrained model: it stays referenced until it has been used.
            needs_retrained = cfg.retrained_path and (has_mia or retrain_ratios)
            retrained, _retrained_engines = mia.load_retrained(cfg, world_size) if needs_retrained else (None, ())
            if retrain_ratios:
                retain = (f"retrained_path: {cfg.retrained_path}", _sharded_truth_ratios(
                    retrained, measured_pairs[benchmarks.FORGET_SET], context, rank, world_size
                ))
            if has_mia:
                members, nonmembers = sets[mia.MEMBER_SET], sets[mia.NONMEMBER_SET]
                summary["mia"] = mia.evaluate_mia(
                    model, reference, tokenizer, members, nonmembers, context, rank, world_size, retrained
                )
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    if "tofu" in formats.values():
        summary["tofu"] = benchmarks.tofu_section(summary, tofu_ratios, retain)
    muse = benchmarks.muse_section(summary, formats)
    if muse is not None:
        summary["muse"] = muse

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
    # Imported here: matplotlib costs every rank of every run about a second at start-up, and only rank 0 plots.
    from dsunlearn.eval.report import write_report

    report = write_report(out_dir, [(cfg.name, summary, cfg.metrics_jsonl)])
    logger.info("evaluation written to %s (eval.json, samples.jsonl, %s)", out_dir, report.name)
    return out_dir


def build_parser():
    """The parser of ``dsunlearn eval``: ``--config eval.yaml`` plus one flag per field."""
    return settings_parser(EvalConfig, "dsunlearn eval", launched=True)


def main(argv: Optional[list[str]] = None) -> dict:
    """``dsunlearn eval --model_path RUN/final --reference_path ORIGINAL [--data.forget.source …] …``, or
    ``dsunlearn eval --run_dir RUN [...]``: the run's export, original model, data settings and precision.

    On several ranks (``WORLD_SIZE`` > 1) the trainer's watchdog runs beside the evaluation: a failure on one rank
    ends every rank within seconds, with one message and the trainer's exit codes (distributed.py); a bad input on
    any rank (a model or revision a node cannot read, unreadable data) ends them all with ``EXIT_USAGE``."""
    noise.silence_known_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run_evaluation(parse_eval_config(argv))
    import contextlib
    import io

    from dsunlearn.runtime import distributed

    watchdog = distributed.Watchdog()
    try:
        # Every rank parses the same flags: a wrong one is reported by rank 0 alone (jsonargparse prints, then exits).
        with contextlib.redirect_stderr(io.StringIO()) if watchdog.rank else contextlib.nullcontext():
            cfg = parse_eval_config(argv)
        summary = run_evaluation(cfg, watchdog)
    except SystemExit:  # --help, or jsonargparse's message about a wrong flag
        raise
    except BaseException as err:
        watchdog.fail(err)
    watchdog.close()
    return summary


def parse_eval_config(argv: Optional[list[str]] = None) -> EvalConfig:
    """``dsunlearn eval``'s flags (``--run_dir RUN``: that run's settings as the defaults) as an ``EvalConfig``."""
    import argparse

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
    return EvalConfig(**{name: parsed[name] for name in EvalConfig.__dataclass_fields__})


def _run_defaults(run_dir: Path) -> dict:
    """Flat ``{"data.forget.source": …}`` defaults from a training run's saved ``config.yaml``."""
    from dsunlearn.settings.config import parse_run_config

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


def _evaluate_shard(
    model, reference, pairs: list, context: EvalContext, classifiers: applications.Classifiers,
    num_wrong: Optional[int] = None,
) -> list[dict]:
    """Per-pair measurements for one rank's shard (including its padding). ``num_wrong``: a TOFU-shaped set's most
    perturbed answers of a pair (:func:`benchmarks.num_wrong_answers`), which adds each model's ``answer_prob`` and
    ``truth_ratio`` (None without a paraphrased answer); None: not a TOFU-shaped set."""
    cfg, tokenizer = context.cfg, context.tokenizer
    sequences = [
        tokenize_pair(tokenizer, pair, context.prompt_format, cfg.data.max_length, context.prefix_ids)
        for pair in pairs
    ]
    records = teacher_forced(model, reference, sequences, context)
    prompts = [
        tokenize_prompt(tokenizer, pair.prompt, context.prompt_format, cfg.data.max_length, context.prefix_ids)
        for pair in pairs
    ]
    for role, generator in (("unlearned", model), ("original", reference)):
        generations = generate(generator, prompts, context)
        # Fluency: the original model judges the generated tokens, prompt included as context.
        judged = [
            TokenizedSequence(prompt + generated, [0] * len(prompt) + [1] * len(generated))
            for prompt, generated in zip(prompts, generations)
        ]
        fluency = nll_sums(reference, judged, context)
        for record, side in zip(records, generation_fields(pairs, generations, fluency, context, classifiers)):
            record[role].update(side)
    for record, pair in zip(records, pairs):
        record.update(prompt=pair.prompt, response=pair.response)
        record["similarity_to_original"] = similarity(record["unlearned"]["output"], record["original"]["output"], cfg)
    if num_wrong is not None:
        for role, scored in (("unlearned", model), ("original", reference)):
            ratios = benchmarks.truth_ratios(scored, pairs, num_wrong, context) if num_wrong else [None] * len(pairs)
            for record, ratio in zip(records, ratios):
                nll_sum = record[role]["nll_sum"]
                record[role].update(
                    answer_prob=benchmarks.answer_probability(nll_sum, record["response_tokens"]), truth_ratio=ratio
                )
    return records


def _sharded_truth_ratios(model, pairs: list, context: EvalContext, rank: int, world_size: int) -> list[float]:
    """The truth ratios of ``pairs`` under ``model``, each rank measuring its shard (a collective with several
    ranks), in sample order; pairs without one left out."""
    shard, num_real = shard_indices(len(pairs), rank, world_size)
    ratios = benchmarks.truth_ratios(model, [pairs[i] for i in shard], benchmarks.num_wrong_answers(pairs), context)
    mine = [{"index": index, "ratio": ratio} for index, ratio in zip(shard[:num_real], ratios[:num_real])]
    records = gather_records(mine, world_size)
    return [record["ratio"] for record in records if record["ratio"] is not None]


if __name__ == "__main__":
    main()
