"""Reading a data set into pairs: its records (:mod:`records`), turned into pairs by its format (:mod:`formats`),
with bad rows counted and reported or rejected (file, row, field)."""

from __future__ import annotations

import logging

from dsunlearn.data.formats import RowError, pairs_from_record, required_columns
from dsunlearn.data.pairs import BadRow, LoadedPairs, Pair
from dsunlearn.data.records import read_hub_records, read_local_records
from dsunlearn.settings.dataset import DatasetSpec

logger = logging.getLogger(__name__)


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
        records, columns = read_local_records(path, spec.text_field)
    else:
        source_label = f"{spec.source}[{spec.hub_split}]"
        records, columns = read_hub_records(spec)
    if not records:
        raise ValueError(f"data set {source_label!r} has no rows: it is empty")
    required = required_columns(spec, columns, source_label)

    pairs, bad_rows = [], []
    for row, record in records:
        try:
            found = pairs_from_record(record, spec, required)
        except RowError as error:
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
