"""The run folder's durable state: DeepSpeed checkpoints that are never lost, metrics.jsonl, the folder guard.

    output.dir/
      config.yaml         the settings, written once the folder guard has passed
      slurm_job_id        the SLURM job that owns the folder (a requeued job keeps its id and resumes by itself)
      metrics.jsonl       one JSON row per optimizer step, appended and flushed per step
      checkpoints/
        latest            the tag of the newest complete checkpoint (our file, replaced atomically)
        step_00000008/    DeepSpeed's per-rank files, then complete.json once every rank has written its part

A checkpoint counts only when its folder holds ``complete.json`` (DESIGN §6a): the marker is written by rank 0
after every rank has written and fsynced its files, so a kill at any moment leaves either a complete checkpoint or
a folder without a marker, which resume skips and the next save of that step clears. Resume takes the newest
complete checkpoint whatever ``latest`` says; rotation removes only complete checkpoints older than the one just
written.

Every decision that all ranks must share (is the folder free, which checkpoint to resume from, did the marker get
written) is taken on rank 0 and broadcast, so ranks never disagree about what they read from a shared filesystem.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from dsunlearn.runtime import checkpoint_reshape
from dsunlearn.settings.config import CHANGEABLE_ON_RESUME, ConfigError, RunConfig
from dsunlearn.settings.strict_json import to_json

logger = logging.getLogger("dsunlearn.runtime.checkpoints")

CHECKPOINT_PREFIX = "step_"
TAG_PATTERN = re.compile(rf"{CHECKPOINT_PREFIX}\d+")
MARKER_NAME = "complete.json"
LATEST_NAME = "latest"
SLURM_JOB_FILE = "slurm_job_id"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "eval_during.jsonl", "best_step.json",
             "final_best", "tensorboard")
"""What makes a folder hold a run: the guard refuses it, ``--overwrite`` removes these."""

# Numeric DeepSpeed knobs that trade memory for speed and never change the numbers: free to change on resume.
_DS_MEMORY_KNOBS = frozenset({
    "steps_per_print", "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "sub_group_size", "buffer_count", "buffer_size", "max_in_cpu",
})
# Below this many free bytes a failed write is reported as a full filesystem (torch.save's own message is only
# "basic_ios::clear: iostream error"): no checkpoint shard of a model worth unlearning fits in less.
_NEARLY_FULL_BYTES = 16 * 2**20


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the cause. Earlier checkpoints are intact."""


# ---- atomic files ----


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` so that a crash at any moment leaves the old or the new content,
    never a torn mix: a temporary file beside it, fsynced, renamed over it, then the folder fsynced."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (DeepSpeed closes its files without syncing them)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


# ---- what a checkpoint records about the run that wrote it ----

# Settings added after checkpoints were first written, with the value that such an older checkpoint's run had: its
# fingerprint lacks them, and a run resuming it with that value continues the same objective.
ADDED_SETTINGS = {
    "objective.forget_loss": "ga", "objective.retain_loss": "kl", "objective.npo_beta": 0.1,
    "objective.simnpo_beta": 4.5, "objective.simnpo_delta": 0.0,
}


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a completion marker records besides the step: the run's topology and the settings resume must match."""

    world_size: int
    gradient_accumulation_steps: int
    forget_batch_size: int
    normal_batch_size: int
    fingerprint: dict[str, Any]
    """Dotted setting name -> value, for every setting that shapes the training trajectory (see ``fingerprint``)."""
    slurm_job_id: Optional[str] = None

    @classmethod
    def of(cls, cfg: RunConfig, ds_template: dict, world_size: int) -> "RunShape":
        return cls(
            world_size=world_size,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            forget_batch_size=cfg.train.forget_batch_size,
            normal_batch_size=cfg.train.normal_batch_size,
            fingerprint=fingerprint(cfg, ds_template),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        )

    def global_batches(self) -> tuple[int, int]:
        """(forget, normal) examples per optimizer step over all ranks and micro-steps."""
        per_step = self.gradient_accumulation_steps * self.world_size
        return self.forget_batch_size * per_step, self.normal_batch_size * per_step

    def differences(self, saved: "RunShape") -> list[str]:
        """Why a checkpoint written by a run of shape ``saved`` cannot continue as this run: one line per setting."""
        found = []
        for name in sorted(name for name in set(self.fingerprint) | set(saved.fingerprint) if _fixed_on_resume(name)):
            before = saved.fingerprint.get(name, ADDED_SETTINGS.get(name, "<absent>"))
            now = self.fingerprint.get(name, "<absent>")
            if before != now:
                found.append(f"{name}: the checkpoint has {before!r}, this run {now!r}")
        for term, before, now in zip(("forget", "normal"), saved.global_batches(), self.global_batches()):
            if before != now:
                found.append(
                    f"global {term} batch (train.{term}_batch_size x train.gradient_accumulation_steps x ranks): the "
                    f"checkpoint has {before} ({getattr(saved, f'{term}_batch_size')} x "
                    f"{saved.gradient_accumulation_steps} x {saved.world_size}), this run {now} "
                    f"({getattr(self, f'{term}_batch_size')} x {self.gradient_accumulation_steps} x {self.world_size})"
                )
        return found


def fingerprint(cfg: RunConfig, ds_template: dict) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint, as dotted name -> JSON value.

    Every field of ``cfg`` except those in ``config.CHANGEABLE_ON_RESUME`` (per-rank batch sizes and accumulation are
    compared through the global batch instead), and every numeric leaf of the DeepSpeed JSON except the memory knobs
    (its other fields are switches, or "auto" and filled from ``cfg``).
    """
    settings = _flatten(json.loads(json.dumps(dataclasses.asdict(cfg))))
    kept = {name: value for name, value in settings.items() if _fixed_on_resume(name)}
    for name, value in _flatten(ds_template).items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and name.rsplit(".", 1)[-1] not in _DS_MEMORY_KNOBS:
            kept[f"deepspeed_config:{name}"] = value
    return kept


def _fixed_on_resume(name: str) -> bool:
    """Whether the setting ``name`` must equal the checkpoint's (a checkpoint written when it had to, e.g.
    ``train.max_steps`` before it could grow, still records it: it is not compared either)."""
    return not any(name == free or name.startswith(free + ".") for free in CHANGEABLE_ON_RESUME)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder's tag and what its marker recorded."""

    tag: str
    step: int
    shape: RunShape
    done: Optional[dict] = None
    """Set when unlearning was done at this step (``objective.stop_forget_ce``; guards.StepGuards.done_record): a
    resume goes straight to the outputs."""


def step_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def read_marker(step_dir: Path) -> Optional[Checkpoint]:
    """The checkpoint in ``step_dir`` if its completion marker is there and sound, else None (torn or foreign)."""
    try:
        record = json.loads((step_dir / MARKER_NAME).read_text())
        step = int(record.pop("step"))
        done = record.pop("done", None)
        shape = RunShape(**record)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if step_dir.name != step_tag(step) or not isinstance(done, (dict, type(None))):
        return None
    return Checkpoint(step_dir.name, step, shape, done)


def complete_checkpoints(checkpoint_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints in ``checkpoint_dir``, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [read_marker(folder) for folder in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if folder.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def choose_resume_checkpoint(checkpoint_dir: Path) -> tuple[Optional[Checkpoint], str]:
    """The newest complete checkpoint (None if there is none) and a sentence saying which and why.

    ``latest`` is only a hint for people and tools: a kill can leave it naming a torn or removed folder, or an
    older checkpoint than the newest complete one (a kill between the marker and ``latest``).
    """
    complete = complete_checkpoints(checkpoint_dir)
    newest = complete[-1] if complete else None
    target = f"resuming from {newest.tag}" if newest else "no complete checkpoint: starting from step 0"
    latest_path = checkpoint_dir / LATEST_NAME
    try:
        named = latest_path.read_bytes().decode(errors="replace").strip()
    except FileNotFoundError:
        return newest, f"{latest_path} is missing: {target}"
    if newest is not None and named == newest.tag:
        return newest, f"resuming from {newest.tag} (named in {latest_path})"
    if not named:
        why = f"{latest_path} is empty"
    elif not TAG_PATTERN.fullmatch(named):
        why = f"{latest_path} holds {named[:40]!r}, which is not a checkpoint tag"
    elif not (checkpoint_dir / named).is_dir():
        why = f"{latest_path} names {named}, which does not exist"
    elif read_marker(checkpoint_dir / named) is None:
        why = f"{latest_path} names {named}, which is incomplete"
    else:
        why = f"{latest_path} names {named}, but a newer checkpoint is complete"
    return newest, f"{why}: {target}"


# ---- saving ----


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, keep: int, shape: RunShape,
                    done: Optional[dict] = None) -> Path:
    """Save a complete checkpoint of ``step`` (call on every rank) and return its folder; ``done``: unlearning ended
    at this step (recorded in the marker, ``Checkpoint.done``).

    Every rank writes and fsyncs its DeepSpeed files; after a barrier rank 0 writes the completion marker, then
    ``latest``, then removes the complete checkpoints older than this one beyond ``keep`` (0: keep all). A write
    error raises ``CheckpointWriteError`` naming the path and the cause (a full filesystem and its free bytes), with
    the torn folder removed and the earlier checkpoints untouched.
    """
    rank = torch.distributed.get_rank()
    tag = step_tag(step)
    step_dir = checkpoint_dir / tag
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # A folder of this tag is the remains of a save killed before its marker: DeepSpeed would write beside its
        # stale files, so it goes first.
        if step_dir.exists():
            _remove_checkpoint(step_dir)
    torch.distributed.barrier()
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        fsync_tree(step_dir)
        fsync_dir(checkpoint_dir)
    except Exception as err:
        message = _write_failure(step_dir, err)  # before the removal, which frees the space it measures
        shutil.rmtree(step_dir, ignore_errors=True)
        raise CheckpointWriteError(message) from err
    torch.distributed.barrier()
    failure = None
    if rank == 0:
        try:
            record = {"step": step, **dataclasses.asdict(shape), **({"done": done} if done is not None else {})}
            atomic_write_text(step_dir / MARKER_NAME, json.dumps(record))
        except OSError as err:
            failure = _write_failure(step_dir, err)
            shutil.rmtree(step_dir, ignore_errors=True)
        else:
            try:
                atomic_write_text(checkpoint_dir / LATEST_NAME, tag + "\n")
            except OSError as err:
                failure = _write_failure(checkpoint_dir / LATEST_NAME, err) + f" ({tag} itself is complete)"
            _rotate(checkpoint_dir, step, keep)
    # The other ranks learn whether rank 0 completed the checkpoint: either all go on training or all stop.
    verdict = [failure]
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointWriteError(verdict[0] if rank == 0 else f"rank 0 could not complete {step_dir}: {verdict[0]}")
    return step_dir


def _rotate(checkpoint_dir: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep - 1`` newest complete ones older than it; torn folders and
    folders of later steps (left by a run that was resumed from an older checkpoint) are never touched here."""
    if keep <= 0:
        return
    older = [c for c in complete_checkpoints(checkpoint_dir) if c.step < step]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        _remove_checkpoint(checkpoint_dir / old.tag)


def _remove_checkpoint(step_dir: Path) -> None:
    """Unmark, then delete: a kill halfway leaves a torn folder, never one that looks complete."""
    (step_dir / MARKER_NAME).unlink(missing_ok=True)
    fsync_dir(step_dir)
    shutil.rmtree(step_dir, ignore_errors=True)


def _write_failure(path: Path, err: BaseException) -> str:
    """One sentence: which path could not be written and why; a full filesystem is named as such."""
    existing = Path(path).parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    errnos = {getattr(e, "errno", None) for e in _exception_chain(err)}
    if errno.ENOSPC in errnos or free < _NEARLY_FULL_BYTES:
        return f"could not write {path}: No space left on device: the filesystem of {existing} has {free} bytes free"
    if errno.EDQUOT in errnos:
        return f"could not write {path}: disk quota exceeded ({err})"
    return f"could not write {path}: {type(err).__name__}: {err}"


def _exception_chain(err: Optional[BaseException]):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


# ---- loading ----


def load_checkpoint(engine, checkpoint_dir: Path, checkpoint: Checkpoint) -> dict:
    """Load ``checkpoint`` into ``engine`` on every rank and return its client state. The one way checkpoints are
    loaded: one saved on another number of ranks (SLURM handed the resumed job another allocation) goes through
    DeepSpeed's universal checkpoint, which DeepSpeed's per-rank loader cannot read otherwise."""
    world_size = torch.distributed.get_world_size()
    if checkpoint.shape.world_size != world_size:
        logger.info("%s was saved by %d ranks and this run has %d: loading it through a universal checkpoint",
                    checkpoint_dir / checkpoint.tag, checkpoint.shape.world_size, world_size)
        return checkpoint_reshape.load_resharded(engine, checkpoint_dir, checkpoint.tag)
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=checkpoint.tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint_dir / checkpoint.tag}")
    return client_state


# ---- the run folder ----


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The verdict on ``output.dir`` (``prepare_run_folder``): nothing is written until ``claim``."""

    path: Path
    resume_from: Optional[Checkpoint]
    """The checkpoint to continue from; None: a fresh start."""
    clear_old_run: bool
    """Remove the metrics, checkpoints and ``final/`` of the run the folder holds before writing."""

    def claim(self, resolved_yaml: str, shape: RunShape) -> None:
        """Write ``config.yaml`` (rank 0; call on every rank once every input check passed, so a run that never
        started leaves nothing behind)."""
        if torch.distributed.get_rank() == 0:
            if self.clear_old_run:
                for name in (*RUN_FILES, SLURM_JOB_FILE):
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "config.yaml", resolved_yaml)
            if shape.slurm_job_id is not None:
                atomic_write_text(self.path / SLURM_JOB_FILE, shape.slurm_job_id + "\n")
        torch.distributed.barrier()


def prepare_run_folder(out_dir: Path, cfg: RunConfig, shape: RunShape) -> RunFolder:
    """Check ``out_dir`` for this run (call on every rank before anything is written); writes nothing.

    A folder holding a run is refused unless ``--resume true`` (continue it) or ``--overwrite true`` (remove its
    metrics, checkpoints and ``final/``); a SLURM job requeued into the folder it owns resumes by itself. A
    checkpoint whose settings differ from this run's is refused, naming each. Raises ``ConfigError`` on every rank
    alike.
    """
    verdict: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            verdict[0] = _inspect_run_folder(out_dir, cfg, shape)
        except ConfigError as err:
            verdict[0] = err.problems
    torch.distributed.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], list):
        raise ConfigError(verdict[0])
    checkpoint, clear_old_run = verdict[0]
    return RunFolder(out_dir, checkpoint, clear_old_run)


def _inspect_run_folder(out_dir: Path, cfg: RunConfig, shape: RunShape) -> tuple[Optional[Checkpoint], bool]:
    """Rank 0's reading of the folder: (checkpoint to resume from, whether to clear the old run first)."""
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    resume, overwrite = cfg.resume, cfg.overwrite
    # The job's own command line is replayed on a requeue: even with --overwrite it must continue its own run.
    if held and _requeued_here(out_dir, shape):
        resume, overwrite = True, False
        logger.info("SLURM job %s was requeued (restart %s) into the folder it owns: resuming",
                    shape.slurm_job_id, os.environ.get("SLURM_RESTART_COUNT"))
    if held and not (resume or overwrite):
        raise ConfigError([
            f"output.dir {out_dir} holds a run ({', '.join(held)}): continue it with --resume true, replace it with "
            f"--overwrite true, or choose another output.dir"
        ])
    if not resume:
        return None, bool(held)
    checkpoint, why = choose_resume_checkpoint(out_dir / "checkpoints")
    logger.info("%s", why)
    if checkpoint is not None:
        differences = shape.differences(checkpoint.shape)
        if cfg.train.max_steps < checkpoint.step:
            differences.append(f"train.max_steps: this run has {cfg.train.max_steps}, fewer than the {checkpoint.step} "
                               f"steps the checkpoint has trained (it may grow on resume, never shrink below them)")
        if differences:
            raise ConfigError([
                f"{out_dir / 'checkpoints' / checkpoint.tag} was written with other settings; resume with the "
                f"checkpoint's values or start a new run with --overwrite true:", *differences,
            ])
    # A resume that finds no checkpoint starts over: rows and folders of the unfinished run would be stale.
    return checkpoint, checkpoint is None and bool(held)


def _requeued_here(out_dir: Path, shape: RunShape) -> bool:
    """A requeued SLURM job keeps its job id and counts up SLURM_RESTART_COUNT; the folder records its owner."""
    if shape.slurm_job_id is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return False
    try:
        return (out_dir / SLURM_JOB_FILE).read_text().strip() == shape.slurm_job_id
    except OSError:
        return False


# ---- metrics.jsonl ----


class MetricsLog:
    """``metrics.jsonl`` on rank 0: the rows of the steps before ``start_step`` are kept (a torn or unreadable line,
    left by a kill mid-write, is dropped with a warning), later rows belong to steps that will be replayed; new rows
    are appended and flushed per step, so a kill loses at most the line being written."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        kept = []
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s line %d is torn or not a metrics row: dropped (%.80r)", self.path, number, line)
                    continue
                if step <= start_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def append(self, row: dict) -> None:
        self._file.write(to_json(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
