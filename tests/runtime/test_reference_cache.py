"""The reference cache (model.reference_cache): the cached reference rows give the KL, the loss and the gradients of
a reference forward, on 1 and 2 ranks and with LoRA; whole runs with the cache in memory or on disk log the metrics of
a run without it; the disk file is one per node, reused while its key matches, rebuilt when the normal data changes
or the file is torn; a resumed run finds it again; checkpoints never hold it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, free_port, launch

from dsunlearn.data.tokenization import TokenizedSequence
from dsunlearn.runtime import checkpoints, reference_cache
from dsunlearn.settings.config import ConfigError, ModelConfig, RunConfig

WORKER = Path(__file__).parent / "workers" / "reference_cache_step.py"
METRICS_TOLERANCE = 1e-5


# ---- the file and the key, in one process ----


def _sequences(first_token=3):
    return [TokenizedSequence(input_ids=[first_token, 4, 5, 6], response_mask=[0, 0, 1, 1]),
            TokenizedSequence(input_ids=[7, 8, 9], response_mask=[0, 1, 1])]


def _write(path, rows, key="k"):
    writer = reference_cache.CacheFileWriter(path, key, rows.shape[0], rows.shape[1], rows.dtype)
    writer.write(rows[:2])
    writer.write(rows[2:])
    writer.close()


def test_file_round_trip_and_every_bad_file_refused(tmp_path):
    path = tmp_path / "cache" / reference_cache.FILE_NAME
    rows = torch.randn(5, 3, dtype=torch.bfloat16)
    _write(path, rows)
    assert os.listdir(path.parent) == [reference_cache.FILE_NAME]  # the temp file was renamed into place
    assert reference_cache.file_problem(path, "k", 5, 3, torch.bfloat16, verify_checksum=True) is None
    assert torch.equal(reference_cache.map_rows(path, 5, 3, torch.bfloat16), rows)
    assert "other rows (key differ)" in reference_cache.file_problem(path, "other", 5, 3, torch.bfloat16, True)
    assert "dtype" in reference_cache.file_problem(path, "k", 5, 3, torch.float32, True)

    data = path.read_bytes()
    path.write_bytes(data[:-1])  # a kill mid-write leaves no such file, a full disk or a copy may
    assert "torn" in reference_cache.file_problem(path, "k", 5, 3, torch.bfloat16, True)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert "corrupt" in reference_cache.file_problem(path, "k", 5, 3, torch.bfloat16, True)
    path.write_bytes(b"\0" * len(data))
    assert "not a complete cache file" in reference_cache.file_problem(path, "k", 5, 3, torch.bfloat16, True)
    assert reference_cache.file_problem(tmp_path / "none", "k", 5, 3, torch.bfloat16, True) == "no cache file"


def test_key_follows_the_normal_data_the_dtype_and_the_weights(tiny_model_dir, tmp_path):
    cfg = RunConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)))
    key = reference_cache.cache_key(cfg, _sequences(), torch.bfloat16)
    assert reference_cache.cache_key(cfg, _sequences(), torch.bfloat16) == key
    assert reference_cache.cache_key(cfg, _sequences(first_token=10), torch.bfloat16) != key
    masked_otherwise = _sequences()
    masked_otherwise[0].response_mask = [0, 1, 1, 1]
    assert reference_cache.cache_key(cfg, masked_otherwise, torch.bfloat16) != key
    assert reference_cache.cache_key(cfg, _sequences(), torch.float32) != key
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    other_weights = RunConfig(model=ModelConfig(name_or_path=str(copy)))
    assert reference_cache.cache_key(other_weights, _sequences(), torch.bfloat16) != key


def test_rows_are_counted_as_the_loss_counts_them():
    from dsunlearn.objective import ObjectiveConfig, build_step_batch

    sequences = _sequences()
    batch = build_step_batch(sequences[:1], [], sequences, 0, ObjectiveConfig())
    assert sum(reference_cache.response_row_counts(sequences)) == batch.ref_segment.token_index.numel()


def test_shares_cover_every_example_once():
    for examples, ranks in ((5, 4), (8, 2), (3, 3), (50, 2), (50, 3), (17, 8)):
        shares = reference_cache.shares(examples, ranks)
        assert len(shares) == ranks
        assert [i for share in shares for i in share] == list(range(examples))


@pytest.mark.parametrize("num_examples", [20, 50, 3])
def test_the_pass_forwards_the_same_groups_on_any_rank_count(num_examples):
    """The rows are the same bits on 1 rank and on N (topology invariance, DESIGN.md §6a): every rank count forwards
    the normal examples in the same groups, in the same layout. Each forward is recorded as the token ids it saw."""
    sequences = [TokenizedSequence(input_ids=[i + 3, i + 4, 5], response_mask=[0, 1, 1]) for i in range(num_examples)]

    def groups_on(world_size):
        seen = []

        def forward_hidden(segment):
            seen.append(tuple(segment.input_ids.flatten().tolist()))
            return torch.zeros(int(segment.input_ids.numel()), 1)

        for share in reference_cache.shares(num_examples, world_size):
            # As many forwards as the share has groups: the fillers that even out the ranks' counts are dropped anyway.
            num_forwards = -(-len(share) // reference_cache.BUILD_BATCH_SIZE)
            reference_cache.compute_share_rows(forward_hidden, sequences, share, num_forwards, "packed", 0, "cpu")
        return seen

    one_rank = groups_on(1)
    for world_size in (2, 3, 4):
        assert groups_on(world_size) == one_rank, world_size


def test_auto_chooses_by_size_and_logits_path_refuses_memory_and_disk(tiny_model_dir):
    def cfg(mode, limit="1KiB"):
        return RunConfig(model=ModelConfig(name_or_path=str(tiny_model_dir), reference_cache=mode,
                                           reference_cache_memory_limit=limit))

    assert reference_cache.choose_mode(cfg("auto"), "fused", 1024) == "memory"
    assert reference_cache.choose_mode(cfg("auto"), "fused", 1025) == "disk"
    assert reference_cache.choose_mode(cfg("auto"), "logits", 1) == "off"
    assert reference_cache.choose_mode(cfg("disk"), "fused", 1) == "disk"
    from dsunlearn.runtime.distributed import UsageError

    with pytest.raises(UsageError, match="materialised logits"):
        reference_cache.choose_mode(cfg("memory"), "logits", 1)
    with pytest.raises(ConfigError, match="head_path=logits"):
        RunConfig(model=ModelConfig(name_or_path=str(tiny_model_dir), reference_cache="disk", head_path="logits"))
    with pytest.raises(ConfigError, match="reference_cache_memory_limit"):
        cfg("auto", limit="lots")


# ---- cached against uncached, the same micro-step under ZeRO-3 ----


def _run_worker(model_dir, out_dir, world_size, lora_rank):
    out_dir.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(out_dir), str(lora_rank)], cwd=REPO,
                         env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(world_size)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs[0].splitlines()[-40:])
    return torch.load(out_dir / "result.pt", weights_only=False), outputs[0]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, lora_rank", [(1, 0), (2, 0), (2, 4)], ids=["1_rank", "2_ranks", "2_ranks_lora"])
def test_cached_kl_loss_and_gradients_equal_the_reference_forward(tiny_model_dir, tmp_path, world_size, lora_rank):
    results, output = _run_worker(tiny_model_dir, tmp_path / "out", world_size, lora_rank)
    assert "reference cache: " in output and ": memory (model.reference_cache=memory)" in output
    for result in results:
        uncached, cached = result["uncached"], result["cached"]
        kl_rows = result["kl_rows"]
        # One SGD step apart from the reference, the KL is small but not 0 on the normal tokens.
        assert uncached["token_kl"][-kl_rows:].abs().max() > 1e-7
        # Each token's KL is a difference of terms of order log V ~ 6 in fp32: its rounding is ~1e-6 absolute (the
        # cached rows come from other batches, padded otherwise, so they differ from the step's own in the last bit).
        torch.testing.assert_close(cached["token_kl"], uncached["token_kl"], rtol=1e-4, atol=2e-6)
        assert cached["loss"] == pytest.approx(uncached["loss"], rel=1e-5)
        assert set(cached["grads"]) == set(uncached["grads"])
        for name, grad in uncached["grads"].items():
            torch.testing.assert_close(cached["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
        if lora_rank == 0:
            assert result["freed"] is True  # the reference kept nothing but its head's shard
        else:
            assert result["freed"] is None  # no second model to free


# ---- whole runs: 2 ranks, 3 steps ----


def _args(model_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", "3", "--output.evaluate", "false", "--output.export", "false", *extra]


def _launch(args):
    code, output = launch(args)  # a run stopped from outside is finished (launching.OUTSIDE_STOP)
    assert code == 0, output[-4000:]
    return output


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(rows, expected):
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, want in zip(rows, expected):
        for name in ("forget_ce", "random_ce", "normal_kl", "normal_ce", "total", "grad_norm"):
            assert row[name] == pytest.approx(want[name], rel=METRICS_TOLERANCE, abs=1e-7), (row["step"], name)


@pytest.fixture(scope="module")
def uncached_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uncached") / "run"
    _launch(_args(tiny_model_dir, run_dir, "--model.reference_cache", "off"))
    return run_dir


@pytest.mark.distributed
@pytest.mark.integration
def test_memory_cache_run_logs_the_uncached_metrics(tiny_model_dir, uncached_run, tmp_path):
    run_dir = tmp_path / "run"
    output = _launch(_args(tiny_model_dir, run_dir))  # auto: a tiny cache goes to memory
    assert ": memory (model.reference_cache=auto)" in output
    assert "reference model freed except its head" in output
    _assert_same_metrics(_metrics(run_dir), _metrics(uncached_run))


@pytest.mark.distributed
@pytest.mark.integration
def test_disk_cache_reused_rebuilt_and_resumed(tiny_model_dir, uncached_run, tmp_path):
    run_dir = tmp_path / "run"
    cache_file = run_dir / "reference_cache" / reference_cache.FILE_NAME
    disk = ("--model.reference_cache", "disk", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "0")
    output = _launch(_args(tiny_model_dir, run_dir, *disk))
    assert f"building {cache_file} (no cache file)" in output
    assert os.listdir(cache_file.parent) == [reference_cache.FILE_NAME]  # one file for the node's two ranks
    expected = _metrics(uncached_run)
    _assert_same_metrics(_metrics(run_dir), expected)
    for path in (run_dir / "checkpoints").rglob("*"):  # the checkpoints do not hold the rows
        assert not (path.is_file() and path.read_bytes().startswith(reference_cache.MAGIC)), path

    def resume_last_step():
        shutil.rmtree(run_dir / "checkpoints" / checkpoints.step_tag(3))
        output = _launch(_args(tiny_model_dir, run_dir, *disk, "--resume", "true"))
        _assert_same_metrics(_metrics(run_dir), expected)
        return output

    assert f"reusing {cache_file} (its key matches)" in resume_last_step()
    size = cache_file.stat().st_size
    with open(cache_file, "r+b") as file:
        file.truncate(size - 100)
    assert f"building {cache_file} ({cache_file} is torn" in resume_last_step()
    assert cache_file.stat().st_size == size

    # Another normal train split: the same cache folder, rebuilt for the new rows.
    other_dir = tmp_path / "other"
    output = _launch(_args(tiny_model_dir, other_dir, "--model.reference_cache", "disk", "--train.max_steps", "1",
                           "--model.reference_cache_dir", str(cache_file.parent), "--data.normal.held_out_fraction",
                           "0.3"))
    assert f"building {cache_file} ({cache_file} holds other rows (key" in output
    assert not (other_dir / "reference_cache").exists()
