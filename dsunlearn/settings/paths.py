"""Where the project's own files are found: ``configs/``, ``ds_configs/`` and ``dsunlearn/assets/``.

In a checkout they lie at its top (launch.sh, the README and the tests name them so). A wheel (``pip install .``)
carries ``configs/`` and ``ds_configs/`` inside the package (pyproject.toml maps them there), and the package's own
``assets/`` lie at ``site-packages/dsunlearn/assets``. A relative path that does not exist from the working directory
is looked up in the installed package, then beside it, so ``configs/demo.yaml``, ``ds_configs/zero3.json`` and
``dsunlearn/assets/demo/forget.jsonl`` name the same files from any folder, installed or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dsunlearn/
# The installed package first: beside an installed package lies site-packages, where an unrelated distribution may
# have put a top-level configs/ of its own. In a checkout the package holds no configs/, so the top of it answers.
_PROJECT_ROOTS = (PACKAGE_DIR, PACKAGE_DIR.parent)


def resolve_path(path: str) -> Optional[Path]:
    """``path`` as given if it exists (from the working directory), else the project's file of that relative name
    (see the module docstring), else None."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    if candidate.is_absolute():
        return None
    for root in _PROJECT_ROOTS:
        if (root / candidate).exists():
            return root / candidate
    return None
