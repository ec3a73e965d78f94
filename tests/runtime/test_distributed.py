"""Short 2-rank runs end cleanly (distributed.py: the process group is torn down on the way out, so no rank aborts
in C++ at exit: "terminate called without an active exception", exit -6) and print none of the third-party
deprecation noise that noise.py silences.

The ranks are started directly, as srun starts them, so each rank's own exit code is seen.
"""


import pytest
from launching import OUTSIDE_STOP, start_ranks

from dsunlearn.runtime.distributed import EXIT_OK, EXIT_PREEMPTED

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

RUNS = 3  # the abort was seen about once in 25 runs: a cheap loop in CI, run more by hand (the issue note says how many)
HANG_LIMIT_S = 300  # only stops a hung run; nothing is timed


def run_two_ranks(args, log_dir):
    """Start ranks 0 and 1 of one run; return ({rank: exit code}, their output)."""
    processes, logs = start_ranks(args, log_dir)
    try:
        codes = {rank: process.wait(timeout=HANG_LIMIT_S) for rank, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes, "".join(log.read_text() for log in logs)


@pytest.fixture(scope="module")
def short_runs(tiny_model_dir, tmp_path_factory):
    """[(exit codes, output)] of RUNS runs of one step each, without export or evaluation."""
    runs = []
    for i in range(RUNS):
        run_dir = tmp_path_factory.mktemp(f"short_run{i}")
        args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir",
                str(run_dir / "out"), "--train.max_steps", "1", "--output.export", "false",
                "--output.evaluate", "false"]
        runs.append(run_two_ranks(args, run_dir))
    return runs


def test_every_short_run_ends_cleanly(short_runs):
    for codes, output in short_runs:
        # A stop from outside (launching.OUTSIDE_STOP) is an exit path too: every rank 75, and no abort either.
        stopped_from_outside = codes == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED} and OUTSIDE_STOP in output
        assert codes == {0: EXIT_OK, 1: EXIT_OK} or stopped_from_outside, output[-4000:]
        assert "terminate called" not in output, output[-4000:]


def test_deepspeed_collective_deprecations_are_silent(short_runs):
    """DeepSpeed's ZeRO-3 calls torch's deprecated all-gather / reduce-scatter names; each rank printed a
    FutureWarning about them (noise.KNOWN_NOISE)."""
    for _, output in short_runs:
        assert "all_gather_into_tensor` is deprecated" not in output, output[-4000:]
        assert "reduce_scatter_tensor` is deprecated" not in output, output[-4000:]
