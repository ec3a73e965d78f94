"""A wheel (``pip install .``, not editable) used from another folder finds the configs it ships."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from launching import REPO

# What the wheel is built from: copied, so the build's own folders (build/, *.egg-info) never land in the checkout.
SOURCES = ("pyproject.toml", "README.md", "dsunlearn", "kernels", "configs", "ds_configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(folder the wheel is installed into, an empty working directory elsewhere)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (root / "dist").glob("dsunlearn-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return site, elsewhere


def run_installed(installed, *args, timeout=120):
    site, elsewhere = installed
    # PYTHONPATH comes before the editable install of the checkout, so this imports the wheel's copy.
    env = dict(os.environ, PYTHONPATH=str(site), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_shipped_configs_resolve_from_another_folder(installed):
    site, _ = installed
    probe = """
import json
import dsunlearn
from dsunlearn.settings.config import RunConfig, parse_run_config
from dsunlearn.settings.paths import resolve_path
found = {"package": dsunlearn.__file__, "default": str(resolve_path(RunConfig().train.deepspeed_config))}
for name in ("demo", "opt-1.3b-harmful", "llama-3-8b-offload"):
    cfg, _ = parse_run_config(["--config", f"configs/{name}.yaml", "--model.name_or_path", "org/model"])
    found[name] = str(resolve_path(cfg.train.deepspeed_config))
cfg, _ = parse_run_config(["--config", "configs/demo.yaml", "--config", "configs/presets/npo.yaml",
                           "--model.name_or_path", "org/model"])
found["preset npo"] = cfg.objective.forget_loss
print(json.dumps(found))
"""
    done = run_installed(installed, "-c", probe)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    package = site / "dsunlearn"
    assert found.pop("package") == str(package / "__init__.py")
    assert found == {
        "default": str(package / "ds_configs" / "zero3.json"),
        "demo": str(package / "ds_configs" / "zero3.json"),
        "opt-1.3b-harmful": str(package / "ds_configs" / "zero3.json"),
        "llama-3-8b-offload": str(package / "ds_configs" / "zero3_offload.json"),
        "preset npo": "npo",  # configs/presets/ travels in the wheel
    }


def test_the_wheel_carries_the_kernels_beside_their_package_entry(installed):
    """The kernel modules live in the checkout's top-level kernels/ (a namespace folder, DESIGN.md §3) and the package
    entry in dsunlearn/kernels/__init__.py: a wheel puts both in one folder, and transformers finds Hugging Face's
    ``kernels``, not ours."""
    site, _ = installed
    probe = """
import importlib.util, json, transformers, dsunlearn.kernels
hf_kernels = importlib.util.find_spec("kernels")  # Hugging Face's, where installed (transformers >= 5.25 needs it)
print(json.dumps({"path": list(dsunlearn.kernels.__path__), "op": dsunlearn.kernels.fused_linear_ce_kl.__module__,
                  "hf_kernels": hf_kernels.origin if hf_kernels else ""}))
"""
    done = run_installed(installed, "-c", probe)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["path"] == [str(site / "dsunlearn" / "kernels")]
    assert found["op"] == "dsunlearn.kernels.ce_kl"
    assert not found["hf_kernels"].startswith(str(site))
    assert {"ce_kl.py", "chunked.py", "triton_ce_kl.py", "bench.py", "__init__.py"} <= {
        path.name for path in (site / "dsunlearn" / "kernels").iterdir()}
    done = run_installed(installed, "-m", "dsunlearn.kernels.bench", "--help")
    assert done.returncode == 0 and "usage: python -m dsunlearn.kernels.bench" in done.stdout, done.stderr[-2000:]


@pytest.mark.integration
def test_one_step_of_the_shipped_demo_config_from_another_folder(installed, tiny_model_dir):
    _, elsewhere = installed
    done = run_installed(
        installed, "-m", "dsunlearn", "train", "--config", "configs/demo.yaml",
        "--model.name_or_path", str(tiny_model_dir), "--output.dir", "run",
        "--train.max_steps", "1", "--output.export", "false", "--output.evaluate", "false", timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert (elsewhere / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert "deepspeed_config: ds_configs/zero3.json" in (elsewhere / "run" / "config.yaml").read_text()
