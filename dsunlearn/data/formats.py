"""The data-set formats (``pku_saferlhf``, ``truthfulqa``, ``halueval``, ``book``, ``pairs``, ``tofu``,
``muse_verbmem``, ``muse_knowmem``): which columns each reads and how one record becomes (prompt, response) pairs; a
bad row raises :class:`RowError` naming its field."""

from __future__ import annotations

from typing import Any

from dsunlearn.settings.dataset import (
    HALUEVAL_FIELDS,
    MUSE_KNOWMEM_FIELDS,
    MUSE_VERBMEM_FIELDS,
    TOFU_FIELDS,
    TOFU_OPTIONAL_TEXT_FIELDS,
    TOFU_PERTURBED_FIELD,
    TRUTHFULQA_CSV_FIELDS,
    TRUTHFULQA_HUB_FIELDS,
    TRUTHFULQA_INCORRECT_FIELDS,
    DatasetSpec,
)


class RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name = field_name
        self.reason = reason


def _text(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise RowError(name, "missing")
    value = record[name]
    if not isinstance(value, str):
        raise RowError(name, f"not text (got {type(value).__name__}: {value!r:.40})")
    if not value.strip():
        raise RowError(name, "empty")
    return value


def _flag(record: dict[str, Any], name: str) -> bool:
    if name not in record or record[name] is None:
        raise RowError(name, "missing")
    value = record[name]
    # CSV files hold booleans as text; parquet/json as bool (or 0/1 from some exporters).
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(name, f"not a boolean (got {value!r:.40})")


PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
# (prompt, response) columns of the benchmarks' formats.
BENCHMARK_FIELDS = {"tofu": TOFU_FIELDS, "muse_verbmem": MUSE_VERBMEM_FIELDS, "muse_knowmem": MUSE_KNOWMEM_FIELDS}


def required_columns(spec: DatasetSpec, columns: set[str], source_label: str) -> tuple[str, ...]:
    """The columns ``spec`` reads, as this data set spells them; raises ValueError, once for the whole file, when
    one is absent from every row (a wrong file or wrong field names, not a bad row)."""
    if spec.format == "pku_saferlhf":
        required = PKU_FIELDS
    elif spec.format == "halueval":
        required = HALUEVAL_FIELDS
    elif spec.format == "book":
        required = (spec.text_field,)
    elif spec.format in BENCHMARK_FIELDS:
        required = BENCHMARK_FIELDS[spec.format]
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


def pairs_from_record(record: dict[str, Any], spec: DatasetSpec, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The pairs of one record as :class:`Pair` fields (prompt, response and any extra), read from ``columns``
    (:func:`required_columns`); raises RowError for a bad row."""
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
            raise RowError(spec.text_field, f"{len(text.split())} words, fewer than one window of {window}")
        return [{"prompt": prefix, "response": continuation} for prefix, continuation in windows]
    prompt_name, response_name = columns
    fields = {"prompt": _text(record, prompt_name), "response": _text(record, response_name)}
    if spec.format == "truthfulqa":
        fields.update(right_answer=fields["response"], hallucinated_answers=_incorrect_answers(record, columns))
    if spec.format == "tofu":
        fields.update(_tofu_answers(record))
    return [fields]


def _tofu_answers(record: dict[str, Any]) -> dict[str, Any]:
    """A TOFU record's optional fields as :class:`Pair` fields. An absent (or null) field is left out; one that is
    there must be text (``perturbed_answer``: a non-empty list of texts), and the truth ratio's two inputs,
    ``paraphrased_answer`` and ``perturbed_answer``, come together or not at all."""
    fields: dict[str, Any] = {}
    for name in TOFU_OPTIONAL_TEXT_FIELDS:
        if record.get(name) is not None:
            fields[name] = _text(record, name)
    perturbed = record.get(TOFU_PERTURBED_FIELD)
    if perturbed is not None:
        fields["perturbed_answers"] = _text_list(perturbed, TOFU_PERTURBED_FIELD)
    has_paraphrase, has_perturbed = "paraphrased_answer" in fields, "perturbed_answers" in fields
    if has_paraphrase != has_perturbed:
        missing, present = ("perturbed_answer", "paraphrased_answer") if has_paraphrase else (
            "paraphrased_answer", "perturbed_answer")
        raise RowError(missing, f"missing, but {present!r} is given: the truth ratio needs both")
    return fields


def _text_list(value: Any, name: str) -> tuple[str, ...]:
    # Parquet gives a numpy array, JSON a list.
    items = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(items, (list, tuple)):
        raise RowError(name, f"not a list of texts (got {type(value).__name__}: {value!r:.40})")
    if not items:
        raise RowError(name, "an empty list")
    for position, item in enumerate(items, start=1):
        if not isinstance(item, str):
            raise RowError(name, f"item {position} is not text (got {type(item).__name__}: {item!r:.40})")
        if not item.strip():
            raise RowError(name, f"item {position} is empty")
    return tuple(items)


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
