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
from warm_start import popen_python

from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model
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
    path = tmp_path / "cache" / reference_cache.cache_file_name("k")
    rows = torch.randn(5, 3, dtype=torch.bfloat16)
    _write(path, rows)
    assert os.listdir(path.parent) == [path.name]  # the temp file was renamed into place
    assert reference_cache.file_problem(path, "k", 5, 3, torch.bfloat16, verify_checksum=True) is None
    mapped, problem = reference_cache.open_rows(path, "k", 5, 3, torch.bfloat16, verify_checksum=True)
    assert problem is None and torch.equal(mapped, rows)
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


def test_key_follows_the_normal_data_the_dtype_and_the_weights(tiny_model_dir, tmp_path, bpe_tokenizer):
    cfg = RunConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)))
    key = reference_cache.cache_key(cfg, _sequences(), torch.bfloat16)
    assert reference_cache.cache_key(cfg, _sequences(), torch.bfloat16) == key
    assert reference_cache.cache_key(cfg, _sequences(first_token=10), torch.bfloat16) != key
    masked_otherwise = _sequences()
    masked_otherwise[0].response_mask = [0, 1, 1, 1]
    assert reference_cache.cache_key(cfg, masked_otherwise, torch.bfloat16) != key
    assert reference_cache.cache_key(cfg, _sequences(), torch.float32) != key
    # Other weights of the same architecture (same files, sizes and safetensors header): another key.
    other = save_tiny_model(build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=5),
                            bpe_tokenizer, tmp_path / "other")
    other_weights = RunConfig(model=ModelConfig(name_or_path=str(other)))
    assert reference_cache.cache_key(other_weights, _sequences(), torch.bfloat16) != key


def test_key_names_the_model_by_content_not_by_place_or_time(tiny_model_dir, tmp_path):
    """Issue 17 item 4(a): nodes that staged their own copies of one model at other times share one key (and so one
    file); item 4(c): another torch or transformers version does not."""
    import transformers

    cfg = RunConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)))
    key = reference_cache.cache_key(cfg, _sequences(), torch.bfloat16)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "node1" / "model")  # copied now: other times, another folder
    for path in copy.iterdir():
        os.utime(path, (1e9, 1e9))
    staged_elsewhere = RunConfig(model=ModelConfig(name_or_path=str(copy)))
    assert reference_cache.cache_key(staged_elsewhere, _sequences(), torch.bfloat16) == key
    for module in (torch, transformers):
        version = module.__version__
        module.__version__ = version + ".other"
        try:
            assert reference_cache.cache_key(cfg, _sequences(), torch.bfloat16) != key, module.__name__
        finally:
            module.__version__ = version


def test_runs_with_other_keys_keep_their_own_files(tmp_path):
    """Item 4(b): the key is in the file's name, so two runs sharing reference_cache_dir do not replace each other's
    rows."""
    rows_a, rows_b = torch.randn(5, 3), torch.randn(5, 3)
    path_a = tmp_path / reference_cache.cache_file_name("a" * 64)
    path_b = tmp_path / reference_cache.cache_file_name("b" * 64)
    assert path_a != path_b and "a" * reference_cache.KEY_CHARS in path_a.name
    _write(path_a, rows_a, key="a" * 64)
    _write(path_b, rows_b, key="b" * 64)
    assert torch.equal(reference_cache.open_rows(path_a, "a" * 64, 5, 3, torch.float32, True)[0], rows_a)
    assert torch.equal(reference_cache.open_rows(path_b, "b" * 64, 5, 3, torch.float32, True)[0], rows_b)


def test_the_checked_file_is_the_mapped_file(tmp_path, monkeypatch):
    """Item 4(b): a file replaced between the check and the map must not be mapped unchecked: the map is of the
    descriptor that was checked."""
    path = tmp_path / reference_cache.cache_file_name("k")
    checked, replacement = torch.randn(5, 3), torch.randn(5, 3)
    _write(path, checked)
    _write(tmp_path / "other.bin", replacement, key="another run")
    real_check = reference_cache._fd_problem

    def check_then_replace(*args, **kwargs):
        problem = real_check(*args, **kwargs)
        os.replace(tmp_path / "other.bin", path)  # another writer renames its file into place right after the check
        return problem

    monkeypatch.setattr(reference_cache, "_fd_problem", check_then_replace)
    rows, problem = reference_cache.open_rows(path, "k", 5, 3, torch.float32, verify_checksum=True)
    assert problem is None and torch.equal(rows, checked)


def test_a_killed_builds_temp_file_is_removed_and_a_live_ones_kept(tmp_path):
    """Item 4(d): a writer killed mid-build (SIGKILL, for real) leaves its temp file; the next run removes it, and
    never the temp file of a build still running."""
    path = tmp_path / reference_cache.cache_file_name("k")
    script = ("import sys, time, torch\n"
              "from pathlib import Path\n"
              "from dsunlearn.runtime import reference_cache\n"
              "writer = reference_cache.CacheFileWriter(Path(sys.argv[1]), 'k', 4, 3, torch.float32)\n"
              "writer.write(torch.ones(2, 3))\n"
              "writer.file.flush()\n"
              "print('writing', flush=True)\n"
              "time.sleep(600)\n")
    victim = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "writing"
        live = reference_cache.CacheFileWriter(path, "k", 4, 3, torch.float32)  # this process's build, running
        dead_temp = path.with_name(f".{path.name}.{__import__('socket').gethostname()}.{victim.pid}.tmp")
        assert dead_temp.is_file()
        assert reference_cache.remove_stale_temp_files(tmp_path) == []  # both writers alive: nothing removed
        victim.kill()
        victim.wait()
        assert reference_cache.remove_stale_temp_files(tmp_path) == [dead_temp]
        assert not dead_temp.exists() and live.temp_path.is_file()
        live.write(torch.zeros(4, 3))
        live.close()
        assert os.listdir(tmp_path) == [path.name]
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


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
        popen_python([str(WORKER), str(model_dir), str(out_dir), str(lora_rank)],
                     dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
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


# ---- whole runs: 2 steps (the second after an update), on 2 ranks but where the rank count does not matter ----


def _args(model_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", "2", "--output.evaluate", "false", "--output.export", "false", *extra]


def _launch(args, nproc=2):
    code, output = launch(args, nproc=nproc)  # a run stopped from outside is finished (launching.OUTSIDE_STOP)
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
    # 1 rank x 2 micro-steps: the 2-rank run's global batch, so the same metrics (DESIGN.md §6a); the cache on 2 ranks
    # is checked by the micro-step above and by the disk runs below.
    output = _launch(_args(tiny_model_dir, run_dir, "--train.gradient_accumulation_steps", "2"), nproc=1)
    # auto: a tiny cache goes to memory
    assert ": memory (model.reference_cache=auto)" in output
    assert "reference model freed except its head" in output
    _assert_same_metrics(_metrics(run_dir), _metrics(uncached_run))


@pytest.mark.distributed
@pytest.mark.integration
def test_disk_cache_reused_rebuilt_and_resumed(tiny_model_dir, uncached_run, tmp_path):
    run_dir = tmp_path / "run"
    disk = ("--model.reference_cache", "disk", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "0")
    output = _launch(_args(tiny_model_dir, run_dir, *disk))
    (cache_file,) = (run_dir / "reference_cache").iterdir()  # one file for the node's two ranks
    assert cache_file.name.startswith(reference_cache.FILE_PREFIX)
    assert f"building {cache_file} (no cache file)" in output
    expected = _metrics(uncached_run)
    _assert_same_metrics(_metrics(run_dir), expected)
    for path in (run_dir / "checkpoints").rglob("*"):  # the checkpoints do not hold the rows
        assert not (path.is_file() and path.read_bytes().startswith(reference_cache.MAGIC)), path

    def resume_last_step():
        shutil.rmtree(run_dir / "checkpoints" / checkpoints.step_tag(2))
        output = _launch(_args(tiny_model_dir, run_dir, *disk, "--resume", "true"))
        _assert_same_metrics(_metrics(run_dir), expected)
        return output

    assert f"reusing {cache_file} (its key matches)" in resume_last_step()
    size = cache_file.stat().st_size
    with open(cache_file, "r+b") as file:
        file.truncate(size - 100)
    assert f"building {cache_file} ({cache_file} is torn" in resume_last_step()
    assert cache_file.stat().st_size == size

    # Another normal train split: the same cache folder, rebuilt for the new rows (on 1 rank: the key and the file's
    # place do not depend on the rank count).
    other_dir = tmp_path / "other"
    output = _launch(_args(tiny_model_dir, other_dir, "--model.reference_cache", "disk", "--train.max_steps", "1",
                           "--model.reference_cache_dir", str(cache_file.parent), "--data.normal.held_out_fraction",
                           "0.3"), nproc=1)
    # Another key, so a file of its own beside the first, which stays for the runs it serves.
    other_file = next(path for path in cache_file.parent.iterdir() if path != cache_file)
    assert f"building {other_file} (no cache file)" in output
    assert sorted(cache_file.parent.iterdir()) == sorted([cache_file, other_file]) and cache_file.stat().st_size == size
    assert not (other_dir / "reference_cache").exists()


# ---- two nodes, each with its own copy of the model, sharing one cache folder ----


@pytest.mark.distributed
@pytest.mark.integration
def test_two_nodes_with_their_own_copies_share_one_cache_file(tiny_model_dir, tmp_path):
    """Item 4: two "nodes" (one rank each, LOCAL_RANK 0, each with its own hub cache holding a copy of the model staged
    at another time) and one shared reference_cache_dir: one key, one file, both ranks end right (before: the keys
    differed by the copies' times and folders, both wrote rows.bin and the node whose file was replaced failed)."""
    from local_hub import add_revision

    caches = [tmp_path / f"node{rank}" / "hub" for rank in range(2)]
    for rank, cache in enumerate(caches):
        add_revision(cache, "dsunlearn/tiny", tiny_model_dir, branch="main", mtime=1e9 + rank * 86400)
    shared = tmp_path / "shared_cache"
    args = _args("dsunlearn/tiny", tmp_path / "run", "--model.reference_cache", "disk", "--train.max_steps", "1",
                 "--model.reference_cache_dir", str(shared))
    port = str(free_port())
    processes = []
    for rank, cache in enumerate(caches):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        processes.append(subprocess.Popen([sys.executable, "dsunlearn/train.py", *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=420)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    files = sorted(shared.iterdir())
    assert len(files) == 1 and files[0].name.startswith(reference_cache.FILE_PREFIX), files
