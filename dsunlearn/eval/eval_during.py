"""Evaluation during training (``output.eval_every``), keeping the best step (``output.keep_best``) and TensorBoard
(``output.tensorboard``).

Every ``eval_every`` steps, inside the loop and on every rank, the model is evaluated on the first
``eval_during_max_samples`` prompts of each evaluation set with the end-of-run evaluation's own functions
(:mod:`dsunlearn.eval.evaluation`: the same tokenisation, shards, batches, generation and summary), so a step's numbers
are those ``dsunlearn eval`` gives for that step's export (tests/eval/test_eval_during.py shows it on 2 ranks).

The original model does not change, so its side is measured once at start-up, while the reference is alive (it is
freed after the reference cache pass): its generations, NLLs, fluency, and its fp32 log-probabilities over the
vocabulary at the response positions, which the KL(original ‖ model) of every later evaluation reads. That costs
(response tokens of this rank's shard) x vocabulary x 4 bytes of CPU memory, logged at start-up; the sets are small
(``eval_during_max_samples``). The unlearned model's ``fluency_ppl`` (judged by the original model) is left out.

Outputs (rank 0): ``eval_during.jsonl``, one row ``{"step", "set", "metric", "value"}`` per number, resumed like
metrics.jsonl (rows of steps after the checkpoint resumed from are dropped, the replayed steps write them again);
``best_step.json`` (atomic) and ``final_best/`` (an export, atomic as ``final/``) for ``keep_best``; TensorBoard
scalars ``train/<column>`` and ``eval/<set>/<metric>``, flushed every step, a resume purging the replayed steps.
"""

from __future__ import annotations

import json
import logging
import math
import operator
from pathlib import Path
from typing import Optional

import torch

from dsunlearn.data.tokenization import TokenizedSequence, pad_batch, tokenize_pair, tokenize_pairs, tokenize_prompt
from dsunlearn.eval.applications import Classifiers, load_classifiers
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.evaluation import build_eval_sets
from dsunlearn.eval.generation import generate, generation_fields, similarity
from dsunlearn.eval.likelihood import nll_sums as _nll_sums
from dsunlearn.eval.likelihood import per_sequence_sums as _per_sequence_sums
from dsunlearn.eval.likelihood import response_log_probs as _response_log_probs
from dsunlearn.eval.sharding import chunks, gather_records, shard_indices
from dsunlearn.eval.summary import summarize
from dsunlearn.runtime import checkpoints, distributed, ds_config, engines, export
from dsunlearn.settings.config import RunConfig, parse_constraint
from dsunlearn.settings.strict_json import to_json

logger = logging.getLogger("dsunlearn.eval.eval_during")

LOG_NAME = "eval_during.jsonl"
BEST_NAME = "best_step.json"
BEST_EXPORT_NAME = "final_best"
TENSORBOARD_NAME = "tensorboard"
_OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


class _OriginalSide:
    """One evaluation set on this rank: its shard and the original model's measurements of it (made once)."""

    def __init__(self, name: str, pairs: list, shard: list[int], num_real: int):
        self.name = name
        self.pairs = [pairs[i] for i in shard]  # this rank's shard, padding included (sharding.shard_indices)
        self.indices = shard[:num_real]
        self.num_real = num_real
        self.sequences: list = []
        self.prompts: list = []
        self.ref_log_probs: list[torch.Tensor] = []  # per batch of the teacher-forced pass: [M_batch, V] fp32, CPU
        self.records: list[dict] = []  # per shard sample: the original's record fields (evaluation._evaluate_shard)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.ref_log_probs)


class DuringTraining:
    """The run's evaluation during training, best-step keeping and TensorBoard writer (each off when not set).

    Built on every rank with :meth:`start`; the loop calls :meth:`log_training_row` (rank 0), :meth:`is_due` and
    :meth:`evaluate` (every rank), then :meth:`close`.
    """

    def __init__(self, cfg: RunConfig, tokenizer, rank: int, world_size: int, start_step: int, device):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.out_dir = Path(cfg.output.dir)
        self.every = cfg.output.eval_every or 0
        self.eval_cfg = EvalConfig.from_run(cfg, model_path=str(self.out_dir / "final"))
        if cfg.output.eval_during_max_samples is not None:
            self.eval_cfg.max_samples = cfg.output.eval_during_max_samples
        self.sides: list[_OriginalSide] = []
        # output.harm_classifier / judge_classifier, as the end-of-run evaluation loads them (when evaluating).
        self.classifiers = load_classifiers(self.eval_cfg, device) if self.every else Classifiers()
        self.log = None
        self.writer = None
        self.best = KeepBest.of(cfg) if cfg.output.keep_best else None
        if rank == 0:
            if self.every:
                self.log = checkpoints.MetricsLog(self.out_dir / LOG_NAME, start_step)
            if cfg.output.tensorboard is not False:
                self.writer = _tensorboard_writer(cfg, start_step)

    @classmethod
    def start(cls, cfg: RunConfig, tokenizer, policy_engine, ref_engine, rank: int, world_size: int,
              start_step: int, device) -> DuringTraining:
        """Open the logs and measure the original's side (a collective when ``eval_every`` is set: call it on every
        rank while ``ref_engine`` is alive). On a resume at an evaluation step whose rows are missing (a stop came
        before its evaluation), evaluate it now: the model is that step's."""
        during = cls(cfg, tokenizer, rank, world_size, start_step, device)
        if not during.every:
            return during
        if during.best is not None:
            during.best.load(during.out_dir, rank)
        policy_lm = policy_engine.module.lm
        if ref_engine is not None:
            during._measure_original(ref_engine.module.lm)
        elif cfg.model.lora_rank > 0:  # the reference is the policy with its adapters off
            with engines.reference_mode(policy_lm):
                during._measure_original(policy_lm)
        else:  # no KL term, so no reference was built: load the original for this pass only
            dtype = engines.PRECISION_DTYPES[cfg.model.precision]
            inference_config = ds_config.inference_ds_config(dtype, cfg.model.reference_offload)
            original = engines.load_original_engine(cfg, inference_config)
            during._measure_original(original.module)
            del original
        if start_step and during.is_due(start_step) and not during._logged(start_step):
            during.evaluate(start_step, policy_engine, None)
        return during

    def is_due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def log_training_row(self, row: dict) -> None:
        """One metrics.jsonl row as TensorBoard scalars ``train/<column>`` (rank 0; nothing without a writer)."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, row["step"])
        self.writer.flush()

    def evaluate(self, step: int, policy_engine, watchdog: Optional[distributed.Watchdog]) -> bool:
        """Evaluate the model after ``step`` (a collective), log it, keep it as best when it is; returns whether a
        stop (SIGTERM) was requested on any rank meanwhile: the loop then saves this step and exits, as after any
        step (watchdog.defer_stop)."""
        lm = policy_engine.module.lm
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                summary = {side.name: self._evaluate_set(lm, side) for side in self.sides}
        finally:
            lm.train(was_training)
        if self.rank == 0:
            for set_name, values in summary.items():
                for metric, value in _numbers(values).items():
                    self.log.append({"step": step, "set": set_name, "metric": metric, "value": value})
                    if self.writer is not None and value is not None and math.isfinite(value):
                        self.writer.add_scalar(f"eval/{set_name}/{metric}", value, step)
            if self.writer is not None:
                self.writer.flush()
            logger.info("evaluation at step %d: %s", step, _brief(summary))
        if self.best is not None and self.best.consider(step, summary):
            export.export_hf(policy_engine, lm, self.tokenizer, self.out_dir / BEST_EXPORT_NAME, self.cfg)
            if self.rank == 0:
                self.best.save(self.out_dir)
                logger.info("step %d is the best so far (%s = %g): exported to %s", step, self.best.metric,
                            self.best.value, self.out_dir / BEST_EXPORT_NAME)
        if watchdog is None:
            return False
        stop = torch.tensor([float(watchdog.stop_requested)], device=self.device)
        torch.distributed.all_reduce(stop)
        return bool(stop.item() > 0)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.writer is not None:
            self.writer.close()

    # ---- the original's side, once ----

    def _measure_original(self, reference) -> None:
        """Mirrors evaluation.evaluate_models/_evaluate_shard for the original model (role ``original``)."""
        context = EvalContext(self.tokenizer, self.eval_cfg, self.world_size)
        sets, _ = build_eval_sets(self.cfg.data, self.eval_cfg.sets, self.eval_cfg.max_samples)
        was_training = reference.training
        reference.eval()
        try:
            with torch.no_grad():
                for set_name in self.eval_cfg.sets:  # not the membership-inference holdout build_eval_sets adds
                    fitting = tokenize_pairs(
                        self.tokenizer, sets[set_name], context.prompt_format, self.cfg.data.max_length,
                        name=set_name,
                    )
                    if not fitting.pairs:
                        continue
                    shard, num_real = shard_indices(len(fitting.pairs), self.rank, self.world_size)
                    side = _OriginalSide(set_name, fitting.pairs, shard, num_real)
                    self._measure_original_set(reference, side, context)
                    self.sides.append(side)
        finally:
            reference.train(was_training)
        self.context = context
        if self.rank == 0:
            logger.info("evaluation during training every %d steps: %s; the original's log-probabilities kept for "
                        "the KL: %.1f MiB on rank 0", self.every,
                        ", ".join(f"{side.name} {len(side.indices)} prompts" for side in self.sides) + " on rank 0",
                        sum(side.num_bytes() for side in self.sides) / 2**20)

    def _measure_original_set(self, reference, side: _OriginalSide, context: EvalContext) -> None:
        tokenizer, max_length = self.tokenizer, self.cfg.data.max_length
        side.sequences = [tokenize_pair(tokenizer, pair, context.prompt_format, max_length,
                                                 context.prefix_ids) for pair in side.pairs]
        side.prompts = [tokenize_prompt(tokenizer, pair.prompt, context.prompt_format, max_length,
                                                 context.prefix_ids) for pair in side.pairs]
        nll_sums = []
        for chunk in chunks(side.sequences, self.eval_cfg.batch_size):
            batch = pad_batch(chunk, context.pad_id)
            log_probs, targets, row = _response_log_probs(reference, batch, context.device(reference))
            nll = -log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
            nll_sums += _per_sequence_sums(nll, row, len(chunk))
            side.ref_log_probs.append(log_probs.cpu())
        generations = generate(reference, side.prompts, context)
        judged = [TokenizedSequence(prompt + generated, [0] * len(prompt) + [1] * len(generated))
                  for prompt, generated in zip(side.prompts, generations)]
        fluency = _nll_sums(reference, judged, context)
        fields = generation_fields(side.pairs, generations, fluency, context, self.classifiers)
        side.records = [{"nll_sum": nll_sum, **measured} for nll_sum, measured in zip(nll_sums, fields)]

    # ---- the model's side, at every evaluation ----

    def _evaluate_set(self, model, side: _OriginalSide) -> dict:
        """The model's summary on one set, as summary.summarize gives it for the role ``unlearned`` (without
        ``fluency_ppl``)."""
        context = self.context
        records = []
        for batch_index, chunk in enumerate(chunks(side.sequences, self.eval_cfg.batch_size)):
            batch = pad_batch(chunk, context.pad_id)
            log_probs, targets, row = _response_log_probs(model, batch, context.device(model))
            ref_log_probs = side.ref_log_probs[batch_index].to(log_probs.device)
            nll = -log_probs.gather(1, targets[:, None]).squeeze(1)  # [M]
            kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)  # [M]
            nll_sums = _per_sequence_sums(nll, row, len(chunk))
            kl_sums = _per_sequence_sums(kl, row, len(chunk))
            for i, sequence in enumerate(chunk):
                records.append({"response_tokens": sum(sequence.response_mask), "kl_sum": kl_sums[i],
                                "unlearned": {"nll_sum": nll_sums[i]}})
        generations = generate(model, side.prompts, context)
        # The judge of fluency, the original model, is freed: zeros stand in and fluency_ppl is dropped below.
        fields = generation_fields(side.pairs, generations, [0.0] * len(generations), context, self.classifiers)
        for record, pair, measured, original in zip(records, side.pairs, fields, side.records):
            record["unlearned"].update(measured)
            record.update(original=original, prompt=pair.prompt, response=pair.response,
                          similarity_to_original=similarity(measured["output"], original["output"], self.eval_cfg))
        for index, record in zip(side.indices, records):
            record["index"] = index
        gathered = gather_records(records[:side.num_real], self.world_size)
        summary = summarize(gathered, "unlearned", self.eval_cfg)
        summary.pop("fluency_ppl")
        summary["ci"].pop("fluency_ppl", None)
        return summary

    def _logged(self, step: int) -> bool:
        """Whether eval_during.jsonl holds rows of ``step`` (rank 0 reads, every rank gets the answer)."""
        answer = [None]
        if self.rank == 0:
            rows = read_log(self.out_dir / LOG_NAME)
            answer[0] = any(row["step"] == step for row in rows)
        torch.distributed.broadcast_object_list(answer, src=0)
        return bool(answer[0])


class KeepBest:
    """The best evaluated step by ``output.keep_best`` among those meeting ``output.keep_best_constraint``."""

    def __init__(self, metric: str, mode: str, constraint: Optional[str]):
        self.metric = metric
        self.mode = mode
        self.constraint = constraint
        self.conditions = parse_constraint(constraint) if constraint else []
        self.step: Optional[int] = None
        self.value: Optional[float] = None

    @classmethod
    def of(cls, cfg: RunConfig) -> KeepBest:
        return cls(cfg.output.keep_best, cfg.output.keep_best_mode, cfg.output.keep_best_constraint)

    def settings(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "constraint": self.constraint}

    def consider(self, step: int, summary: dict) -> bool:
        """Whether the evaluation of ``step`` (``{set: {metric: value}}``) is the new best: it meets every condition
        and beats the best so far (ties keep the earlier step; the best step itself, evaluated again after a resume,
        is taken again)."""
        value = _lookup(summary, self.metric)
        if value is None or not math.isfinite(value):
            return False
        for name, op, bound in self.conditions:
            measured = _lookup(summary, name)
            if measured is None or not math.isfinite(measured) or not _OPERATORS[op](measured, bound):
                return False
        better = operator.lt if self.mode == "min" else operator.gt
        if self.step is not None and step != self.step and not better(value, self.value):
            return False
        self.step, self.value = step, value
        return True

    def load(self, out_dir: Path, rank: int) -> None:
        """The choice kept by an earlier part of this run (rank 0 reads ``best_step.json``, every rank gets it); one
        made under other keep_best settings is set aside (``final_best/`` stays until a step qualifies)."""
        stored = [None]
        path = out_dir / BEST_NAME
        if rank == 0 and path.is_file():
            record = json.loads(path.read_text())
            if {key: record.get(key) for key in self.settings()} == self.settings():
                stored[0] = (record["step"], record["value"])
            else:
                logger.warning("%s was chosen with other keep_best settings (%s): choosing afresh", path,
                               {key: record.get(key) for key in self.settings()})
        torch.distributed.broadcast_object_list(stored, src=0)
        if stored[0] is not None:
            self.step, self.value = stored[0]

    def save(self, out_dir: Path) -> None:
        record = {**self.settings(), "step": self.step, "value": self.value, "export": BEST_EXPORT_NAME}
        checkpoints.atomic_write_text(out_dir / BEST_NAME, to_json(record, indent=2) + "\n")


def _lookup(summary: dict, name: str) -> Optional[float]:
    set_name, _, metric = name.partition("/")
    if set_name not in summary:
        return None
    if metric not in summary[set_name]:
        raise ValueError(f"output.keep_best: {name!r} is not measured during training (measured: "
                         f"{sorted(summary[set_name])})")
    return summary[set_name][metric]


def _numbers(values: dict) -> dict:
    """The set's metrics that are numbers (null: a perplexity too large for a double), without nested records such as
    confidence intervals."""
    return {metric: value for metric, value in values.items()
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))}


def _brief(summary: dict) -> str:
    shown = ("reproduction_rate", "behaviour_rate", "kl")
    return "; ".join(
        f"{set_name} " + ", ".join(f"{m} {v:.3g}" for m, v in values.items() if m in shown and v is not None)
        for set_name, values in summary.items()
    )


def _tensorboard_writer(cfg: RunConfig, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(cfg.output.dir) / TENSORBOARD_NAME if cfg.output.tensorboard is True else Path(cfg.output.tensorboard)
    # A resume replays the steps after its checkpoint: TensorBoard drops what was written for them before.
    return SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)


def read_log(path: Path) -> list[dict]:
    """The rows of an ``eval_during.jsonl`` (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
