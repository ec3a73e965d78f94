"""Nothing of ours shadows a dependency or the standard library (DESIGN.md §3).

Python puts a folder of the checkout first on ``sys.path`` in three ways: the working folder for ``python -m`` and
``python -c`` (users run from the checkout root), the script's folder for ``python dsunlearn/train.py`` (as
``deepspeed`` runs it), and each test folder as pytest imports its files (``rootdir``/prepend import mode: every
folder here is one without ``__init__.py``). A module or a *regular* package (a folder with ``__init__.py``) found
there wins over the installed one of that name: transformers >= 5.25 imports Hugging Face's ``kernels`` inside
``import transformers``, and a top-level ``kernels/__init__.py`` of ours broke every command run from the checkout.
A folder without ``__init__.py`` is only a namespace portion: an installed regular package of that name wins.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import REPO

# The folders a Python process of ours may have first on sys.path (see the module docstring); dsunlearn/ is the
# script run's folder, checked by test_the_training_script_drops_its_own_folder.
TEST_FOLDERS = sorted(
    folder for folder in [REPO / "tests", *(REPO / "tests").rglob("*")]
    if folder.is_dir() and folder.name != "__pycache__" and not folder.name.startswith(".")
)
SEARCHED_FOLDERS = [REPO, *TEST_FOLDERS]


def importable_names(folder: Path) -> dict[str, str]:
    """Top-level names that ``folder`` provides when it is on sys.path: name -> "module", "package" (regular) or
    "namespace" (a folder without __init__.py)."""
    names = {}
    for entry in folder.iterdir():
        if entry.name.startswith((".", "__")):
            continue
        if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = "module"
        elif entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = "package" if (entry / "__init__.py").is_file() else "namespace"
    return names


def foreign_top_level_names() -> dict[str, list[str]]:
    """Every top-level module name of an installed distribution other than ours, and of the standard library."""
    foreign = {
        name: [dist for dist in dists if dist.lower() != "dsunlearn"]
        for name, dists in importlib.metadata.packages_distributions().items()
    }
    foreign = {name: dists for name, dists in foreign.items() if dists}
    for name in (*sys.stdlib_module_names, *sys.builtin_module_names):
        foreign.setdefault(name, []).append("the standard library")
    return foreign


def resolved_origin(name: str, first_on_path: Path) -> list[str]:
    """Where ``import name`` resolves with ``first_on_path`` first on sys.path, in a fresh interpreter: the module's
    file or the package's folders."""
    probe = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(first_on_path)!r})\n"
        f"spec = importlib.util.find_spec({name!r})\n"
        "print(json.dumps([spec.origin] if spec.origin else list(spec.submodule_search_locations)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("folder", SEARCHED_FOLDERS, ids=lambda folder: str(folder.relative_to(REPO)) or ".")
def test_no_name_of_ours_shadows_an_installed_one(folder):
    foreign = foreign_top_level_names()
    clashes = []
    for name, kind in sorted(importable_names(folder).items()):
        if name not in foreign:
            continue
        where = folder / name if kind != "module" else folder / f"{name}.py"
        if kind != "namespace":
            clashes.append(f"{where.relative_to(REPO)} ({kind}) shadows {name!r} of {', '.join(foreign[name])}")
            continue
        # A namespace portion loses to an installed module or regular package; it merges with (and so changes) an
        # installed namespace package. Ask the import system which one wins.
        origin = resolved_origin(name, folder)
        if any(Path(path).resolve().is_relative_to(where.resolve()) for path in origin):
            clashes.append(f"{where.relative_to(REPO)} (namespace folder) is part of {name!r} of "
                           f"{', '.join(foreign[name])}: import resolves to {origin}")
    assert not clashes, "names of ours that shadow installed ones:\n" + "\n".join(clashes)


def test_the_training_script_drops_its_own_folder():
    """``python dsunlearn/train.py`` (how ``deepspeed`` starts ranks) puts dsunlearn/ first on sys.path, where every
    module and room of the package would be a top-level name; the script removes it before importing anything. Run
    the script's module code as the interpreter runs a script (its folder first on sys.path), not its main()."""
    script = REPO / "dsunlearn" / "train.py"
    probe = (
        "import json, runpy, sys\n"
        f"sys.path.insert(0, {str(script.parent)!r})\n"
        f"runpy.run_path({str(script)!r}, run_name='script_probe')\n"
        "top_level = {name: getattr(module, '__file__', None)\n"
        "             for name, module in sys.modules.items() if '.' not in name}\n"
        "print(json.dumps({'path': sys.path, 'top_level': top_level}))\n"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", probe], cwd="/", env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    package_dir = script.parent.resolve()
    still_on_path = [entry for entry in found["path"] if entry and Path(entry).resolve() == package_dir]
    assert not still_on_path, f"{package_dir} is still on sys.path after the script's first lines"
    from_package_dir = {
        name: file for name, file in found["top_level"].items()
        if name != "dsunlearn" and file and Path(file).resolve().is_relative_to(package_dir)
    }
    assert not from_package_dir, f"modules of dsunlearn/ imported under top-level names: {from_package_dir}"
