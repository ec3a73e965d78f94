"""Checkpoints that are never lost: each fault is made for real (truncated files, SIGKILL, a full filesystem) and the
resumed run is compared with an uninterrupted one."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import REPO, finish_if_stopped_from_outside, free_port, launch
from warm_start import popen_python

from dsunlearn.runtime import checkpoints
from dsunlearn.runtime.checkpoints import MARKER_NAME, RunShape, choose_resume_checkpoint, step_tag

COMPARED = ("forget_ce", "random_ce", "normal_kl", "total", "lr")


def run_args(model_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", "4", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "0",
            "--output.export", "false", "--output.evaluate", "false", *extra]


def train_one_process(args, timeout=300, **env_vars):
    """``python -m dsunlearn train`` as a world of one; returns (returncode, output). A run stopped from outside is
    resumed (launching.finish_if_stopped_from_outside)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_vars)

    def run(run_args):
        process = popen_python(["-m", "dsunlearn", "train", *run_args], env)
        try:
            output = process.communicate(timeout=timeout)[0]
        finally:
            process.kill()
        return process.returncode, output

    return finish_if_stopped_from_outside(run, args)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(rows, expected):
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, want in zip(rows, expected):
        for key in COMPARED:
            assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (row["step"], key)


def tear(step_dir: Path):
    """What a kill in the middle of a save leaves: no marker and a half-written shard."""
    (step_dir / MARKER_NAME).unlink()
    shard = next(step_dir.glob("*optim_states.pt"))
    os.truncate(shard, shard.stat().st_size // 2)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted one-process run of 4 steps with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, output = train_one_process(run_args(tiny_model_dir, run_dir))
    assert code == 0, output[-4000:]
    return run_dir


@pytest.fixture
def copied_run(reference_run, tmp_path):
    """A copy of the reference run to damage."""
    return Path(shutil.copytree(reference_run, tmp_path / "run"))


# ---- units: the atomic writer, the chooser, the settings check, metrics.jsonl ----


def test_atomic_write_survives_sigkill_at_any_moment(tmp_path):
    target = tmp_path / "latest"
    size = 4 * 2**20
    writer = (
        "import sys; from pathlib import Path; from dsunlearn.runtime.checkpoints import atomic_write_text\n"
        f"atomic_write_text(Path(sys.argv[1]), 'a' * {size}); print('writing', flush=True)\n"
        f"i = 1\nwhile True:\n    atomic_write_text(Path(sys.argv[1]), 'ab'[i % 2] * {size}); i += 1\n"
    )
    for delay in (0.05, 0.13, 0.31):
        process = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "writing\n"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        text = target.read_text()
        assert text in ("a" * size, "b" * size)


def write_checkpoint_folder(checkpoint_dir: Path, step: int, complete: bool = True):
    folder = checkpoint_dir / step_tag(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        shape = RunShape(world_size=2, gradient_accumulation_steps=1, forget_batch_size=2, normal_batch_size=2,
                         fingerprint={"train.lr": 1e-3})
        (folder / MARKER_NAME).write_text(json.dumps({"step": step, **dataclasses.asdict(shape)}))


@pytest.mark.parametrize(
    "latest, expected_step, why",
    [
        (None, 4, "latest is missing: resuming from step_00000004"),
        ("", 4, "latest is empty: resuming from step_00000004"),
        ("step_00000004", 4, "resuming from step_00000004 (named in"),
        ("step_00000006", 4, "names step_00000006, which is incomplete: resuming from step_00000004"),
        ("step_00000009", 4, "names step_00000009, which does not exist: resuming from step_00000004"),
        ("step_00000002", 4, "names step_00000002, but a newer checkpoint is complete: resuming from step_00000004"),
        ("\x00\x00\x00", 4, "which is not a checkpoint tag: resuming from step_00000004"),
    ],
)
def test_resume_takes_the_newest_complete_checkpoint_and_says_why(tmp_path, latest, expected_step, why):
    for step, complete in ((2, True), (4, True), (6, False)):
        write_checkpoint_folder(tmp_path, step, complete)
    (tmp_path / "step_00000008").mkdir()  # a save killed before DeepSpeed wrote anything
    (tmp_path / "step_00000010").mkdir()
    (tmp_path / "step_00000010" / MARKER_NAME).write_text('{"step": 10, "world_')  # a torn marker
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    checkpoint, message = choose_resume_checkpoint(tmp_path)
    assert checkpoint.step == expected_step and checkpoint.tag == step_tag(expected_step)
    assert checkpoint.shape.world_size == 2
    assert why in message


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    write_checkpoint_folder(tmp_path, 3, complete=False)
    (tmp_path / "latest").write_text("step_00000003")
    checkpoint, message = choose_resume_checkpoint(tmp_path)
    assert checkpoint is None
    assert "which is incomplete: no complete checkpoint: starting from step 0" in message


def test_settings_check_allows_another_split_of_the_same_global_batch():
    # train.max_steps: a checkpoint written before it could change on resume still records it; it is not compared.
    saved = RunShape(world_size=2, gradient_accumulation_steps=1, forget_batch_size=2, normal_batch_size=4,
                     fingerprint={"train.lr": 1e-3, "train.max_steps": 10})
    resplit = dataclasses.replace(saved, world_size=1, gradient_accumulation_steps=4, forget_batch_size=1,
                                  normal_batch_size=2, fingerprint={"train.lr": 1e-3})
    assert resplit.differences(saved) == []
    other = dataclasses.replace(saved, forget_batch_size=1, fingerprint={"train.lr": 1e-4})
    found = other.differences(saved)
    assert len(found) == 2
    assert found[0] == "train.lr: the checkpoint has 0.001, this run 0.0001"
    assert found[1].startswith("global forget batch") and "has 4 (2 x 1 x 2), this run 2 (1 x 1 x 2)" in found[1]


def test_a_checkpoint_from_before_the_objective_slots_resumes_as_yao_only():
    """A checkpoint written before objective.forget_loss/retain_loss existed was a ga + kl run: resumed as such, and
    refused as npo, naming the setting."""
    from dsunlearn.settings.config import ObjectiveConfig, RunConfig, TrainConfig

    def shape(objective):
        cfg = RunConfig(objective=objective, train=TrainConfig(deepspeed_config="ds_configs/zero3.json"))
        return RunShape.of(cfg, {}, world_size=1)

    yao = shape(ObjectiveConfig())
    old = dataclasses.replace(yao, fingerprint={name: value for name, value in yao.fingerprint.items()
                                                if name not in checkpoints.ADDED_SETTINGS})
    assert yao.differences(old) == []
    npo = shape(ObjectiveConfig(forget_loss="npo"))
    assert npo.differences(old) == ["objective.forget_loss: the checkpoint has 'ga', this run 'npo'"]


def test_fingerprint_leaves_out_what_may_change_on_resume():
    from dsunlearn.settings.config import RunConfig, TrainConfig

    template = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "overlap_comm": True},
                "fp16": {"initial_scale_power": 16}, "steps_per_print": 10}
    base = checkpoints.fingerprint(RunConfig(train=TrainConfig(deepspeed_config="ds_configs/zero3.json")), template)
    assert base["deepspeed_config:zero_optimization.stage"] == 3
    assert base["deepspeed_config:fp16.initial_scale_power"] == 16
    assert not any(name.startswith(("output.", "train.checkpoint_every", "train.forget_batch_size")) for name in base)
    assert "deepspeed_config:zero_optimization.reduce_bucket_size" not in base
    assert {"train.lr", "train.lr_schedule", "train.warmup_steps", "model.name_or_path", "data.seed"} <= set(base)
    assert "train.max_steps" not in base  # may grow on resume (test_resume_may_raise_max_steps_...)


def test_metrics_log_drops_a_torn_line_and_the_replayed_steps(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": step, "total": 0.5}) for step in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "tot')
    log = checkpoints.MetricsLog(path, start_step=2)
    log.append({"step": 3, "total": 0.25})
    log.close()
    assert path.read_text().splitlines() == rows[:2] + ['{"step": 3, "total": 0.25}']
    assert "line 4 is torn" in caplog.text


# ---- whole runs ----


@pytest.fixture(scope="module")
def resumed_after_a_torn_save(reference_run, tiny_model_dir, tmp_path_factory):
    """A kill during the step-4 save: a torn step folder, `latest` truncated to 0 bytes, a torn last metrics row; and a
    torn later folder (step 9) beside them. Resumed with a checkpoint every step, keeping one: the run saves step 3,
    then step 4 over the torn folder, and rotates after each. Returns (run folder, exit code, output)."""
    run_dir = Path(shutil.copytree(reference_run, tmp_path_factory.mktemp("torn_save") / "run"))
    checkpoint_dir = run_dir / "checkpoints"
    tear(checkpoint_dir / "step_00000004")
    shutil.copytree(checkpoint_dir / "step_00000004", checkpoint_dir / "step_00000009")
    os.truncate(checkpoint_dir / "latest", 0)
    metrics = run_dir / "metrics.jsonl"
    os.truncate(metrics, metrics.stat().st_size - 20)
    code, output = train_one_process(
        run_args(tiny_model_dir, run_dir, "--resume", "true", "--train.checkpoint_every", "1",
                 "--train.keep_checkpoints", "1")
    )
    return run_dir, code, output


@pytest.mark.integration
def test_resume_when_latest_is_empty_and_the_last_metrics_line_torn(reference_run, resumed_after_a_torn_save):
    run_dir, code, output = resumed_after_a_torn_save
    assert code == 0, output[-4000:]
    assert "latest is empty: resuming from step_00000002" in output
    assert "metrics.jsonl line 4 is torn" in output
    assert "resumed from" in output and "at step 2" in output
    assert_same_metrics(read_metrics(run_dir), read_metrics(reference_run))
    assert checkpoints.read_marker(run_dir / "checkpoints" / "step_00000004").step == 4  # saved again, complete


@pytest.mark.integration
def test_rotation_keeps_the_checkpoint_just_written_beside_a_torn_later_folder(resumed_after_a_torn_save):
    """The issue's loss: rotation kept the highest-numbered folder (a torn one) and deleted the one just written."""
    run_dir, code, output = resumed_after_a_torn_save
    assert code == 0, output[-4000:]
    checkpoint_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.glob("step_*")) == ["step_00000004", "step_00000009"]
    assert [c.step for c in checkpoints.complete_checkpoints(checkpoint_dir)] == [4]
    assert (checkpoint_dir / "latest").read_text().strip() == "step_00000004"


@pytest.fixture(scope="module")
def requeued_run(reference_run, tiny_model_dir, tmp_path_factory):
    """A SLURM job preempted after the step-2 checkpoint (step 4's folder gone, `latest` still naming it), started
    again in its allocation (SLURM_RESTART_COUNT 0), then requeued (1) with the same command line: no --resume.
    Returns (run folder, (code, output) of the start in the allocation, (code, output) of the requeued start)."""
    run_dir = Path(shutil.copytree(reference_run, tmp_path_factory.mktemp("requeued") / "run"))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "slurm_job_id").write_text("4242\n")  # as the job's first start recorded it
    same_allocation = train_one_process(run_args(tiny_model_dir, run_dir), SLURM_JOB_ID="4242",
                                        SLURM_RESTART_COUNT="0")
    requeued = train_one_process(run_args(tiny_model_dir, run_dir), SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    return run_dir, same_allocation, requeued


@pytest.mark.integration
def test_resume_when_latest_names_a_missing_folder(reference_run, requeued_run):
    run_dir, _, (code, output) = requeued_run
    assert code == 0, output[-4000:]
    assert "names step_00000004, which does not exist: resuming from step_00000002" in output
    assert_same_metrics(read_metrics(run_dir), read_metrics(reference_run))


@pytest.mark.distributed
@pytest.mark.integration
def test_a_folder_holding_a_run_is_refused_on_every_rank(copied_run, tiny_model_dir):
    before = {name: (copied_run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    code, output = launch(run_args(tiny_model_dir, copied_run, "--train.lr", "1e-3"), timeout=240)
    assert code == 2, output[-4000:]
    assert "holds a run (config.yaml, metrics.jsonl, checkpoints)" in output
    assert "--overwrite true" in output
    assert {name: (copied_run / name).read_bytes() for name in before} == before


@pytest.mark.integration
def test_overwrite_replaces_the_old_run(reference_run, copied_run, tiny_model_dir):
    (copied_run / "final").mkdir()
    (copied_run / "final" / "model.safetensors").write_bytes(b"old model")
    shutil.copytree(copied_run / "checkpoints" / "step_00000004", copied_run / "checkpoints" / "step_00000099")
    code, output = train_one_process(run_args(tiny_model_dir, copied_run, "--overwrite", "true"))
    assert code == 0, output[-4000:]
    assert not (copied_run / "final").exists()
    assert sorted(p.name for p in (copied_run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert_same_metrics(read_metrics(copied_run), read_metrics(reference_run))


@pytest.mark.integration
def test_resume_may_raise_max_steps_and_the_schedule_then_ends_at_the_new_max(reference_run, copied_run,
                                                                                tiny_model_dir):
    """A run that ended at its max_steps (4) continues to 6: the linear decay's end follows the new max_steps from the
    resumed step on (README: "Resuming"), so step 5 runs at 2/6 of the peak, not at the old schedule's final 0."""
    code, output = train_one_process(run_args(tiny_model_dir, copied_run, "--resume", "true", "--train.max_steps", "6"))
    assert code == 0, output[-4000:]
    rows = read_metrics(copied_run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert_same_metrics(rows[:4], read_metrics(reference_run))
    peak = 3e-4  # configs/demo.yaml
    assert [row["lr"] for row in rows[4:]] == pytest.approx([peak * 2 / 6, peak * 1 / 6], rel=1e-6)


@pytest.mark.integration
def test_resume_with_another_model_or_other_settings_is_refused_naming_each(copied_run, tiny_model_dir, tmp_path):
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "other_model")
    config_before = (copied_run / "config.yaml").read_bytes()
    code, output = train_one_process(
        run_args(other_model, copied_run, "--resume", "true", "--train.lr", "1e-3", "--train.max_steps", "3",
                 "--train.normal_batch_size", "2", "--train.checkpoint_every", "3", "--train.log_every", "2")
    )
    assert code == 2, output[-4000:]
    assert "step_00000004 was written with other settings" in output
    assert f"model.name_or_path: the checkpoint has '{tiny_model_dir}', this run '{other_model}'" in output
    assert "train.lr: the checkpoint has 0.0003, this run 0.001" in output
    assert "train.max_steps: this run has 3, fewer than the 4 steps the checkpoint has trained" in output
    assert "global normal batch" in output and "has 4 (4 x 1 x 1), this run 2 (2 x 1 x 1)" in output
    assert "checkpoint_every" not in output and "log_every" not in output  # free to change
    assert (copied_run / "config.yaml").read_bytes() == config_before


@pytest.mark.integration
def test_a_requeued_slurm_job_resumes_its_own_run(reference_run, requeued_run):
    """SLURM requeues a job with its id unchanged and SLURM_RESTART_COUNT raised; the same command line is run."""
    run_dir, (same_allocation_code, same_allocation_output), (code, output) = requeued_run
    # A second run inside the same allocation is no requeue.
    assert same_allocation_code == 2 and "holds a run" in same_allocation_output
    assert code == 0, output[-4000:]
    assert "SLURM job 4242 was requeued (restart 1) into the folder it owns: resuming" in output
    assert_same_metrics(read_metrics(run_dir), read_metrics(reference_run))
    assert checkpoints.read_marker(run_dir / "checkpoints" / "step_00000004").shape.slurm_job_id == "4242"


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 1.4 MB tmpfs: the tiny model's first checkpoint (about 0.85 MB) fits, the second does not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.integration
def test_disk_full_names_the_cause_and_keeps_the_earlier_checkpoint(reference_run, small_filesystem, tmp_path,
                                                                     tiny_model_dir):
    run_dir = small_filesystem / "run"
    code, output = train_one_process(run_args(tiny_model_dir, run_dir, "--train.checkpoint_every", "1"))
    assert code != 0
    assert "CheckpointWriteError: could not write" in output
    assert f"No space left on device: the filesystem of {run_dir / 'checkpoints'} has " in output
    checkpoint_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.glob("step_*")) == ["step_00000001"]  # the torn one is gone
    assert checkpoints.read_marker(checkpoint_dir / "step_00000001").step == 1
    # The earlier checkpoint is intact: with room again, the run resumes from it and matches the uninterrupted one.
    moved = Path(shutil.copytree(run_dir, tmp_path / "moved"))
    code, output = train_one_process(run_args(tiny_model_dir, moved, "--resume", "true"))
    assert code == 0, output[-4000:]
    assert "resuming from step_00000001" in output
    assert_same_metrics(read_metrics(moved), read_metrics(reference_run))


def save_in_progress(step_dir: Path) -> bool:
    """DeepSpeed has begun writing into ``step_dir`` and the marker is not there yet."""
    try:
        return not (step_dir / MARKER_NAME).exists() and any(step_dir.iterdir())
    except FileNotFoundError:  # cleared or rotated away while we looked
        return False


@pytest.mark.distributed
@pytest.mark.integration
def test_sigkill_of_the_whole_run_during_a_save_then_resume(tiny_model_dir, straight_run, tmp_path):
    """SIGKILL to the launcher's process group while a step folder has files but no marker; the resumed run
    finishes with the metrics of an uninterrupted one (conftest's straight_run: the same 6 steps)."""
    steps = ["--train.max_steps", "6", "--train.checkpoint_every", "1"]

    run_dir = tmp_path / "killed"
    checkpoint_dir = run_dir / "checkpoints"
    deepspeed_bin = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=f"{deepspeed_bin.parent}:{os.environ['PATH']}")
    command = [str(deepspeed_bin), "--num_gpus", "2", "--master_port", str(free_port()), "dsunlearn/train.py",
               *run_args(tiny_model_dir, run_dir, *steps)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before a save could be interrupted"
            if any(save_in_progress(folder) for folder in checkpoint_dir.glob("step_*") if folder.name >= step_tag(2)):
                break
        else:
            pytest.fail("no save in progress was seen")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

    code, output = launch(run_args(tiny_model_dir, run_dir, *steps, "--resume", "true"))
    assert code == 0, output[-4000:]
    assert "resumed from" in output
    assert_same_metrics(read_metrics(run_dir), read_metrics(straight_run))
    assert [c.step for c in checkpoints.complete_checkpoints(checkpoint_dir)] == list(range(1, 7))
