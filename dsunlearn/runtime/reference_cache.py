"""The reference's hidden states for the normal training set, computed once (``model.reference_cache``).

The normal set never changes and the reference is frozen, so the rows the fused loss reads as ``ref_hidden`` (the
reference's final hidden state at each position that predicts a normal response token) are the same at every step.
They are computed once, in one sharded pass: each rank forwards its share of the examples, then every rank receives
every row, because any rank may be handed any normal example. Then the reference model is freed except its output
head, which the fused loss still gathers as a ZeRO-3 shard. With LoRA (the reference is the policy with its adapters
off) nothing is freed, but the adapters-off forward of every step goes.

``memory`` keeps the rows in one tensor per rank; ``disk`` in one file per node, written by the node's first local
rank (temp file, fsync, rename) and read by every local rank through a read-only memory map. The file carries a key
of everything the rows depend on (the reference identified by content, not by path or time, so nodes holding their
own copies of one model agree; the normal sequences; dtype; the torch and transformers versions) and a checksum; the
key is in the file's name too, so runs with other keys that share ``reference_cache_dir`` keep their own files. A file
whose key, size or checksum does not match is rebuilt, never read; the checks and the memory map read one open file
descriptor, so a file replaced meanwhile is never mapped unchecked. A killed build's temp file is removed by the next
run (the writer holds a lock on it while it lives). Checkpoints never hold the cache (it lives outside
``output.dir/checkpoints``): a resumed run reuses or rebuilds it.

``objective.forget_loss: npo`` needs one more constant of the run from the reference: s_ref(y), the summed
log-likelihood of each forget training answer, one scalar per sequence (``forget_reference_sums``). It is computed in
the same way, one sharded pass over the forget training set at start (every run, a resumed one too: a few forwards,
never in a checkpoint), and the reference model is then freed whole where no KL term needs its head
(``free_reference``): an NPO run holds no reference model and runs no reference forward in its loop.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import hashlib
import json
import logging
import mmap
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from dsunlearn import objective
from dsunlearn.kernels import fused_linear_ce_kl, torch_ce_kl_from_logits
from dsunlearn.runtime import engines
from dsunlearn.settings.config import RunConfig, names_a_local_path, parse_size

logger = logging.getLogger(__name__)

# Bump when the file layout or the meaning of the rows changes: older files are then rebuilt.
CACHE_FORMAT = 2
MAGIC = b"dsunlearn reference cache\n"
# The rows start at this offset: page-aligned, so the memory-mapped rows are aligned for any dtype.
HEADER_BYTES = 4096
# A cache file is rows-<the key's first KEY_CHARS hex digits>.bin; its writer's temp file is
# .rows-<...>.bin.<host>.<pid>.tmp.
FILE_PREFIX = "rows-"
KEY_CHARS = 32
TEMP_SUFFIX = ".tmp"
# How the reference's files are identified: whole when at most this large (config, tokenizer), else by their
# safetensors header and SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread over the file.
WHOLE_FILE_BYTES = 1 << 22
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 1 << 16
# Normal examples per reference forward in the one-off pass: a step's worth of memory or less.
BUILD_BATCH_SIZE = 8
# Bytes checksummed per read when a file is verified.
CHECKSUM_BLOCK = 1 << 24


@dataclass
class ReferenceCache:
    """The reference's rows of every normal training example, in example order."""

    rows: torch.Tensor  # [total_rows, H_ref] in the model dtype (a read-only memory map in disk mode)
    offsets: list[int]  # [N + 1] example i owns rows[offsets[i]:offsets[i + 1]]
    head: Optional[nn.Module]  # the reference's output head (a ZeRO-3 shard); None with LoRA: the policy's own head

    def rows_of(self, normal_indices: Sequence[int], device: torch.device) -> torch.Tensor:
        """The rows of these examples, concatenated in order: [M_n, H_ref], as a reference forward over them returns
        them."""
        pieces = [self.rows[self.offsets[i]:self.offsets[i + 1]] for i in normal_indices]
        return torch.cat(pieces).to(device, non_blocking=True)


def response_row_counts(sequences: Sequence) -> list[int]:
    """Rows each sequence contributes: the positions whose next token is a response token (objective's rule)."""
    return [sum(sequence.response_mask[1:]) for sequence in sequences]


def choose_mode(cfg: RunConfig, head_path: str, total_bytes: int) -> str:
    """``off``, ``memory`` or ``disk`` from ``model.reference_cache``, the head path and the rows' size per rank.

    Only the fused head reads hidden rows; the logits path wants the reference's logits, [M_n, V], which are not
    worth keeping. Raises ``UsageError`` when memory or disk is asked for on the logits path.
    """
    from dsunlearn.runtime.distributed import UsageError

    requested = cfg.model.reference_cache
    if requested == "off":
        return "off"
    if head_path != "fused":
        if requested != "auto":
            raise UsageError(f"model.reference_cache={requested} keeps the reference's hidden states for the fused "
                             f"head, but the loss runs on materialised logits (model.head_path=logits): use auto or "
                             f"off")
        _log_on_rank_zero("reference cache: off (model.reference_cache=auto, but the loss runs on materialised "
                          "logits, which the cache does not hold)")
        return "off"
    if requested != "auto":
        return requested
    limit = parse_size(cfg.model.reference_cache_memory_limit)
    return "memory" if total_bytes <= limit else "disk"


def cache_file_name(key: str) -> str:
    """The cache file of the rows with this key: the key is in the name, so runs with other keys sharing a folder
    never replace each other's file."""
    return f"{FILE_PREFIX}{key[:KEY_CHARS]}.bin"


def cache_key(cfg: RunConfig, sequences: Sequence, dtype: torch.dtype) -> str:
    """Hash of what the rows depend on: the reference's weights (by content), the dtype, the attention
    implementation, the torch and transformers versions (another implementation of the model may compute other rows)
    and the normal training sequences (token ids and response masks; batching and packing do not change the rows)."""
    import transformers

    digest = hashlib.sha256()
    identity = {
        "format": CACHE_FORMAT, "reference": reference_weights_identity(cfg), "dtype": str(dtype),
        "attn_implementation": cfg.model.attn_implementation,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for sequence in sequences:
        digest.update(len(sequence.input_ids).to_bytes(8, "little"))
        digest.update(torch.tensor(sequence.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor(sequence.response_mask, dtype=torch.int8).numpy().tobytes())
    return digest.hexdigest()


def reference_weights_identity(cfg: RunConfig) -> dict:
    """The reference's weights, identified by what they hold, never by where or when they were staged: two nodes
    with their own copies of one model (copied at other times, to other folders) agree. The hub commit when the
    reference comes from the hub cache (its snapshot folder is named by it), and each file's name, size and digest
    (``file_digest``)."""
    path, load_kwargs = engines.pretrained_source(cfg, reference=True)
    commit = None
    if names_a_local_path(path):
        folder = Path(path).expanduser()
    else:
        from transformers.utils import cached_file

        folder = Path(cached_file(path, "config.json", revision=load_kwargs.get("revision"))).parent
        commit = folder.name  # snapshots/<commit>
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():  # follows the hub cache's links to the blobs
            size = entry.stat().st_size
            files.append([entry.name, size, file_digest(entry, size)])
    return {"commit": commit, "files": files}


def file_digest(path: Path, size: int) -> str:
    """A digest of a model file's content, cheap for a large one: a file of up to ``WHOLE_FILE_BYTES`` whole (config,
    tokenizer, generation config); a larger one by its safetensors header (tensor names, dtypes, shapes, offsets)
    and ``SAMPLE_BLOCKS`` blocks spread over it (the first and the last included), which tell other weights of one
    architecture apart (a fine-tuned or unlearned copy differs throughout)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= WHOLE_FILE_BYTES:
            digest.update(file.read())
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            header_bytes = int.from_bytes(file.read(8), "little")
            digest.update(file.read(min(header_bytes, size - 8)))
        for block in range(SAMPLE_BLOCKS):
            file.seek((size - SAMPLE_BYTES) * block // (SAMPLE_BLOCKS - 1))
            digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The one-off pass
# --------------------------------------------------------------------------------------------------------------------


def shares(num_examples: int, world_size: int) -> list[range]:
    """Each rank's contiguous share of the examples, in rank order (the last ones may be shorter or empty), cut at
    multiples of ``BUILD_BATCH_SIZE``: the pass forwards the examples in the same groups of ``BUILD_BATCH_SIZE`` on any
    rank count, so the rows are the same bits on any topology (forwards of other groupings round differently, and
    the KL of a run on 2 ranks then differed from the same run on 1 rank x 2 accumulation steps by ~1e-5)."""
    num_groups = -(-num_examples // BUILD_BATCH_SIZE)
    per_rank = -(-num_groups // world_size) * BUILD_BATCH_SIZE
    return [range(min(r * per_rank, num_examples), min((r + 1) * per_rank, num_examples)) for r in range(world_size)]


def compute_share_rows(
    forward_hidden: Callable, sequences: Sequence, share: range, num_forwards: int, layout: str, pad_id: int, device,
    progress=None,
) -> torch.Tensor:
    """The rows of the examples in ``share``, [R, H], from ``num_forwards`` forwards of up to ``BUILD_BATCH_SIZE``
    examples in the reference's ``layout`` (objective.lay_out): the same count on every rank, as ZeRO-3 needs (a rank
    with fewer examples repeats one and drops what it returns). ``forward_hidden(segment)`` is the reference's hidden
    mode."""
    computed = []
    for forward in range(num_forwards):
        batch_indices = share[forward * BUILD_BATCH_SIZE:(forward + 1) * BUILD_BATCH_SIZE]
        filler = len(batch_indices) == 0
        (segment,), _, _ = objective.lay_out([[sequences[i] for i in (batch_indices or [0])]], layout, pad_id)
        with torch.no_grad():
            hidden = forward_hidden(segment.to(device))
        if not filler:
            computed.append(hidden.detach())
        if progress is not None:
            progress.update(len(batch_indices))
    if not computed:
        return torch.empty(0, 0)
    return torch.cat(computed)


def share_rows(local_rows: torch.Tensor, rows_per_rank: list[int], hidden_size: int, dtype: torch.dtype, device,
               sink: Callable[[int, torch.Tensor], None]) -> None:
    """Give every rank every rank's rows, one rank's share at a time, in rank order: ``sink(first_row, rows)``
    receives each share ([R_r, H]) on every rank. One share at a time, not one all_gather, so a rank never holds
    more than one share besides what ``sink`` keeps (disk mode keeps nothing)."""
    rank = torch.distributed.get_rank()
    first_row = 0
    for source, count in enumerate(rows_per_rank):
        if count:
            buffer = local_rows if rank == source else torch.empty(count, hidden_size, dtype=dtype, device=device)
            # As bytes: gloo and NCCL both move uint8, whatever the model dtype.
            torch.distributed.broadcast(buffer.contiguous().view(torch.uint8), source)
            sink(first_row, buffer)
        first_row += count


def forget_reference_sums(step_data, policy_engine, ref_engine, device) -> torch.Tensor:
    """s_ref(y) = sum_t log p_ref(y_t | x, y_<t) of every forget training sequence, [N_f] float64 on the CPU, the
    same on every rank: each rank forwards its share (``shares``: the same groups on any rank count, so the same bits
    on any topology), then one all_reduce of the zero-padded sums. ``ref_engine`` None: LoRA, the policy with its
    adapters off. On the fused head path the reference's rows meet its head in the fused loss (its weight gathered
    here, on every rank: never tokens x vocabulary), else its own logits. A collective: call it on every rank."""
    import deepspeed

    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sequences = step_data.forget_sequences
    rank_shares = shares(len(sequences), world_size)
    num_forwards = -(-len(rank_shares[0]) // BUILD_BATCH_SIZE)
    if ref_engine is None:
        reference, context = policy_engine, engines.reference_mode(policy_engine.module.lm)
    else:
        reference, context = ref_engine, torch.no_grad()
    on_logits = policy_engine.module.head_path == "logits"  # the reference's head passed the same check (train.py)
    softcap, backend = policy_engine.module.softcap, policy_engine.module.loss_backend
    head = reference.module.lm.get_output_embeddings()
    sums = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    share = rank_shares[rank]
    with context:
        for forward in range(num_forwards):  # the same count on every rank (ZeRO-3); a rank without examples repeats
            batch_indices = share[forward * BUILD_BATCH_SIZE:(forward + 1) * BUILD_BATCH_SIZE]
            (segment,), targets, token_sequence = objective.lay_out(
                [[sequences[i] for i in (batch_indices or [0])]], reference.module.packing, step_data.pad_id)
            segment, targets, token_sequence = segment.to(device), targets.to(device), token_sequence.to(device)
            ones = torch.ones(targets.shape[0], device=device)
            if on_logits:
                _, token_ce, _ = torch_ce_kl_from_logits(reference([segment], mode="logits"), targets, ones,
                                                         return_token_terms=True)
            else:
                hidden = reference([segment], mode="hidden")  # [M_s, H_ref]
                with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
                    _, token_ce, _ = fused_linear_ce_kl(hidden, head.weight, targets, ones, softcap=softcap,
                                                        backend=backend, return_token_terms=True)
            if batch_indices:
                batch_sums = torch.zeros(len(batch_indices), dtype=torch.float64, device=device)
                batch_sums.index_add_(0, token_sequence, token_ce.to(torch.float64))
                sums[batch_indices.start:batch_indices.stop] = -batch_sums
    torch.distributed.all_reduce(sums)  # each example's sum comes from one rank, zeros from the others: exact
    return sums.cpu()


def free_reference(ref_engine) -> None:
    """Free the whole reference engine (its head too) after the one-off passes, for runs whose loop reads nothing of
    it (npo with retain nll). Logs this process's resident memory before and after."""
    return_free_memory()
    before = resident_bytes()
    engines.release_all_but_head(ref_engine, keep_head=False)
    return_free_memory()
    _log_on_rank_zero("reference model freed (no term reads it in the loop): resident memory %.1f -> %.1f MiB "
                      "(rank 0)", before / 2**20, resident_bytes() / 2**20)


# --------------------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------------------


class CacheFileWriter:
    """Writes a cache file: rows appended in order, then the header; ``close`` renames it into place (fsynced),
    ``abort`` removes the temp file. The writer holds an exclusive lock on its temp file while it lives, so that
    ``remove_stale_temp_files`` knows a killed writer's file (the kernel drops the lock with the process)."""

    def __init__(self, path: Path, key: str, total_rows: int, hidden_size: int, dtype: torch.dtype):
        self.path = path
        self.meta = {"format": CACHE_FORMAT, "key": key, "rows": total_rows, "hidden_size": hidden_size,
                     "dtype": str(dtype)}
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: nodes sharing a filesystem may write the same file at once.
        self.temp_path = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}")
        while True:
            self.file = open(self.temp_path, "wb")
            _lock(self.file.fileno(), blocking=True)
            # A cleaner may have taken this file for a dead writer's between its creation and the lock: start again.
            if _same_file(self.temp_path, self.file.fileno()):
                break
            self.file.close()
        self.file.write(bytes(HEADER_BYTES))
        self.checksum = 0

    def write(self, rows: torch.Tensor) -> None:
        data = rows.detach().cpu().contiguous().view(torch.uint8).numpy()
        self.checksum = zlib.crc32(data, self.checksum)
        self.file.write(data.tobytes())

    def close(self) -> None:
        header = _header_bytes({**self.meta, "crc32": self.checksum})
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        os.replace(self.temp_path, self.path)
        self.file.close()  # and the lock, once the temp name is gone
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def abort(self) -> None:
        """The build failed: remove the temp file."""
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
        self.file.close()


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive ``flock`` on ``fd``: True when taken, False when another process holds it; raises ``OSError``
    where the filesystem has no locks (the caller falls back). A writer that finds no locks writes unlocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if blocking and err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise


def _same_file(path: Path, fd: int) -> bool:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (stat.st_dev, stat.st_ino) == (opened.st_dev, opened.st_ino)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files of cache builds that were killed (their writer is gone) from ``folder``; returns them.
    A writer holds a lock on its file while it lives; on a filesystem without locks, only this host's files whose
    process is gone are removed (another host's cannot be told apart from a live one)."""
    removed = []
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for temp in sorted(folder.glob(f".{FILE_PREFIX}*{TEMP_SUFFIX}")):
        try:
            fd = os.open(temp, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its writer finished meanwhile
        try:
            try:
                stale = _lock(fd, blocking=False)
            except OSError:  # no locks here: this host's writers are known by their pid
                writer_host, _, pid = temp.name.removesuffix(TEMP_SUFFIX).rpartition(".")
                stale = writer_host.endswith(f".{host}") and pid.isdigit() and not _pid_alive(int(pid))
            if stale and _same_file(temp, fd):
                os.unlink(temp)
                removed.append(temp)
        finally:
            os.close(fd)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _header_bytes(meta: dict) -> bytes:
    header = MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n"
    if len(header) > HEADER_BYTES:
        raise ValueError(f"reference cache header of {len(header)} bytes exceeds {HEADER_BYTES}")
    return header + bytes(HEADER_BYTES - len(header))


def _read_meta(fd: int) -> dict:
    """The header of the open cache file ``fd``; ``ValueError`` naming what is wrong when it is not one."""
    header = os.pread(fd, HEADER_BYTES, 0)
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        raise ValueError("no cache header")
    try:
        return json.loads(header[len(MAGIC):].split(b"\n", 1)[0])
    except ValueError:
        raise ValueError("unreadable cache header") from None


def read_meta(path: Path) -> dict:
    """The header of a cache file; ``ValueError`` naming what is wrong when it is not one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_meta(fd)
    finally:
        os.close(fd)


def _fd_problem(fd: int, path: Path, key: str, total_rows: int, hidden_size: int, dtype: torch.dtype,
                verify_checksum: bool) -> Optional[str]:
    """Why the open file ``fd`` (at ``path``, for the messages) must not be used for these rows (None: it may)."""
    try:
        meta = _read_meta(fd)
    except (OSError, ValueError) as err:
        return f"{path} is not a complete cache file ({err})"
    expected = {"format": CACHE_FORMAT, "key": key, "rows": total_rows, "hidden_size": hidden_size, "dtype": str(dtype)}
    differing = [name for name, value in expected.items() if meta.get(name) != value]
    if differing:
        return f"{path} holds other rows ({', '.join(differing)} differ)"
    data_bytes = total_rows * hidden_size * dtype.itemsize
    size = os.fstat(fd).st_size
    if size != HEADER_BYTES + data_bytes:
        return f"{path} is torn: {size} bytes, {HEADER_BYTES + data_bytes} expected"
    if verify_checksum:
        checksum, offset = 0, HEADER_BYTES
        while block := os.pread(fd, CHECKSUM_BLOCK, offset):
            checksum = zlib.crc32(block, checksum)
            offset += len(block)
        if checksum != meta.get("crc32"):
            return f"{path} is corrupt: its rows do not match the header's checksum"
    return None


def open_rows(path: Path, key: str, total_rows: int, hidden_size: int, dtype: torch.dtype,
              verify_checksum: bool) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(rows, None) when the file at ``path`` holds these rows: [total_rows, H], a read-only, private memory map of
    the very file descriptor that was checked (the node's ranks share its pages through the page cache); else (None,
    why not): missing, another key, torn (its size is not the header's), or (``verify_checksum``) rows that do not
    match the header's checksum."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, "no cache file"
    except OSError as err:
        return None, f"{path} cannot be opened ({err})"
    try:
        problem = _fd_problem(fd, path, key, total_rows, hidden_size, dtype, verify_checksum)
        if problem:
            return None, problem
        whole = torch.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    finally:
        os.close(fd)  # the map keeps the file
    return whole[HEADER_BYTES:].view(dtype).view(total_rows, hidden_size), None


def file_problem(path: Path, key: str, total_rows: int, hidden_size: int, dtype: torch.dtype,
                 verify_checksum: bool) -> Optional[str]:
    """Why the file at ``path`` must not be used for these rows (None: it may); see ``open_rows``."""
    return open_rows(path, key, total_rows, hidden_size, dtype, verify_checksum)[1]


# --------------------------------------------------------------------------------------------------------------------
# The run's cache
# --------------------------------------------------------------------------------------------------------------------


def prepare(cfg: RunConfig, step_data, policy_engine, ref_engine, ref_hidden_size: int, device) -> Optional[
        ReferenceCache]:
    """The run's reference cache (None: ``off``), built or reused; with a reference engine, that engine is freed
    except its head once the rows are in place. A collective: call it on every rank, after the engines are built."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    sequences = step_data.normal_sequences
    row_counts = response_row_counts(sequences)
    offsets = [0]
    for count in row_counts:
        offsets.append(offsets[-1] + count)
    total_rows = offsets[-1]
    dtype = engines.PRECISION_DTYPES[cfg.model.precision]
    total_bytes = total_rows * ref_hidden_size * dtype.itemsize
    mode = choose_mode(cfg, policy_engine.module.head_path, total_bytes)
    if mode == "off":
        return None
    _log_on_rank_zero(
        "reference cache: %d normal examples, %d rows x %d, %s, %.1f MiB per %s: %s (model.reference_cache=%s)",
        len(sequences), total_rows, ref_hidden_size, str(dtype).removeprefix("torch."), total_bytes / 2**20,
        "rank" if mode == "memory" else "node", mode, cfg.model.reference_cache,
    )
    key = cache_key(cfg, sequences, dtype)
    path = Path(cfg.model.reference_cache_dir or Path(cfg.output.dir) / "reference_cache") / cache_file_name(key)
    build = True
    rows = None
    if mode == "disk":
        problem = None
        if local_rank == 0:
            for removed in remove_stale_temp_files(path.parent):
                logger.warning("reference cache: removed %s, left by a build that was killed", removed)
            rows, problem = open_rows(path, key, total_rows, ref_hidden_size, dtype, verify_checksum=True)
        # Every rank forwards or none does: one node's missing or stale file rebuilds them all.
        needed = torch.tensor([float(problem is not None)], device=device)
        torch.distributed.all_reduce(needed, op=torch.distributed.ReduceOp.MAX)
        build = bool(needed.item())
        if build:
            _log_on_rank_zero("reference cache: building %s (%s)", path, problem or "another node's file is stale")
        else:
            _log_on_rank_zero("reference cache: reusing %s (its key matches)", path)

    if build:
        rows = _build(cfg, step_data, policy_engine, ref_engine, row_counts, total_rows, ref_hidden_size, dtype,
                      device, mode, path, key, local_rank == 0)
    if mode == "disk":
        torch.distributed.barrier()  # the node's file is in place
        if rows is None:  # local rank 0 keeps the map of the file it checked when it did not build
            rows, problem = open_rows(path, key, total_rows, ref_hidden_size, dtype, verify_checksum=False)
            if problem:
                raise RuntimeError(f"reference cache: {problem}")
    head = release_reference(ref_engine) if ref_engine is not None else None
    return ReferenceCache(rows=rows, offsets=offsets, head=head)


def _build(cfg, step_data, policy_engine, ref_engine, row_counts, total_rows, hidden_size, dtype, device, mode, path,
           key, writes_file) -> Optional[torch.Tensor]:
    """The one sharded pass; returns the rows in memory mode, writes the node's file in disk mode (None)."""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sequences = step_data.normal_sequences
    rank_shares = shares(len(sequences), world_size)
    num_forwards = -(-len(rank_shares[0]) // BUILD_BATCH_SIZE)
    if ref_engine is None:  # LoRA: the policy with its adapters off is the reference
        reference, context = policy_engine, engines.reference_mode(policy_engine.module.lm)
    else:
        reference, context = ref_engine, torch.no_grad()
    progress = None
    if rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(rank_shares[0]), desc="reference cache (rank 0's share)", dynamic_ncols=True)
    with context:
        local_rows = compute_share_rows(
            lambda segment: reference([segment], mode="hidden"), sequences, rank_shares[rank], num_forwards,
            reference.module.packing, step_data.pad_id, device, progress,
        )
    if progress is not None:
        progress.close()
    rows_per_rank = [sum(row_counts[i] for i in share) for share in rank_shares]
    if mode == "memory":
        rows = torch.empty(total_rows, hidden_size, dtype=dtype, device=device)
        share_rows(local_rows, rows_per_rank, hidden_size, dtype, device,
                   lambda first, chunk: rows[first:first + chunk.shape[0]].copy_(chunk))
        return rows
    writer = CacheFileWriter(path, key, total_rows, hidden_size, dtype) if writes_file else None
    try:
        share_rows(local_rows, rows_per_rank, hidden_size, dtype, device,
                   lambda first, chunk: writer.write(chunk) if writer is not None else None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return None


def release_reference(ref_engine) -> nn.Module:
    """Free the reference engine except its output head and return the head (still a ZeRO-3 shard, gathered by the
    fused loss). Logs this process's resident memory before and after."""
    return_free_memory()  # so that the difference below is the reference's alone, not the loading's leftovers
    before = resident_bytes()
    head = engines.release_all_but_head(ref_engine)
    return_free_memory()
    after = resident_bytes()
    _log_on_rank_zero("reference model freed except its head: resident memory %.1f -> %.1f MiB (rank 0)",
                      before / 2**20, after / 2**20)
    return head


def return_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system: glibc keeps freed shards of a few MB
    in its heap, where the system (and the resident size) still counts them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory by itself, or not at all
        pass


def resident_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _log_on_rank_zero(message: str, *args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info(message, *args)
