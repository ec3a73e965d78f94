"""What each rank's slot of each micro-step holds: the run's training pairs loaded, split and tokenised once, and the
(forget, random, normal) sequences of any (step, rank, micro-step) slot.

A slot's sequences are a function of (data seed, step, global slot) only (DESIGN.md §6a): a resumed run sees the same
data, and so does any split of the global batch into ranks x micro-steps. The trainer and the step benchmark's
paper-style loop read their batches from here, so both process the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from dsunlearn.data.load import load_pairs
from dsunlearn.data.sampling import StepSampler, draw_random_answers
from dsunlearn.data.split import overlap_warning, split_pairs
from dsunlearn.data.tokenization import resolve_pad_id, special_prefix_ids, tokenize_pair, tokenize_pairs
from dsunlearn.settings.config import RunConfig
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.prompt_format import PromptFormat

logger = logging.getLogger(__name__)


@dataclass
class SlotSequences:
    """The tokenised sequences of one slot, in the order the step batch concatenates them."""

    forget: list  # [B_f] TokenizedSequence
    random: list  # [B_f * K]: the K random answers of each forget prompt, prompt by prompt
    normal: list  # [B_n]
    normal_indices: list[int]  # [B_n] index of each normal sequence in ``StepData.normal_sequences``
    forget_indices: list[int]  # [B_f] index of each forget sequence in ``StepData.forget_sequences`` (npo's s_ref)


class StepData:
    """The training data of a run on ``world_size`` ranks: pairs loaded, split by prompt, tokenised (prompts never
    cut: pairs that do not fit are dropped, counted) and the samplers of the forget and normal streams.

    Raises ``ValueError`` (a bad file, a prompt longer than ``data.max_length``, a split smaller than the rank count):
    the user's input, which the trainer reports as a usage error.
    """

    def __init__(self, cfg: RunConfig, tokenizer, world_size: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.world_size = world_size
        self.pad_id = resolve_pad_id(tokenizer)
        self.prompt_format = PromptFormat(cfg.data.template, cfg.data.use_chat_template)
        self.prefix_ids = special_prefix_ids(tokenizer)
        objective = cfg.objective
        self.use_forget = objective.forget_weight > 0
        self.use_random = objective.random_weight > 0
        self.use_normal = objective.normal_weight > 0

        forget_pairs, normal_pairs = _load_pairs("forget", cfg.data.forget), _load_pairs("normal", cfg.data.normal)
        # The never-seen set of the final evaluation's membership inference, read and checked before any model loads.
        self.holdout_warning = (
            overlap_warning(forget_pairs, _load_pairs("holdout", cfg.data.holdout)) if cfg.data.holdout else None
        )
        forget_train, _ = split_pairs(forget_pairs, cfg.data.forget.held_out_fraction, cfg.data.seed)
        normal_train, _ = split_pairs(normal_pairs, cfg.data.normal.held_out_fraction, cfg.data.seed)
        # A prompt is never cut: pairs whose prompt leaves no room for a response are dropped here, before any index
        # into the train splits is drawn. The forget term may leave the end of the answer out (objective.forget_eos).
        self.forget_tokenized = tokenize_pairs(
            tokenizer, forget_train, self.prompt_format, cfg.data.max_length, end_of_response=objective.forget_eos,
            name="forget",
        )
        self.normal_tokenized = tokenize_pairs(
            tokenizer, normal_train if self.use_normal else [], self.prompt_format, cfg.data.max_length, name="normal"
        )
        self.forget_train = self.forget_tokenized.pairs
        self.normal_examples = self.normal_tokenized.pairs if self.use_normal else normal_train
        for name, pairs, used in (
            ("forget", self.forget_train, True), ("normal", self.normal_examples, self.use_normal or self.use_random)
        ):
            if used and len(pairs) < world_size:
                raise ValueError(
                    f"{name} train split has {len(pairs)} samples but the run has {world_size} ranks: "
                    f"every rank needs at least one (use fewer ranks or more data)"
                )
        self.forget_sequences = self.forget_tokenized.sequences if self.use_forget else []
        self.normal_sequences = self.normal_tokenized.sequences
        # From the normal *train* split only (DESIGN.md §1).
        self.random_answer_pool = [pair.response for pair in normal_train]
        gas = cfg.train.gradient_accumulation_steps
        self.forget_sampler = StepSampler(
            len(self.forget_train), cfg.train.forget_batch_size, world_size=world_size,
            gradient_accumulation_steps=gas, seed=cfg.data.seed,
        )
        self.normal_sampler = StepSampler(
            len(self.normal_examples), max(cfg.train.normal_batch_size, 1), world_size=world_size,
            gradient_accumulation_steps=gas, seed=cfg.data.seed + 1,
        )

    def log_summary(self) -> None:
        cfg = self.cfg
        if self.holdout_warning:
            logger.warning(self.holdout_warning)
        logger.info("data: forget: %s", self.forget_tokenized.summary())
        if self.use_normal:
            logger.info("data: normal: %s", self.normal_tokenized.summary())
        logger.info(
            "data: %d forget and %d normal training pairs, %d ranks x %d micro-steps, %d forget + %d random + "
            "%d normal sequences per micro-step and rank", len(self.forget_train), len(self.normal_examples),
            self.world_size, cfg.train.gradient_accumulation_steps, cfg.train.forget_batch_size,
            cfg.train.forget_batch_size * cfg.objective.num_random_answers * self.use_random,
            cfg.train.normal_batch_size * self.use_normal,
        )

    def slot(self, step: int, rank: int, micro: int) -> SlotSequences:
        """The sequences of rank ``rank``'s slot in micro-step ``micro`` of optimizer step ``step``."""
        cfg = self.cfg
        forget_indices = self.forget_sampler.indices(step, rank, micro)
        forget = [self.forget_sequences[i] for i in forget_indices] if self.use_forget else []
        random_sequences = []
        if self.use_random:
            answers = draw_random_answers(
                self.random_answer_pool, self.forget_sampler.positions(step, rank, micro),
                cfg.objective.num_random_answers, cfg.data.seed,
            )
            random_sequences = [
                tokenize_pair(
                    self.tokenizer, dataclasses.replace(self.forget_train[i], response=answer), self.prompt_format,
                    cfg.data.max_length, self.prefix_ids,
                )
                for i, example_answers in zip(forget_indices, answers)
                for answer in example_answers
            ]
        normal_indices = list(self.normal_sampler.indices(step, rank, micro)) if self.use_normal else []
        normal = [self.normal_sequences[i] for i in normal_indices]
        return SlotSequences(forget, random_sequences, normal, normal_indices,
                             list(forget_indices) if self.use_forget else [])


def _load_pairs(name: str, spec: DatasetSpec) -> list:
    """The pairs of data set ``name``; a bad file is the user's to fix: one message naming the setting."""
    try:
        return load_pairs(spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"data.{name}: {err}") from None
