"""The step benchmark (dsunlearn/tools/bench_step.py) and the trainer's phase timing
(dsunlearn/runtime/step_timing.py): one ``--preset tiny`` run (paper loop, dsunlearn on 1 process and on 2 ranks)
shared by the tests; no timing assertions."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsunlearn.runtime import step_timing
from dsunlearn.tools import bench_cases, bench_step, paper_loop

REPO = Path(__file__).resolve().parents[2]
RUNS = ("paper", "dsunlearn x1", "dsunlearn x2")
ROW_FIELDS = {
    "run",
    "processes",
    "threads",
    "status",
    "step_s",
    "phase_s",
    "other_s",
    "real_tokens_per_step",
    "positions_per_step",
    "tokens_per_s",
    "padding_share",
    "peak_mem_mib",
    "baseline_mem_mib",
    "flop_floor_s",
    "floor_share",
    "step1_terms",
    "work",
    "speedup_vs_paper",
    "memory_vs_paper",
}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the benchmark's own process; each row's processes get their share
    done = subprocess.run(
        [sys.executable, "-m", "dsunlearn.tools.bench_step", "--preset", "tiny", "--cores", "2", "--out", str(out)],
        check=False,  # the exit code is asserted below, with the output
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.mark.distributed
@pytest.mark.integration
def test_tiny_preset_writes_every_field(tiny_bench):
    result = json.loads((tiny_bench / "bench_step.json").read_text())
    assert {
        "preset",
        "machine",
        "date",
        "command",
        "steps",
        "warmup",
        "matmul_gflops",
        "cores",
        "cases",
    } <= result.keys()
    (case,) = result["cases"]
    assert [row["run"] for row in case["rows"]] == list(RUNS)
    # Each row on the 2 cores asked for, as its processes reported them (summarise refuses other thread counts).
    assert [(row["processes"], row["threads"]) for row in case["rows"]] == [(1, 2), (1, 2), (2, 1)]
    for row in case["rows"]:
        assert row["status"] == "ok"
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert set(row["phase_s"]) == set(step_timing.PHASES + step_timing.ZERO3_PHASES)
        assert all(seconds >= 0 for seconds in row["phase_s"].values())
        assert row["peak_mem_mib"] > row["baseline_mem_mib"] > 0
        assert 0 <= row["padding_share"] < 1
    assert "| V=2048 realistic | dsunlearn x2 | 2 x 1 |" in (tiny_bench / "bench_step.md").read_text()


@pytest.mark.distributed
@pytest.mark.integration
def test_runs_do_the_same_work(tiny_bench):
    """Every run processed the same tokens in every step, and dsunlearn's packed rows run fewer positions than the
    paper loop's three padded batches."""
    (case,) = json.loads((tiny_bench / "bench_step.json").read_text())["cases"]
    paper, single, ranks = case["rows"]
    assert paper["work"] == single["work"] == ranks["work"]
    assert single["positions_per_step"] < paper["positions_per_step"]
    assert ranks["positions_per_step"] < paper["positions_per_step"]


@pytest.mark.distributed
@pytest.mark.integration
def test_paper_loop_losses_equal_dsunlearn_step_one_terms(tiny_bench):
    """Before any update the three loops compute the same terms: forget CE, random CE, and normal KL = 0."""
    (case,) = json.loads((tiny_bench / "bench_step.json").read_text())["cases"]
    paper = case["rows"][0]["step1_terms"]
    assert paper["normal_kl"] == 0.0
    for row in case["rows"][1:]:
        terms = row["step1_terms"]
        assert terms["forget_ce"] == pytest.approx(paper["forget_ce"], rel=1e-5)
        assert terms["random_ce"] == pytest.approx(paper["random_ce"], rel=1e-5)
        assert terms["normal_kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.integration
def test_work_check_fails_on_different_data(tiny_bench):
    """The paper loop on other data (another data seed: other examples and random answers) is refused against the
    trainer's steps; on the same data it is accepted."""
    runs = tiny_bench / "runs"
    trainer_steps = [
        json.loads(line)
        for line in (runs / "V2048_realistic" / "dsunlearn_x1" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    same = json.loads((runs / "V2048_realistic" / "paper" / "paper.json").read_text())["steps"]
    bench_step.check_same_work(same, trainer_steps, "same data")
    case = bench_cases.Case(
        "tiny",
        2048,
        "realistic",
        str(runs / "model_V2048"),
        str(runs / "data_realistic" / "forget.jsonl"),
        str(runs / "data_realistic" / "normal.jsonl"),
        steps=len(same),
    )
    other = paper_loop.paper_loop(dataclasses.replace(case, data_seed=1))["steps"]
    with pytest.raises(bench_cases.WorkMismatch, match="not the same work"):
        bench_step.check_same_work(other, trainer_steps, "other data")


def test_checksum_does_not_depend_on_padding():
    """A sequence's checksum is sum(id * BASE^i) mod the prime, computed here in plain integers, whatever the padding
    around it."""
    ids = [5, 17, 3, 250_000, 9]
    expected = (
        sum(t * pow(step_timing.CHECKSUM_BASE, i, step_timing.CHECKSUM_MODULUS) for i, t in enumerate(ids))
        % step_timing.CHECKSUM_MODULUS
    )
    right = torch.tensor([ids + [0, 0]]), torch.tensor([[1] * 5 + [0, 0]])
    left = torch.tensor([[7, 7] + ids]), torch.tensor([[0, 0] + [1] * 5])
    for input_ids, mask in (right, left, (torch.tensor([ids]), torch.ones(1, 5, dtype=torch.long))):
        assert step_timing.sequence_checksums(input_ids, mask).tolist() == [expected]
    work = step_timing.work_of(*right)
    assert work.tolist() == [5, 7, expected]


def test_method_rows_are_reported_against_graddiff():
    """The method rows (graddiff, npo x1, ...) show their step and memory over graddiff's, and the memory held."""

    def row(name, step_s, peak, held, **extra):
        return {
            "run": name,
            "processes": 1,
            "threads": 2,
            "status": "ok",
            "step_s": step_s,
            "phase_s": dict.fromkeys(step_timing.PHASES + step_timing.ZERO3_PHASES, 0.0),
            "other_s": 0.0,
            "tokens_per_s": 100.0,
            "padding_share": 0.1,
            "peak_mem_mib": peak,
            "baseline_mem_mib": 50.0,
            "held_mem_mib": held,
            "floor_share": 0.5,
            **extra,
        }

    result = {
        "preset": "cpu",
        "machine": "test",
        "date": "now",
        "command": "bench",
        "matmul_gflops": 1.0,
        "rate_unit": "core",
        "cores": 2,
        "warmup": 1,
        "steps": 3,
        "cases": [
            {
                "case": "V=128256 realistic",
                "rows": [
                    row("graddiff x1", 2.0, 800.0, 700.0),
                    row(
                        "npo x1", 2.1, 800.0, 700.0, step_vs_graddiff=1.05, memory_vs_graddiff=1.0, held_vs_graddiff=1.0
                    ),
                ],
            }
        ],
    }
    text = bench_step.format_markdown(result)
    assert "| V=128256 realistic | graddiff x1 | 1 x 2 | 2.000 | (methods' baseline) |" in text
    assert "| V=128256 realistic | npo x1 | 1 x 2 | 2.100 | 1.05x graddiff's step |" in text
    assert "| 1.00x graddiff's | 700 |" in text


def test_rows_share_the_cores():
    """Every row of a case runs on all the cores: 1 process of C threads (paper loop, dsunlearn x1), N ranks of C / N
    threads; the workers' OMP_NUM_THREADS says so; cores that do not split over the ranks are refused."""
    rows = [(s.name, s.processes, s.threads) for s in bench_step.run_settings(cores=2, ranks=2)]
    assert rows == [("paper", 1, 2), ("dsunlearn x1", 1, 2), ("dsunlearn x2", 2, 1)]
    rows = [(s.name, s.processes, s.threads) for s in bench_step.run_settings(cores=8, ranks=4)]
    assert rows == [("paper", 1, 8), ("dsunlearn x1", 1, 8), ("dsunlearn x4", 4, 2)]
    assert bench_step._worker_env(3)["OMP_NUM_THREADS"] == "3"
    for cores, ranks in ((3, 2), (1, 2), (0, 1)):
        with pytest.raises(ValueError, match="do not split evenly"):
            bench_step.run_settings(cores, ranks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the floor counts devices, not cores")
def test_floor_is_the_same_on_equal_cores():
    """The FLOP floor of a row is its FLOPs over the rate of one core times the row's cores: 2 x 1 and 1 x 2 get the
    same floor (6e9 FLOPs at 1e9 FLOP/s per core on 2 cores: 3 s); a process that ran another thread count than its
    row asks is refused."""

    def step(threads):
        return {
            "threads": threads,
            "step_s": 6.0,
            "phase_s": dict.fromkeys(step_timing.PHASES, 1.0),
            "real_tokens": 10,
            "positions": 12,
            "peak_mem_mib": 500.0,
            "baseline_mem_mib": 200.0,
            "forget_ce": 1.0,
            "random_ce": 2.0,
            "normal_kl": 0.0,
            "work_checksum": 7,
        }

    flops = [1e9, 6e9, 6e9]
    one = bench_step.summarise(bench_step.RunSettings("dsunlearn x1", 1, 2), [step(2)] * 3, 1, flops, 1e9)
    two = bench_step.summarise(bench_step.RunSettings("dsunlearn x2", 2, 1), [step(1)] * 3, 1, flops, 1e9)
    assert one["flop_floor_s"] == two["flop_floor_s"] == pytest.approx(3.0)
    assert one["floor_share"] == pytest.approx(0.5)
    assert (one["processes"], one["threads"], two["processes"], two["threads"]) == (1, 2, 2, 1)
    with pytest.raises(RuntimeError, match="ran with \\[1\\] torch threads, not the 2 asked"):
        bench_step.summarise(bench_step.RunSettings("paper", 1, 2), [step(1)] * 3, 1, flops, 1e9)


def test_every_row_of_a_case_runs_on_all_the_cores(monkeypatch, tmp_path):
    """run_case starts the paper loop, dsunlearn x1 and each method row as 1 process of C threads and dsunlearn x2 as
    2 ranks of C / 2 (the runners replaced by recorders: no process is started)."""
    started = []

    def steps(threads):
        return [
            {
                "threads": threads,
                "step_s": 1.0,
                "phase_s": dict.fromkeys(step_timing.PHASES, 0.1),
                "real_tokens": 10,
                "positions": 12,
                "peak_mem_mib": 500.0,
                "held_mem_mib": 400.0,
                "baseline_mem_mib": 200.0,
                "forget_ce": 1.0,
                "random_ce": 2.0,
                "normal_kl": 0.0,
                "work_checksum": 7,
                "flops": 1e9,
            }
        ] * 3

    def run_paper(case, run_dir, threads):
        started.append(("paper", 1, threads))
        return steps(threads)

    def run_dsunlearn(case, ranks, threads, run_dir, method="yao"):
        started.append((method, ranks, threads))
        return steps(threads)

    monkeypatch.setattr(bench_step, "run_paper", run_paper)
    monkeypatch.setattr(bench_step, "run_dsunlearn", run_dsunlearn)
    monkeypatch.setattr(bench_step, "step_flops", lambda case, step: 1e9)
    monkeypatch.setattr(bench_step, "_why_not", lambda processes: None)
    case = bench_cases.Case("tiny", 2048, "realistic", "model", "forget", "normal", steps=3)
    result = bench_step.run_case(case, tmp_path, 1, bench_step.run_settings(4, 2), 1e9, methods=("npo",))
    assert started == [("paper", 1, 4), ("yao", 1, 4), ("yao", 2, 2), ("graddiff", 1, 4), ("npo", 1, 4)]
    rows = [(row["run"], row["processes"], row["threads"]) for row in result["rows"]]
    assert rows == [
        ("paper", 1, 4),
        ("dsunlearn x1", 1, 4),
        ("dsunlearn x2", 2, 2),
        ("graddiff x1", 1, 4),
        ("npo x1", 1, 4),
    ]
