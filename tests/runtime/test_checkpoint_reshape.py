"""Resume a ZeRO-3 checkpoint on another number of ranks (2 -> 1 in fp32, 1 -> 2 in bf16), same global batch.

Each saving run trains 4 steps with a checkpoint at step 2 and 4 and is the uninterrupted reference; a copy of it,
cut back to step 2, is loaded on the other world size.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from launching import free_port, launch
from warm_start import popen_python

from dsunlearn.runtime.checkpoint_reshape import UNIVERSAL_SUBDIR, saved_world_size

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

GLOBAL_MICRO_BATCHES = 2  # ranks x gradient accumulation steps, the same on every topology here
STEP_2 = "step_00000002"
ADAM_STATES = ("fp32", "exp_avg", "exp_avg_sq")
# (saved ranks, resumed ranks, precision): each direction in one precision keeps the number of runs down.
RESHAPES = [(2, 1, "fp32"), (1, 2, "bf16")]


def run_args(model_dir, out_dir, ranks, precision, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--model.precision", precision, "--train.max_steps", "4", "--train.checkpoint_every", "2",
            "--train.keep_checkpoints", "0", "--train.gradient_accumulation_steps", str(GLOBAL_MICRO_BATCHES // ranks),
            "--output.evaluate", "false", "--output.export", "false", *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, tmp_path_factory):
    """(ranks, precision) -> the folder of an uninterrupted 4-step run, made on first use."""
    runs = {}

    def run(ranks, precision):
        if (ranks, precision) not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight_{ranks}_ranks_{precision}")
            code, output = launch(run_args(tiny_model_dir, run_dir, ranks, precision), nproc=ranks)
            assert code == 0, output[-4000:]
            runs[ranks, precision] = run_dir
        return runs[ranks, precision]

    return run


@pytest.fixture(scope="module")
def resharded_loads(straight_runs, tiny_model_dir, tmp_path_factory):
    """(saved ranks, resumed ranks, precision) -> (run folder, what the loading ranks held): the step-2 checkpoint of a
    straight run loaded on the other world size, made on first use. The step folder also holds the temporary folder
    a conversion killed mid-way leaves behind."""
    loads = {}

    def load(saved_ranks, resumed_ranks, precision):
        key = saved_ranks, resumed_ranks, precision
        if key not in loads:
            work_dir = tmp_path_factory.mktemp(f"load_{saved_ranks}_to_{resumed_ranks}_{precision}")
            run_dir = cut_back_to_step_2(straight_runs(saved_ranks, precision), work_dir / "run")
            killed_conversion = run_dir / "checkpoints" / STEP_2 / f"{UNIVERSAL_SUBDIR}.partial" / "zero"
            killed_conversion.mkdir(parents=True)
            (killed_conversion / "optimizer_state.pt").write_bytes(b"torn")
            loads[key] = run_dir, load_on(resumed_ranks, precision, tiny_model_dir, run_dir, work_dir / "loaded.pt")
        return loads[key]

    return load


def cut_back_to_step_2(run_dir, destination):
    """A copy of ``run_dir`` as a crash after step 2 leaves it: the step-4 checkpoint and later metrics gone."""
    shutil.copytree(run_dir, destination)
    checkpoints = destination / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text(STEP_2)
    return destination


def run_load_workers(ranks, precision, model_dir, run_dir, out_file, timeout=300):
    """Load the step-2 checkpoint of ``run_dir`` on ``ranks`` ranks (tests/runtime/workers/reshape_load.py); return each
    rank's exit code and output."""
    worker = Path(__file__).parent / "workers" / "reshape_load.py"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks))
    command = [str(worker), str(out_file), STEP_2, *run_args(model_dir, run_dir, ranks, precision)]
    processes = [popen_python(command, dict(env, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(ranks)]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    return [process.returncode for process in processes], outputs


def load_on(ranks, precision, model_dir, run_dir, out_file):
    """What rank 0 recorded after loading the step-2 checkpoint of ``run_dir`` on ``ranks`` ranks."""
    codes, outputs = run_load_workers(ranks, precision, model_dir, run_dir, out_file)
    assert codes == [0] * ranks, "\n".join(outputs)[-4000:]
    return torch.load(out_file, weights_only=False)


def states_from_shards(step_dir):
    """{parameter name: {fp32, exp_avg, exp_avg_sq: full tensor}} read straight from the per-rank ZeRO-3 shards: rank
    R holds elements [R*p, (R+1)*p) of each parameter, p = ceil(numel / ranks), the last rank's slice zero-padded."""
    ranks = saved_world_size(step_dir)
    shards = [torch.load(optim_shard(step_dir, rank), weights_only=False)["optimizer_state_dict"] for rank in range(ranks)]
    param_shapes = torch.load(step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
    states = {}
    for group, shapes in enumerate(param_shapes):
        flat = [{"fp32": shard["fp32_flat_groups"][group], **shard["optimizer_state_dict"]["state"][group]}
                for shard in shards]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / ranks)
            # ranks x [per_rank] -> [ranks * per_rank] -> [numel] -> the parameter's shape
            states[name] = {key: torch.cat([rank_flat[key][offset:offset + per_rank] for rank_flat in flat])[:numel]
                            .reshape(shape) for key in ADAM_STATES}
            offset += per_rank
    return states


def optim_shard(step_dir, rank):
    """Rank ``rank``'s optimizer shard (DeepSpeed prefixes it with ``bf16_`` in bf16 runs)."""
    (path,) = step_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return path


@pytest.mark.parametrize("saved_ranks, resumed_ranks, precision", RESHAPES)
def test_load_on_another_world_size_restores_master_weights_and_adam_states(
    saved_ranks, resumed_ranks, precision, resharded_loads
):
    run_dir, loaded = resharded_loads(saved_ranks, resumed_ranks, precision)
    step_dir = run_dir / "checkpoints" / STEP_2
    assert saved_world_size(step_dir) == saved_ranks

    assert loaded["world_size"] == resumed_ranks
    expected = states_from_shards(step_dir)
    assert sorted(loaded["states"]) == sorted(expected)
    for name, states in expected.items():
        for key in ADAM_STATES:
            torch.testing.assert_close(loaded["states"][name][key], states[key], rtol=0, atol=0, msg=f"{name} {key}")
    assert loaded["adam_steps"] == [2.0]
    assert loaded["lr_scheduler"]["last_epoch"] == 2
    assert loaded["lr"] == read_metrics(run_dir)[2]["lr"]  # the uninterrupted run's lr of step 3
    assert loaded["client_state"]["step"] == 2
    assert (step_dir / UNIVERSAL_SUBDIR).is_dir()
    assert not any(path.name.endswith(".partial") for path in step_dir.iterdir())


def test_a_second_resume_reuses_the_conversion(resharded_loads, tiny_model_dir, tmp_path):
    run_dir, first = resharded_loads(2, 1, "fp32")
    universal = run_dir / "checkpoints" / STEP_2 / UNIVERSAL_SUBDIR
    written = {path: path.stat().st_mtime_ns for path in universal.rglob("*.pt")}
    assert written

    second = load_on(1, "fp32", tiny_model_dir, run_dir, tmp_path / "second.pt")

    assert {path: path.stat().st_mtime_ns for path in universal.rglob("*.pt")} == written
    for name, states in first["states"].items():
        for key in ADAM_STATES:
            assert torch.equal(second["states"][name][key], states[key]), (name, key)


def test_a_step_folder_missing_a_shard_is_refused(straight_runs, tmp_path):
    run_dir = cut_back_to_step_2(straight_runs(2, "fp32"), tmp_path / "run")
    step_dir = run_dir / "checkpoints" / STEP_2
    optim_shard(step_dir, 1).unlink()
    with pytest.raises(RuntimeError, match="written by 2 ranks but holds optimizer shards of ranks \\[0\\]"):
        saved_world_size(step_dir)


def test_a_conversion_that_fails_on_rank_0_ends_every_rank(straight_runs, tiny_model_dir, tmp_path):
    run_dir = cut_back_to_step_2(straight_runs(1, "bf16"), tmp_path / "run")
    step_dir = run_dir / "checkpoints" / STEP_2
    shard = optim_shard(step_dir, 0)
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    codes, outputs = run_load_workers(2, "bf16", tiny_model_dir, run_dir, tmp_path / "loaded.pt")

    assert all(code != 0 for code in codes), codes
    for output in outputs:
        assert f"converting {step_dir} to a universal checkpoint failed" in output, output[-4000:]
    assert not (step_dir / UNIVERSAL_SUBDIR).exists()


@pytest.mark.parametrize("saved_ranks, resumed_ranks, precision", RESHAPES)
def test_resume_on_another_world_size_continues_the_uninterrupted_run(
    saved_ranks, resumed_ranks, precision, straight_runs, tiny_model_dir, tmp_path
):
    straight_dir = straight_runs(saved_ranks, precision)
    run_dir = cut_back_to_step_2(straight_dir, tmp_path / "run")

    code, output = launch(
        run_args(tiny_model_dir, run_dir, resumed_ranks, precision, "--resume", "true"), nproc=resumed_ranks
    )

    assert code == 0, output[-4000:]
    assert "resumed from" in output and "to a universal checkpoint" in output
    straight, resumed = read_metrics(straight_dir), read_metrics(run_dir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for before, after in zip(straight[2:], resumed[2:]):
        for key in ("forget_ce", "random_ce", "normal_kl", "normal_ce", "total", "lr", "grad_norm"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), (after["step"], key)
