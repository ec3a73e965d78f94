"""Data: loading (prompt, response) pairs, splits, tokenisation with exact response masks, padding,
the global example stream and random-answer drawing.

The unlearning objective only ever scores *response* tokens, so the response mask must be exact, and the tokens
must be those the model sees when the answer follows its prompt. :func:`tokenize_pair` therefore tokenises the
joint text (prompt part + response) and cuts it where the prompt's characters end (token offsets): tokenising the
response alone differs on some tokenizers (a legacy SentencePiece normalizer turns " Sure" alone into
['▁', '▁Sure']). With a chat template the response span, and the turn end that closes it, are taken from the
rendered conversation itself.

Which examples an optimizer step reads, and their random answers, are a function of (seed, step, global batch)
and never of how that batch is split into ranks and micro-steps (:class:`StepSampler`, DESIGN.md §6a).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import numpy as np
import torch

from dsunlearn import paths

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
TEXT_SUFFIX = ".txt"
"""A plain-text file: one book, read by the ``book`` format only."""
DEFAULT_TEMPLATE = "### Question: {prompt}\n ### Answer: {response}"

# TruthfulQA's (question, best answer) field names: hub `generation` config, original CSV.
TRUTHFULQA_HUB_FIELDS = ("question", "best_answer")
TRUTHFULQA_CSV_FIELDS = ("Question", "Best Answer")
# Its wrong answers (a list in the hub config, one ";"-separated cell in the CSV): kept for the hallucination metric.
TRUTHFULQA_INCORRECT_FIELDS = {TRUTHFULQA_HUB_FIELDS: "incorrect_answers", TRUTHFULQA_CSV_FIELDS: "Incorrect Answers"}
# HaluEval's QA schema (hub `pminervini/HaluEval`, config `qa`): every field is read.
HALUEVAL_FIELDS = ("question", "right_answer", "hallucinated_answer", "knowledge")
FORMATS = ("pku_saferlhf", "truthfulqa", "halueval", "book", "pairs")


# ---------------------------------------------------------------------------------------------------
# Dataset settings
# ---------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """Where one data set (forget or normal) comes from and how to read it."""

    source: str = ""
    """Hub dataset id (e.g. ``PKU-Alignment/PKU-SafeRLHF``) or a local .json/.jsonl/.parquet/.csv file."""

    format: Literal["pku_saferlhf", "truthfulqa", "halueval", "book", "pairs"] = "pairs"
    """``pku_saferlhf``: one pair per *unsafe* response; ``truthfulqa``: (question, best answer), hub
    ``generation`` config or the original CSV; ``halueval``: HaluEval's QA schema, (question, hallucinated answer)
    with the right answer and the knowledge kept on the pair for the hallucination metric; ``book``: a plain-text
    book (a local .txt file, or each record's ``text_field``) cut into (prefix -> continuation) windows of
    ``prefix_words`` + ``continuation_words`` words every ``stride_words`` words; ``pairs``: any data set, fields
    named by ``prompt_field``/``response_field``."""

    prompt_field: str = "prompt"
    """Prompt field name (``pairs`` format only)."""

    response_field: str = "response"
    """Response field name (``pairs`` format only)."""

    text_field: str = "text"
    """The field holding a book's text (``book`` format, a data set's records; a .txt file is one book)."""

    prefix_words: int = 50
    """``book``: words of a window's prefix (the prompt). Windows count words (whitespace-separated), not tokens:
    data loading is tokenizer-free, so the same settings cut the same windows for every model."""

    continuation_words: int = 50
    """``book``: words of a window's continuation (the response the model must not reproduce)."""

    stride_words: Optional[int] = None
    """``book``: words from one window's start to the next (None: prefix_words + continuation_words, so windows do
    not overlap and a held-out window shares no text with a trained one). A trailing stretch shorter than a whole
    window is left out."""

    split: Optional[str] = None
    """Hub split to load. Default: ``validation`` for ``truthfulqa`` (its only split), else ``train``.
    Ignored for local files."""

    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin. Ignored for local files."""

    name: Optional[str] = None
    """Hub config name. Default: ``generation`` for ``truthfulqa``, else none. Ignored for local files."""

    held_out_fraction: float = 0.1
    """Fraction of the distinct prompts kept out of training (for evaluation), with every pair that has one of them;
    the split is seeded."""

    max_samples: Optional[int] = None
    """Keep only the first this many pairs (in file order, before splitting). None: keep all."""

    bad_rows: Literal["error", "skip"] = "error"
    """What to do with a row that has a missing, empty or non-text field: ``error`` stops with the
    file, row and field; ``skip`` drops it, counts it and logs a summary."""

    def problems(self) -> list[str]:
        """Every problem with these settings, as readable messages (empty when all is well)."""
        problems = []
        if not self.source.strip():
            problems.append("source is empty: give a hub dataset id or a local .json/.jsonl/.parquet/.csv/.txt file")
        else:
            path = self.local_path
            if path.is_dir():
                problems.append(f"source {self.source!r} is a directory; give a .json/.jsonl/.parquet/.csv/.txt file")
            elif self.is_local and not path.exists():
                problems.append(f"source file {self.source!r} does not exist")
            elif self.is_local and path.suffix.lower() not in LOCAL_SUFFIXES:
                problems.append(
                    f"source file {self.source!r} has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}"
                )
            elif self.is_local and path.suffix.lower() == TEXT_SUFFIX and self.format != "book":
                problems.append(f"source file {self.source!r} is plain text, which only format 'book' reads")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(repr(name) for name in FORMATS)}, got {self.format!r}")
        if self.format == "book":
            problems += self._book_problems()
        if self.format == "pairs":
            if not self.prompt_field:
                problems.append("prompt_field is empty")
            if not self.response_field:
                problems.append("response_field is empty")
            if self.prompt_field and self.prompt_field == self.response_field:
                problems.append(f"prompt_field and response_field are the same field ({self.prompt_field!r})")
        if self.split is not None and not self.split.strip():
            problems.append("split is empty")
        if not 0.0 <= self.held_out_fraction < 1.0:
            problems.append(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be at least 1 (or None for all), got {self.max_samples}")
        if self.bad_rows not in ("error", "skip"):
            problems.append(f"bad_rows must be 'error' or 'skip', got {self.bad_rows!r}")
        return problems

    @property
    def window_stride(self) -> int:
        """Words from one ``book`` window's start to the next (see ``stride_words``)."""
        return self.stride_words if self.stride_words is not None else self.prefix_words + self.continuation_words

    def _book_problems(self) -> list[str]:
        problems = []
        for name in ("prefix_words", "continuation_words"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.stride_words is not None and self.stride_words < 1:
            problems.append(f"stride_words={self.stride_words} must be >= 1 (or None: windows side by side)")
        if not self.text_field:
            problems.append("text_field is empty")
        if problems or not (self.is_local and self.local_path.is_file()):
            return problems
        path = self.local_path
        if path.suffix.lower() == TEXT_SUFFIX:
            # Counting a book's words is cheap; a book too short for one window is a settings problem.
            num_words = len(path.read_text(encoding="utf-8", errors="replace").split())
            window = self.prefix_words + self.continuation_words
            if num_words < window:
                problems.append(
                    f"book {self.source!r} has {num_words} words, fewer than one window of {window} "
                    f"(prefix_words={self.prefix_words} + continuation_words={self.continuation_words})"
                )
        return problems

    @property
    def local_path(self) -> Path:
        """``source`` as a local file: from the working directory, else the project's file of that name (so the
        shipped configs' ``dsunlearn/assets/demo/...`` sources work from any folder, installed or not)."""
        return paths.resolve_path(self.source) or Path(self.source).expanduser()

    @property
    def is_local(self) -> bool:
        """Whether ``source`` names a local file: an existing path, one with a data-file suffix, or one
        written as a path (``/``, ``./``, ``../``, ``~``); anything else is a hub id."""
        path = self.local_path
        return (
            path.exists()
            or path.suffix.lower() in LOCAL_SUFFIXES
            or self.source.startswith(("/", "./", "../", "~"))
        )

    @property
    def hub_split(self) -> str:
        """The hub split actually loaded (see ``split``)."""
        if self.split is not None:
            return self.split
        return "validation" if self.format == "truthfulqa" else "train"

    @property
    def hub_name(self) -> Optional[str]:
        """The hub config name actually loaded (see ``name``)."""
        if self.name is not None:
            return self.name
        return "generation" if self.format == "truthfulqa" else None


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One (prompt, response) sample and where it came from."""

    prompt: str
    response: str
    source: str
    """The file (or ``hub id[split]``) it was read from."""
    row: int
    """1-based row: the line number for .jsonl files, else the record number (a ``book`` window: its book's row; a
    .txt file is row 1)."""
    right_answer: Optional[str] = None
    """The right answer to the question (``halueval``; ``truthfulqa``: the best answer), which the hallucination
    metric compares generations with."""
    hallucinated_answers: tuple[str, ...] = ()
    """Wrong answers to the question (``halueval``: the hallucinated one; ``truthfulqa``: its incorrect answers), for
    the hallucination metric."""
    knowledge: Optional[str] = None
    """``halueval``: the passage the right answer comes from (kept for judges and reports; never trained on)."""

    @property
    def origin(self) -> str:
        return f"{self.source}, row {self.row}"


@dataclass(frozen=True)
class BadRow:
    """A row that could not become a pair, and why."""

    source: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}, field {self.field!r}: {self.reason}"


@dataclass
class LoadedPairs:
    """What :func:`read_pairs` found: the usable pairs and the rows it skipped."""

    pairs: list[Pair]
    bad_rows: list[BadRow] = field(default_factory=list)
    num_rows: int = 0

    def summary(self, max_listed: int = 5) -> str:
        """One paragraph for the log: counts, and the first few skipped rows with their reasons."""
        text = f"{len(self.pairs)} pairs from {self.num_rows} rows"
        if self.bad_rows:
            listed = "; ".join(str(bad) for bad in self.bad_rows[:max_listed])
            more = f" (and {len(self.bad_rows) - max_listed} more)" if len(self.bad_rows) > max_listed else ""
            text += f"; skipped {len(self.bad_rows)} bad rows: {listed}{more}"
        return text


class _RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name = field_name
        self.reason = reason


def _text(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise _RowError(name, "missing")
    value = record[name]
    if not isinstance(value, str):
        raise _RowError(name, f"not text (got {type(value).__name__}: {value!r:.40})")
    if not value.strip():
        raise _RowError(name, "empty")
    return value


def _flag(record: dict[str, Any], name: str) -> bool:
    if name not in record or record[name] is None:
        raise _RowError(name, "missing")
    value = record[name]
    # CSV files hold booleans as text; parquet/json as bool (or 0/1 from some exporters).
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise _RowError(name, f"not a boolean (got {value!r:.40})")


PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")


def _required_columns(spec: DatasetSpec, columns: set[str], source_label: str) -> tuple[str, ...]:
    """The columns ``spec`` reads, as this data set spells them; raises ValueError, once for the whole file, when
    one is absent from every row (a wrong file or wrong field names, not a bad row)."""
    if spec.format == "pku_saferlhf":
        required = PKU_FIELDS
    elif spec.format == "halueval":
        required = HALUEVAL_FIELDS
    elif spec.format == "book":
        required = (spec.text_field,)
    elif spec.format == "truthfulqa":
        # The hub `generation` config uses snake_case fields, the original CSV title-case ones: read the spelling the
        # file has, and name the missing columns in the spelling it comes closest to (the CSV's for a .csv file).
        spellings = (TRUTHFULQA_CSV_FIELDS, TRUTHFULQA_HUB_FIELDS)
        if not source_label.lower().endswith(".csv"):
            spellings = spellings[::-1]
        required = max(spellings, key=lambda names: sum(name in columns for name in names))
    else:
        required = (spec.prompt_field, spec.response_field)
    missing = [name for name in required if name not in columns]
    if missing:
        has = ", ".join(repr(name) for name in sorted(columns)) or "none"
        plural = "s" if len(missing) > 1 else ""
        raise ValueError(
            f"{source_label!r} has no column{plural} {', '.join(repr(name) for name in missing)} "
            f"(format {spec.format!r} reads {', '.join(repr(name) for name in required)}; the file has: {has})"
        )
    return required


def book_windows(text: str, prefix_words: int, continuation_words: int, stride_words: int) -> list[tuple[str, str]]:
    """(prefix, continuation) windows of a book: window ``i`` starts at word ``i * stride_words`` and takes
    ``prefix_words`` words of prefix, then ``continuation_words`` of continuation.

    Words are whitespace-separated and joined back with single spaces (line breaks and runs of spaces become one
    space). Only whole windows are kept: a trailing stretch shorter than ``prefix_words + continuation_words`` words
    gives none, so every continuation is as long as the settings say.
    """
    words = text.split()
    window = prefix_words + continuation_words
    return [
        (" ".join(words[start : start + prefix_words]), " ".join(words[start + prefix_words : start + window]))
        for start in range(0, len(words) - window + 1, stride_words)
    ]


def _pairs_from_record(record: dict[str, Any], spec: DatasetSpec, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The pairs of one record as :class:`Pair` fields (prompt, response and any extra), read from ``columns``
    (:func:`_required_columns`); raises _RowError for a bad row."""
    if spec.format == "pku_saferlhf":
        prompt = _text(record, "prompt")
        pairs = []
        for i in (0, 1):
            if not _flag(record, f"is_response_{i}_safe"):
                pairs.append({"prompt": prompt, "response": _text(record, f"response_{i}")})
        return pairs
    if spec.format == "halueval":
        question, right, hallucinated, knowledge = (_text(record, name) for name in HALUEVAL_FIELDS)
        return [{"prompt": question, "response": hallucinated, "right_answer": right,
                 "hallucinated_answers": (hallucinated,), "knowledge": knowledge}]
    if spec.format == "book":
        text = _text(record, spec.text_field)
        windows = book_windows(text, spec.prefix_words, spec.continuation_words, spec.window_stride)
        if not windows:
            window = spec.prefix_words + spec.continuation_words
            raise _RowError(spec.text_field, f"{len(text.split())} words, fewer than one window of {window}")
        return [{"prompt": prefix, "response": continuation} for prefix, continuation in windows]
    prompt_name, response_name = columns
    fields = {"prompt": _text(record, prompt_name), "response": _text(record, response_name)}
    if spec.format == "truthfulqa":
        fields.update(right_answer=fields["response"], hallucinated_answers=_incorrect_answers(record, columns))
    return [fields]


def _incorrect_answers(record: dict[str, Any], columns: tuple[str, ...]) -> tuple[str, ...]:
    """A TruthfulQA record's incorrect answers; none when the column is absent (only the hallucination metric reads
    them, and it then counts no answer as closer to a wrong one)."""
    value = record.get(TRUTHFULQA_INCORRECT_FIELDS[columns])
    if isinstance(value, str):
        value = value.split(";")
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        return ()
    answers = value.tolist() if hasattr(value, "tolist") else value
    return tuple(answer.strip() for answer in answers if isinstance(answer, str) and answer.strip())


def _read_local_records(path: Path, text_field: str = "text") -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
    """(row number, record) for every record of a local data file, and the file's columns (a .txt file is one
    record, its text under ``text_field``)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    if suffix in (".json", ".jsonl"):
        records = _read_json_records(path)
        return records, {name for _, record in records for name in record}
    if suffix == TEXT_SUFFIX:
        return [(1, {text_field: path.read_text(encoding="utf-8")})], {text_field}
    if suffix == ".csv":
        import pandas as pd

        # Keep every cell as text and empty cells as "" so emptiness is reported, not turned into NaN.
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise ValueError(f"data file {str(path)!r} is empty") from None
    elif suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"data file {str(path)!r} has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}")
    records = [(i, _plain_record(record)) for i, record in enumerate(frame.to_dict("records"), start=1)]
    return records, {str(name) for name in frame.columns}


def _read_json_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8")
    one_object_per_line = path.suffix.lower() == ".jsonl"
    records: list[tuple[int, Any]] = []
    if not one_object_per_line:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            # A .json file with one object per line, which `datasets` also accepts.
            if error.msg != "Extra data":
                raise ValueError(f"data file {str(path)!r} is not valid JSON: {error}") from None
            one_object_per_line = True
        else:
            if isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list):
                loaded = next(iter(loaded.values()))  # a {"data": [...]} wrapper
            if not isinstance(loaded, list):
                raise ValueError(f"data file {str(path)!r} must hold a list of objects, or one object per line")
            records = list(enumerate(loaded, start=1))
    if one_object_per_line:
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: not valid JSON: {error.msg} (line {line_number}, column {error.colno})"
                ) from None
    for row, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, row {row}: expected a JSON object, got {type(record).__name__}")
    return records


def _plain_record(record: dict[str, Any]) -> dict[str, Any]:
    # Parquet nulls arrive as None or NaN, and numpy scalars as numpy types.
    plain = {}
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 1) == 0:
            value = value.item()
        plain[key] = value
    return plain


def _read_hub_records(spec: DatasetSpec) -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
    import datasets

    dataset = datasets.load_dataset(spec.source, spec.hub_name, split=spec.hub_split, revision=spec.revision)
    records = [(i, dict(record)) for i, record in enumerate(dataset, start=1)]
    return records, {name for _, record in records for name in record}


def read_pairs(spec: DatasetSpec) -> LoadedPairs:
    """Read the pairs described by ``spec``, with the rows that were skipped.

    Raises ``ValueError`` when ``spec`` has problems, when a bad row is met with
    ``bad_rows="error"`` (naming file, row and field), and when no usable pair is left;
    ``FileNotFoundError`` for a missing local file.
    """
    problems = spec.problems()
    if problems:
        raise ValueError("invalid data set settings: " + "; ".join(problems))
    if spec.is_local:
        path = spec.local_path
        source_label = str(path)
        records, columns = _read_local_records(path, spec.text_field)
    else:
        source_label = f"{spec.source}[{spec.hub_split}]"
        records, columns = _read_hub_records(spec)
    if not records:
        raise ValueError(f"data set {source_label!r} has no rows: it is empty")
    required = _required_columns(spec, columns, source_label)

    pairs, bad_rows = [], []
    for row, record in records:
        try:
            found = _pairs_from_record(record, spec, required)
        except _RowError as error:
            bad_rows.append(BadRow(source_label, row, error.field_name, error.reason))
            continue
        pairs.extend(Pair(source=source_label, row=row, **fields) for fields in found)

    if bad_rows and spec.bad_rows == "error":
        listed = "; ".join(str(bad) for bad in bad_rows[:5])
        more = f" (and {len(bad_rows) - 5} more bad rows)" if len(bad_rows) > 5 else ""
        raise ValueError(f"bad rows in {source_label!r}: {listed}{more}. Fix them or set bad_rows='skip' to drop them.")
    loaded = LoadedPairs(pairs, bad_rows, len(records))
    if not pairs:
        why = "; every row is bad" if len(bad_rows) == len(records) else ""
        if spec.format == "pku_saferlhf" and not why:
            why = "; no row has an unsafe response"
        raise ValueError(f"no usable (prompt, response) pairs in {source_label!r}{why} ({loaded.summary()})")
    if spec.max_samples is not None:
        loaded.pairs = loaded.pairs[: spec.max_samples]
    return loaded


def load_pairs(spec: DatasetSpec) -> list[Pair]:
    """Load the (prompt, response) pairs of a data set; skipped bad rows are logged as a warning.

    See :class:`DatasetSpec` for the formats and :func:`read_pairs` for the errors.
    """
    loaded = read_pairs(spec)
    if loaded.bad_rows:
        logger.warning("%s: %s", spec.source, loaded.summary())
    else:
        logger.info("%s: %s", spec.source, loaded.summary())
    return loaded.pairs


def prompt_key(pair: Pair) -> str:
    """What makes two pairs share a prompt: the same text after whitespace strip."""
    return pair.prompt.strip()


def split_pairs(pairs: list[Pair], held_out_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split ``pairs`` into (train, held_out) by prompt, deterministically from ``seed`` and the pairs.

    Every pair sharing a prompt (:func:`prompt_key`) lands on the same side: PKU-SafeRLHF gives two pairs for a row
    with two unsafe responses, and repeats prompts across rows, so a split of pairs would evaluate "held-out" prompts
    that were trained on. ``round(prompts * held_out_fraction)`` distinct prompts are held out (at least one when the
    fraction is positive and there are two prompts or more; training always keeps at least one). Both parts keep
    file order.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    group_ids: dict[str, int] = {}  # prompt -> index of its first appearance
    pair_groups = [group_ids.setdefault(prompt_key(pair), len(group_ids)) for pair in pairs]
    num_groups = len(group_ids)
    num_held_out = round(num_groups * held_out_fraction)
    if held_out_fraction > 0 and num_groups >= 2:
        num_held_out = max(num_held_out, 1)
    num_held_out = min(num_held_out, max(num_groups - 1, 0))
    generator = torch.Generator().manual_seed(seed)
    held_out_groups = set(torch.randperm(num_groups, generator=generator)[:num_held_out].tolist())
    train = [pair for pair, group in zip(pairs, pair_groups) if group not in held_out_groups]
    held_out = [pair for pair, group in zip(pairs, pair_groups) if group in held_out_groups]
    return train, held_out


def split_record(train: list[Pair], held_out: list[Pair]) -> dict[str, int]:
    """The distinct prompts of each side of a split and how many of them both share (0 for :func:`split_pairs`)."""
    train_prompts = {prompt_key(pair) for pair in train}
    held_out_prompts = {prompt_key(pair) for pair in held_out}
    return {
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "train_prompts": len(train_prompts),
        "held_out_prompts": len(held_out_prompts),
        "prompt_overlap": len(train_prompts & held_out_prompts),
    }


# ---------------------------------------------------------------------------------------------------
# Prompt format and tokenisation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is turned into the text that precedes the response.

    With ``use_chat_template`` the tokenizer's chat template renders one user turn (the prompt) with
    the generation prompt added; the response, and the turn end that closes it, are what the template renders after
    that in the whole [user, assistant] conversation. Otherwise ``template`` (default
    ``"### Question: {prompt}\\n ### Answer: {response}"``) is used: the prompt part is everything before
    ``{response}``, which must end the template.
    """

    template: Optional[str] = None
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.use_chat_template:
            return
        template = self.resolved_template
        if template.count("{prompt}") != 1 or template.count("{response}") != 1:
            raise ValueError(f"template must contain {{prompt}} and {{response}} exactly once, got {template!r}")
        if not template.endswith("{response}"):
            raise ValueError(
                f"template must end with {{response}} (EOS is appended to the response automatically), got {template!r}"
            )
        if template.index("{prompt}") > template.index("{response}"):
            raise ValueError(f"{{prompt}} must come before {{response}} in the template, got {template!r}")

    @property
    def resolved_template(self) -> str:
        return DEFAULT_TEMPLATE if self.template is None else self.template

    def prompt_text(self, tokenizer: Any, prompt: str) -> str:
        """The text that precedes the response for ``prompt``."""
        if self.use_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("use_chat_template is set but the tokenizer has no chat template")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        # str.replace, not str.format: prompts and templates may contain other braces.
        return self._template_prompt_part.rstrip(" ").replace("{prompt}", prompt)

    def response_text(self, response: str) -> str:
        """The response as it is tokenised: with the template's space before ``{response}`` (byte-level BPE
        tokenizers attach a space to the word after it, so "Answer:" + " Sure" is how they saw such text)."""
        if self.use_chat_template:
            return response
        part = self._template_prompt_part
        return part[len(part.rstrip(" ")) :] + response

    @property
    def _template_prompt_part(self) -> str:
        return self.resolved_template[: -len("{response}")]


@dataclass
class TokenizedSequence:
    """Token ids of prompt + response, and which of them are response tokens."""

    input_ids: list[int]
    response_mask: list[int]
    """1 for response tokens (including the end of the answer: EOS, or the chat template's turn end), 0 for prompt
    tokens."""
    response_capped: bool = False
    """Whether the response lost its tail to fit ``max_length`` (its end-of-answer token with it)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids) - sum(self.response_mask)


class PromptTooLong(ValueError):
    """The prompt part leaves no room for a single response token within ``max_length``."""

    def __init__(self, message: str, num_prompt_tokens: int):
        super().__init__(message)
        self.num_prompt_tokens = num_prompt_tokens


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before the text when encoding (e.g. Llama's BOS; none for GPT-2)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def _without_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    # A chat template usually writes the BOS itself; never add it twice.
    return ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids


def _check_prompt_fits(num_prompt_tokens: int, max_length: int, where: str) -> None:
    if num_prompt_tokens + 1 > max_length:
        raise PromptTooLong(
            f"{where}: the prompt takes {num_prompt_tokens} tokens, so data.max_length={max_length} leaves no room "
            "for the response",
            num_prompt_tokens,
        )


def tokenize_prompt(
    tokenizer: Any,
    prompt: str,
    fmt: PromptFormat,
    max_length: Optional[int] = None,
    prefix_ids: Optional[list[int]] = None,
) -> list[int]:
    """Token ids of the prompt part (special prefix included), for generation. With ``max_length``, raises
    :class:`PromptTooLong` when no response token would fit after it: a prompt is never cut."""
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    ids = list(tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    ids = _without_prefix(ids, prefix)
    if max_length is not None:
        _check_prompt_fits(len(prefix) + len(ids), max_length, f"prompt {prompt[:40]!r}")
    return prefix + ids


def _special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token (EOS, and added ones such as ``<|eot_id|>`` or ``<end_of_turn>``)."""
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return [text for text in dict.fromkeys([*added, *tokenizer.all_special_tokens]) if text]


def _answer_text(tokenizer: Any, fmt: PromptFormat, prompt_text: str, pair: Pair, with_end: bool) -> tuple[str, bool]:
    """The text that follows ``prompt_text`` in the training sequence, and whether EOS is to be appended to its ids.

    With a chat template this is the assistant turn as the template renders it, up to and including the first
    special token after the content (the template's own turn end: ``<|eot_id|>``, ``<end_of_turn>``); EOS only when
    the template ends the turn with no special token. ``with_end`` False leaves the end of the answer out.
    """
    if not fmt.use_chat_template:
        return fmt.response_text(pair.response), with_end and tokenizer.eos_token_id is not None
    conversation = [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.response}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not rendered.startswith(prompt_text):
        raise ValueError(
            f"{pair.origin}: the chat template renders the conversation differently from its prompt with "
            "add_generation_prompt=True, so the answer cannot be located; use data.template instead"
        )
    turn = rendered[len(prompt_text) :]
    content = pair.response if pair.response in turn else pair.response.strip()  # templates may trim the content
    at = turn.find(content)
    if at < 0:
        raise ValueError(f"{pair.origin}: the chat template changes the response text, so it cannot be located")
    content_end = at + len(content)
    if not with_end:
        return turn[:content_end], False
    tail = turn[content_end:]
    ends = [(tail.find(text), -len(text), text) for text in _special_strings(tokenizer) if text in tail]
    if not ends:
        return turn[:content_end], tokenizer.eos_token_id is not None
    position, _, text = min(ends)  # the first special token after the content; the longest one at a tie
    return turn[: content_end + position + len(text)], False


def _tokenize_joint(tokenizer: Any, prompt_text: str, answer_text: str) -> tuple[list[int], int]:
    """Token ids of ``prompt_text + answer_text`` and the index of the first answer token.

    The joint text is tokenised once, so the answer's tokens are those the model sees after its prompt; the cut is
    the first token reaching past the prompt's characters (a token straddling the boundary holds answer text).
    """
    text = prompt_text + answer_text
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        cut = next((i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(prompt_text)), len(ids))
        return ids, cut
    # A Python tokenizer has no offsets: the joint ids must begin with the prompt's own.
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("this (slow) tokenizer merges tokens across the prompt/response boundary; use a fast one")
    return ids, len(prompt_ids)


def tokenize_pair(
    tokenizer: Any,
    pair: Pair,
    fmt: PromptFormat,
    max_length: int,
    prefix_ids: Optional[list[int]] = None,
    *,
    end_of_response: bool = True,
) -> TokenizedSequence:
    """Tokenise one pair as [special prefix] + prompt part + response + [end of answer], with its response mask.

    The end of the answer is EOS, or with a chat template the template's own turn end; ``end_of_response`` False
    leaves it out. The prompt is never cut: the response is capped at ``max_length`` (losing its tail and its end),
    and :class:`PromptTooLong` is raised when not even one response token fits. ``prefix_ids`` (from
    :func:`special_prefix_ids`) may be passed to avoid recomputing it per pair.
    """
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    prompt_text = fmt.prompt_text(tokenizer, pair.prompt)
    answer_text, append_eos = _answer_text(tokenizer, fmt, prompt_text, pair, end_of_response)
    ids, cut = _tokenize_joint(tokenizer, prompt_text, answer_text)
    prompt_ids, response_ids = _without_prefix(ids[:cut], prefix), ids[cut:]
    if append_eos:
        response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        raise ValueError(f"{pair.origin}: the response tokenises to nothing")
    _check_prompt_fits(len(prefix) + len(prompt_ids), max_length, pair.origin)
    room = max_length - len(prefix) - len(prompt_ids)
    input_ids = prefix + prompt_ids + response_ids[:room]
    response_mask = [0] * (len(prefix) + len(prompt_ids)) + [1] * len(response_ids[:room])
    return TokenizedSequence(input_ids, response_mask, response_capped=len(response_ids) > room)


@dataclass
class TokenizedPairs:
    """The pairs that fit ``max_length``, their sequences, and what did not fit."""

    pairs: list[Pair]
    """The pairs kept, in their order."""
    sequences: list[TokenizedSequence]
    """One per kept pair."""
    dropped: list[Pair]
    """Pairs whose prompt leaves no room for a response token."""

    @property
    def num_capped(self) -> int:
        """Kept pairs whose response lost its tail."""
        return sum(sequence.response_capped for sequence in self.sequences)

    def summary(self, max_listed: int = 3) -> str:
        """One line for the log: counts, and the first few dropped pairs by origin."""
        text = f"{len(self.pairs)} pairs kept, {self.num_capped} responses capped, {len(self.dropped)} pairs dropped"
        if self.dropped:
            listed = "; ".join(pair.origin for pair in self.dropped[:max_listed])
            more = f" and {len(self.dropped) - max_listed} more" if len(self.dropped) > max_listed else ""
            text += f" (prompt too long: {listed}{more})"
        return text


def tokenize_pairs(
    tokenizer: Any,
    pairs: list[Pair],
    fmt: PromptFormat,
    max_length: int,
    *,
    end_of_response: bool = True,
    name: str = "data",
) -> TokenizedPairs:
    """:func:`tokenize_pair` for every pair, dropping those whose prompt does not fit; raises ValueError naming
    ``data.max_length`` when none fits. ``name`` says which data set it is in messages."""
    prefix = special_prefix_ids(tokenizer)
    kept, sequences, dropped, shortest_prompt = [], [], [], None
    for pair in pairs:
        try:
            sequence = tokenize_pair(tokenizer, pair, fmt, max_length, prefix, end_of_response=end_of_response)
        except PromptTooLong as error:
            dropped.append(pair)
            shortest_prompt = min(error.num_prompt_tokens, shortest_prompt or error.num_prompt_tokens)
            continue
        kept.append(pair)
        sequences.append(sequence)
    if pairs and not kept:
        raise ValueError(
            f"data.max_length={max_length} is too short for every {name} pair: the shortest prompt takes "
            f"{shortest_prompt} tokens, and a response needs at least one more (a prompt is never cut)"
        )
    return TokenizedPairs(kept, sequences, dropped)


def resolve_pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its EOS id (with a warning), else an error."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        logger.warning(
            "the tokenizer has no pad token; padding with EOS (id %d). This is safe: padded positions are "
            "masked out of attention and of every loss term.",
            tokenizer.eos_token_id,
        )
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token before training")


def pad_batch(sequences: list[TokenizedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``sequences`` into ``input_ids``, ``attention_mask``, ``response_mask``, each [B, L] long."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        n = len(sequence)
        input_ids[i, :n] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, :n] = torch.tensor(sequence.response_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# ---------------------------------------------------------------------------------------------------
# The global example stream and random answers
# ---------------------------------------------------------------------------------------------------

# What a seeded generator is for: the first word of its key, so no two uses ever share a stream.
_EPOCH_ORDER, _RANDOM_ANSWERS = 0, 1


def _generator(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints. NumPy's SeedSequence hashes the whole tuple, so nearby keys
    ((s, e + 1) and (s + 1, e)) give unrelated streams, unlike adding the parts into one seed."""
    return np.random.default_rng(key)


@functools.lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: a step reads a few positions of one or two epochs, and the forget and normal streams alternate.
    return _generator(_EPOCH_ORDER, seed, epoch).permutation(num_samples)


class StepSampler:
    """Which examples each (rank, micro-step) slot of an optimizer step reads, from one global example stream.

    Epoch ``e`` is a permutation of the ``num_samples`` examples drawn from (``seed``, ``e``); the epochs, one after
    the other, make the stream. Optimizer step ``s`` reads the ``G = batch_size * world_size *
    gradient_accumulation_steps`` stream positions ``[s*G, (s+1)*G)``, and slot ``j = micro_step * world_size +
    rank`` reads ``[s*G + j*batch_size, s*G + (j+1)*batch_size)``.

    So the examples of a step, and their stream positions (which seed the random answers), depend on (seed, step,
    G) only: 1 rank x 4 micro-steps and 4 ranks x 1 train on the same examples, and a resumed run reads at step ``s``
    what an uninterrupted one read. A step may run across an epoch boundary; an example occurs twice in one step
    only when ``G`` exceeds ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        world_size: int = 1,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError(
                f"world_size and gradient_accumulation_steps must be at least 1, "
                f"got {world_size} and {gradient_accumulation_steps}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed

    @property
    def step_size(self) -> int:
        """G: the examples one optimizer step reads, over all ranks and micro-steps."""
        return self.batch_size * self.world_size * self.gradient_accumulation_steps

    def positions(self, step: int, rank: int = 0, micro_step: int = 0) -> range:
        """The stream positions of slot (``rank``, ``micro_step``) of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if not 0 <= micro_step < self.gradient_accumulation_steps:
            raise ValueError(f"micro_step must be in [0, {self.gradient_accumulation_steps}), got {micro_step}")
        start = step * self.step_size + (micro_step * self.world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)

    def example_at(self, position: int) -> int:
        """The example index at a stream position."""
        epoch, within = divmod(position, self.num_samples)
        return int(_epoch_order(self.num_samples, self.seed, epoch)[within])

    def indices(self, step: int, rank: int = 0, micro_step: int = 0) -> list[int]:
        """The ``batch_size`` example indices of slot (``rank``, ``micro_step``) of optimizer step ``step``."""
        return [self.example_at(position) for position in self.positions(step, rank, micro_step)]


def draw_random_answers(pool: list[str], stream_positions: Iterable[int], k: int, seed: int) -> list[list[str]]:
    """``k`` random answers for each forget example, given by its stream position (:meth:`StepSampler.positions`).

    The answers of one example come from a generator seeded by (``seed``, its stream position) alone: the same
    whichever rank and micro-step read it, and new each time the stream brings the example back. Pass the responses
    of the normal data's *train* split as ``pool``. An example's answers are distinct pool entries when the pool has
    at least ``k``; otherwise they are drawn with replacement.
    """
    if not pool:
        raise ValueError("the random-answer pool is empty: the normal train split has no responses")
    if k < 1:
        raise ValueError(f"k (random answers per prompt) must be at least 1, got {k}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    answers = []
    for position in stream_positions:
        chosen = _generator(_RANDOM_ANSWERS, seed, position).choice(len(pool), size=k, replace=len(pool) < k)
        answers.append([pool[i] for i in chosen.tolist()])
    return answers
