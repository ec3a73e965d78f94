"""The benchmark runs end to end on the CPU at a tiny size and writes sane JSON (values checked, never timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dsunlearn.kernels.bench import IMPLEMENTATIONS, Problem, format_table, parse_args, Row


def test_flops_count_six_nhv_for_the_head_and_two_for_the_reference():
    one_product = 2 * 8 * 4 * 16
    assert Problem(8, 4, 16, "fp32", "cpu", "ce").flops() == 3 * one_product
    assert Problem(8, 4, 16, "fp32", "cpu", "kl").flops() == 4 * one_product
    assert Problem(8, 4, 16, "fp32", "cpu", "both").flops() == 4 * one_product


def test_cpu_defaults_and_implementation_list():
    args = parse_args(["--device", "cpu", "--impls", "torch, chunked,triton@384"])
    assert (args.n, args.h, args.v, args.dtype) == (2048, 256, 16384, "fp32")
    assert args.impls == ["torch", "chunked", "triton@384"]
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--impls", "torch,triton@many"])


def test_table_lists_skipped_rows_with_their_reason():
    table = format_table([Row("torch", size=[1, 2, 3], forward_ms=1.0), Row("cce", status="skipped", note="no CUDA")])
    assert "skipped: no CUDA" in table and "1,2,3" in table


def test_bench_runs_on_cpu_and_writes_a_row_per_implementation(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "dsunlearn.kernels.bench", "--device", "cpu", "--n", "48", "--h", "16", "--v", "300",
        "--interpreter-size", "16,8,257", "--repeats", "1", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fwd+bwd ms" in done.stdout

    report = json.loads(out.read_text())
    assert report["problem"]["num_tokens"] == 48 and report["problem"]["terms"] == "both"
    assert report["flops_counted"] == 4 * 2 * 48 * 16 * 300
    assert report["matmul_tflops"] > 0
    rows = {row["implementation"]: row for row in report["results"]}
    assert list(rows) == list(IMPLEMENTATIONS)

    for name in ("torch", "torch.compile", "chunked", "triton"):
        row = rows[name]
        assert row["status"] == "ok", (name, row["note"])
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0
        # One timed repeat: the forward+backward time is the sum of the two phases.
        assert math.isclose(row["forward_backward_ms"], row["forward_ms"] + row["backward_ms"], rel_tol=1e-6)
        assert row["peak_extra_mib"] >= 0 and row["tflops"] > 0
        assert row["max_rel_error_vs_float64"] < 1e-4, (name, row["max_rel_error_vs_float64"])
    assert rows["triton"]["size"] == [16, 8, 257] and "interpreter" in rows["triton"]["note"]

    # Same inputs, same loss; ratios are relative to the torch row.
    for name in ("torch.compile", "chunked"):
        assert math.isclose(rows[name]["loss"], rows["torch"]["loss"], rel_tol=1e-5)
        assert rows[name]["speedup_vs_torch"] > 0
    assert rows["torch"]["speedup_vs_torch"] == 1.0
    for name in ("liger", "cce"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["note"]
