"""The file formats: records of a local .json/.jsonl/.parquet/.csv/.txt file or of a hub dataset, as plain dicts
with their row numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dsunlearn.settings.dataset import LOCAL_SUFFIXES, TEXT_SUFFIX, DatasetSpec


def read_local_records(path: Path, text_field: str = "text") -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
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


def read_hub_records(spec: DatasetSpec) -> tuple[list[tuple[int, dict[str, Any]]], set[str]]:
    import datasets

    dataset = datasets.load_dataset(spec.source, spec.hub_name, split=spec.hub_split, revision=spec.revision)
    records = [(i, dict(record)) for i, record in enumerate(dataset, start=1)]
    return records, {name for _, record in records for name in record}
