"""The SLURM test cluster (slurm.py) for the whole session, and the runs the cluster tests compare against.

Without root or SLURM the tests skip with the reason; under CI (CI=true) a cluster that cannot start fails them.
"""

import os
import sys
from pathlib import Path

import pytest
from launching import REPO, as_users_run, launch, preset_args
from slurm import ClusterError, SlurmCluster, missing_requirements

# One run's settings, shared by every cluster test and its one-node baseline: long enough to be interrupted mid-run.
MAX_STEPS = 30


def _cannot_run(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the SLURM cluster tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


# Module scope: the cluster (test_slurm_runs.py is its only user) is gone before the rest of the suite runs, so its
# daemons and any job left over cannot touch other tests' processes.
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        _cannot_run(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (ClusterError, OSError) as err:
        cluster.stop()
        _cannot_run(f"the SLURM test cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def run_args(tiny_model_dir):
    """The training flags of every cluster run but its preset (preset_args), absolute paths only (jobs start in other
    folders)."""
    return [
        "--config", "configs/demo.yaml",
        "--model.name_or_path", str(tiny_model_dir),
        "--data.forget.source", str(REPO / "dsunlearn/assets/demo/forget.jsonl"),
        "--data.normal.source", str(REPO / "dsunlearn/assets/demo/normal.jsonl"),
        "--train.max_steps", str(MAX_STEPS),
        "--train.checkpoint_every", "10",
        "--output.evaluate", "false",
    ]


@pytest.fixture(scope="session")
def one_node_runs(tmp_path_factory, run_args):
    """``one_node_runs(preset)``: the same run on one node with two ranks, made once per preset: what every cluster
    run of that preset must reproduce."""
    runs = {}

    def one_node_run(preset: str) -> Path:
        if preset not in runs:
            out = tmp_path_factory.mktemp(f"one_node_{preset}") / "run"
            code, output = launch([*run_args, *preset_args(preset), "--output.dir", str(out)], nproc=2)
            assert code == 0, output[-4000:]
            runs[preset] = out
        return runs[preset]

    return one_node_run


@pytest.fixture
def job_env(slurm_cluster):
    """What a user's shell holds when submitting: the project's Python and launcher on PATH, one thread per rank."""
    bin_dir = Path(sys.executable).parent
    return slurm_cluster.env(PYTHON=sys.executable, OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture
def users_job_env(job_env):
    """``job_env`` without any thread-count variable, as users submit: for the tests of signals, since numpy's OpenBLAS
    then starts threads at import in every rank (launching.THREAD_VARIABLES; issue 17, item 6)."""
    return as_users_run(job_env)

