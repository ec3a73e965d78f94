"""The checks of a classifier setting (``harm_classifier``, ``judge_classifier``: local Hugging Face
sequence-classification folders, never downloaded), from ``config.json`` alone, before any model is loaded. Here, below
the evaluation, so that a run's settings (``output.harm_classifier``) are checked when they are parsed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _label_id(labels: dict[int, str], label: str) -> Optional[int]:
    """The id of ``label`` among ``labels`` (exact match first, then case-insensitive), or None when none or several
    match."""
    matches = [i for i, name in labels.items() if name == label] or [
        i for i, name in labels.items() if name.lower() == label.lower()
    ]
    return matches[0] if len(matches) == 1 else None


def classifier_problems(setting: str, path: Optional[str], label_setting: str, label: str) -> list[str]:
    """The problems of a classifier setting (``setting`` names the folder ``path``, ``label_setting`` its
    ``label``): a missing folder, or a ``config.json`` without that label in its ``id2label``. Reads only
    ``config.json``: no model is loaded."""
    if path is None:
        return []
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [f"{setting}: local folder {path!r} does not exist (it is never downloaded)"]
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        return [f"{setting}: {path!r} has no config.json (a Hugging Face sequence-classification model folder)"]
    except json.JSONDecodeError as error:
        return [f"{setting}: {str(config_file)!r} is not valid JSON ({error.msg}, line {error.lineno})"]
    labels = {int(i): str(name) for i, name in (config.get("id2label") or {}).items()}
    if _label_id(labels, label) is None:
        return [f"{setting}: {path!r} has labels {sorted(labels.values())}; set {label_setting} to the one meant "
                f"(got {label!r})"]
    return []
