"""Step benchmark: a paper-style unlearning loop against dsunlearn (1 process and N ranks under ZeRO-3) on the same
work (DESIGN.md, issue 9; notes and results in dsunlearn/BENCHMARKS.md).

    python -m dsunlearn.tools.bench_step [--preset cpu|tiny|gpu] [--out DIR] [--steps S --warmup W --ranks N]
                                         [--cores C]

For each vocabulary and length profile of the preset it builds, locally, a tiny Llama (random weights; the model's
vocabulary may exceed its tokenizer's) and synthetic forget/normal data whose token lengths it controls:
``equal`` (every sequence ``max_length`` tokens: responses longer than that, cut) and ``realistic`` (forget responses
of 90-170 words, normal answers, which are also the random answers, of 8-25, prompts of 6-16; one word is one token).
Then it runs, each in its own processes:

* ``paper``: the authors' loop (kevinyaobytedance/llm_unlearn): three policy forwards (forget, random, normal), each
  padded on its own, materialised logits, a full second copy of the model as the reference with a forward every
  step, the true KL on normal response tokens, torch AdamW; its batches come from ``StepData`` as the trainer's do;
* ``dsunlearn x1``: ``python -m dsunlearn train`` on 1 rank (ZeRO-3);
* ``dsunlearn xN``: the same on N ranks, started as srun does (RANK/WORLD_SIZE/... in the environment), the global
  batch kept (per-rank batches divided by N);
* with ``--methods`` (the cpu and gpu presets: npo, simnpo): ``graddiff x1`` and ``METHOD x1``, the trainer with
  configs/presets/METHOD.yaml on 1 process: no random answers, so their work is their own, the same for all of them
  (checked), and each method's step is compared with graddiff's (GA + NLL: the same tokens, no first pass, no
  reference). ``held MiB`` is the memory a process holds at the end of a step: an npo run, whose reference is freed
  after its one s_ref pass, holds what graddiff holds.

Every row of a case runs on the same total cores C (``--cores``, default: the cores this process may run on): a row
of P processes runs each with C / P torch threads (OMP_NUM_THREADS), so the paper loop and ``dsunlearn x1`` run one
process of C threads and ``dsunlearn xN`` N ranks of C / N threads. Ratios between rows are then at equal hardware,
not throughput per core. Each row says its processes x threads, as the processes reported them.

The trainer runs with ``train.time_phases`` on, so its phases come from the real loop
(dsunlearn/runtime/step_timing.py). Every step's real tokens and token-id checksum must be equal across the runs, else
the benchmark stops with an error.
Steps after ``--warmup`` count. Reported per run: seconds per step and per phase (ZeRO-3 gathers and reduces are
"of which" inside forward and backward), real tokens per second, the share of padded policy positions, peak memory
per process (peak RSS on the CPU, with the RSS after imports as the baseline; ``max_memory_allocated`` on a GPU), the
step's FLOP floor (the FLOPs the real tokens need, at the ``torch.mm`` rate of one core measured in this run times
the C cores, or of one device times the processes on a GPU: the same floor for every row of a case on the CPU) and
the share of it reached, and ratios to the paper loop. Writes DIR/bench_step.json and DIR/bench_step.md.

The cases, their model and data are built by :mod:`dsunlearn.tools.bench_cases`; the paper loop is
:mod:`dsunlearn.tools.paper_loop`; this module runs the three and writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsunlearn.tools.bench_cases import (
    PRESETS,
    Case,
    WorkMismatch,
    build_model,
    build_run_config,
    write_data,
    write_run_yaml,
)
from dsunlearn.tools.paper_loop import paper_loop

RUN_TIMEOUT_S = 1800  # only stops a hung run
PREEMPTION_RESUMES = 2
EXIT_PREEMPTED = 75  # dsunlearn.runtime.distributed.EXIT_PREEMPTED, not imported: the paper loop runs without deepspeed


# --------------------------------------------------------------------------------------------------------------------
# Running the three
# --------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(processes: list, logs: list[Path]) -> list[int]:
    """The exit codes of ``processes``, killed if they outlast ``RUN_TIMEOUT_S``."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _failed(what: str, codes: list[int], logs: list[Path]) -> RuntimeError:
    tail = "".join(log.read_text(errors="replace")[-3000:] for log in logs)
    return RuntimeError(f"{what} exited {codes}:\n{tail}")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How one row of a case runs."""

    name: str
    processes: int
    threads: int  # torch threads of each process (OMP_NUM_THREADS)

    @property
    def rate_units(self) -> int:
        """How many of the measured ``torch.mm`` rates the row has: its cores on the CPU, its devices on a GPU."""
        return self.processes if torch.cuda.is_available() else self.processes * self.threads


def run_settings(cores: int, ranks: int) -> list[RunSettings]:
    """The rows of a case on ``cores`` cores in all: the paper loop and dsunlearn on 1 process of ``cores`` threads,
    dsunlearn on ``ranks`` ranks of ``cores / ranks`` threads each."""
    if cores < 1 or ranks < 1 or cores % ranks:
        raise ValueError(f"{cores} cores do not split evenly over {ranks} ranks: every row must run on all the cores")
    return [
        RunSettings("paper", 1, cores),
        RunSettings("dsunlearn x1", 1, cores),
        RunSettings(f"dsunlearn x{ranks}", ranks, cores // ranks),
    ]


def _worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_paper(case: Case, run_dir: Path, threads: int) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    result, log = run_dir / "paper.json", run_dir / "paper.log"
    command = [
        sys.executable,
        "-m",
        "dsunlearn.tools.bench_step",
        "--paper-worker",
        json.dumps(dataclasses.asdict(case)),
        "--worker-result",
        str(result),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=_worker_env(threads), stdout=out, stderr=subprocess.STDOUT)
    codes = _wait([process], [log])
    if codes != [0]:
        raise _failed("the paper loop", codes, [log])
    return json.loads(result.read_text())["steps"]


def run_dsunlearn(case: Case, ranks: int, threads: int, run_dir: Path, method: str = "yao") -> list[dict]:
    """``python -m dsunlearn train`` on ``ranks`` ranks of ``threads`` threads, started as srun does, with the objective
    of preset ``method``; the rows of its metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_run_yaml(build_run_config(case, ranks, str(run_dir / "run"), method), run_dir / "run.yaml")
    start = ["--overwrite", "true"]
    for attempt in range(PREEMPTION_RESUMES + 1):
        port = str(_free_port())
        processes, logs = [], []
        for rank in range(ranks):
            env = dict(
                _worker_env(threads),
                RANK=str(rank),
                WORLD_SIZE=str(ranks),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            logs.append(run_dir / f"rank{rank}.attempt{attempt}.log")
            with open(logs[-1], "w") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dsunlearn", "train", "--config", str(config), *start],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        codes = _wait(processes, logs)
        if not any(codes):
            break
        # A SIGTERM from outside (the CI machines send one now and then, see tests/launching.py) stops the ranks after
        # a saved step: finish the run as a user would, by resuming it (metrics.jsonl keeps the steps done).
        if set(codes) != {EXIT_PREEMPTED} or attempt == PREEMPTION_RESUMES:
            raise _failed(f"dsunlearn on {ranks} ranks", codes, logs)
        start = ["--resume", "true"]
    lines = (run_dir / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_same_work(reference_steps: list[dict], steps: list[dict], what: str, against: str = "the paper loop") -> None:
    """Raise ``WorkMismatch`` unless every step of ``steps`` has the real tokens and token checksum of the same step
    of ``reference_steps`` (those of ``against``)."""
    if len(steps) != len(reference_steps):
        raise WorkMismatch(f"{what}: {len(steps)} steps, {against} {len(reference_steps)}")
    for ours, theirs in zip(steps, reference_steps):
        if (ours["real_tokens"], ours["work_checksum"]) != (theirs["real_tokens"], theirs["work_checksum"]):
            raise WorkMismatch(
                f"{what}, step {ours['step']}: {ours['real_tokens']} tokens with checksum {ours['work_checksum']}, "
                f"{against} {theirs['real_tokens']} with {theirs['work_checksum']}: not the same work"
            )


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int, repeats: int = 5) -> float:
    """FLOP/s of one ``torch.mm`` of [size, size] matrices on one core (CPU) or the device; the best of ``repeats``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        best = float("inf")
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best
    finally:
        torch.set_num_threads(threads)


def summarise(settings: RunSettings, steps: list[dict], warmup: int, flops_per_step: list[int], rate: float) -> dict:
    """One run's row: means over the steps after ``warmup``; its FLOP floor at ``rate`` per core (device)."""
    threads = {s["threads"] for s in steps}
    if threads != {settings.threads}:
        raise RuntimeError(
            f"{settings.name} ran with {sorted(threads)} torch threads, not the {settings.threads} asked"
        )
    measured = steps[warmup:]
    step_s = statistics.fmean(s["step_s"] for s in measured)
    phase_s = {k: statistics.fmean(s["phase_s"][k] for s in measured) for k in measured[0]["phase_s"]}
    in_phases = sum(v for k, v in phase_s.items() if not k.startswith("zero3_"))
    tokens = sum(s["real_tokens"] for s in measured)
    positions = sum(s["positions"] for s in measured)
    floor_s = statistics.fmean(flops_per_step[warmup:]) / (rate * settings.rate_units)
    return {
        "run": settings.name,
        "processes": settings.processes,
        "threads": settings.threads,
        "status": "ok",
        "step_s": step_s,
        "phase_s": phase_s,
        "other_s": step_s - in_phases,
        "real_tokens_per_step": tokens / len(measured),
        "positions_per_step": positions / len(measured),
        "tokens_per_s": tokens / sum(s["step_s"] for s in measured),
        "padding_share": 1 - tokens / positions,
        "peak_mem_mib": max(s["peak_mem_mib"] for s in measured),
        "held_mem_mib": max(s.get("held_mem_mib", 0.0) for s in measured),
        "baseline_mem_mib": measured[0]["baseline_mem_mib"],
        "flop_floor_s": floor_s,
        "floor_share": floor_s / step_s,
        "step1_terms": {k: steps[0].get(k) for k in ("forget_ce", "random_ce", "normal_kl", "normal_ce")},
        "work": [[s["real_tokens"], s["work_checksum"]] for s in steps],
    }


def run_case(
    case: Case,
    work_dir: Path,
    warmup: int,
    runs: list[RunSettings],
    rate: float,
    methods: tuple = (),
    methods_only: bool = False,
) -> dict:
    """The runs of one case (``run_settings``: the paper loop first), checked for the same work, with ratios to the
    paper loop; then the method rows on 1 process of the paper loop's threads (``methods_only``: those alone)."""
    case_dir = work_dir / case.name.replace(" ", "_").replace("=", "")
    paper_run, *trainers = runs
    if methods_only:
        return {
            "case": case.name,
            "vocab_size": case.vocab_size,
            "lengths": case.profile,
            "rows": method_rows(case, case_dir, methods, warmup, rate, paper_run.threads),
        }
    paper_steps = run_paper(case, case_dir / "paper", paper_run.threads)
    flops = [s["flops"] for s in paper_steps]
    rows = [summarise(paper_run, paper_steps, warmup, flops, rate)]
    for settings in trainers:
        skip = _why_not(settings.processes)
        if skip:
            rows.append(
                {
                    "run": settings.name,
                    "processes": settings.processes,
                    "threads": settings.threads,
                    "status": "skipped",
                    "note": skip,
                }
            )
            continue
        steps = run_dsunlearn(case, settings.processes, settings.threads, case_dir / settings.name.replace(" ", "_"))
        check_same_work(paper_steps, steps, f"{case.name}: {settings.name}")
        rows.append(summarise(settings, steps, warmup, flops, rate))
    paper = rows[0]
    for row in rows:
        if row["status"] == "ok":
            row["speedup_vs_paper"] = paper["step_s"] / row["step_s"]
            row["memory_vs_paper"] = row["peak_mem_mib"] / paper["peak_mem_mib"]
    if methods and not _why_not(1):
        rows += method_rows(case, case_dir, methods, warmup, rate, paper_run.threads)
    return {"case": case.name, "vocab_size": case.vocab_size, "lengths": case.profile, "rows": rows}


def method_rows(case: Case, case_dir: Path, methods: tuple, warmup: int, rate: float, threads: int) -> list[dict]:
    """``graddiff x1`` and ``METHOD x1`` for each of ``methods``: the trainer on 1 process of ``threads`` threads with
    those presets, on the same work (checked against graddiff's), each with its step time and memory over graddiff's."""
    base_steps = run_dsunlearn(case, 1, threads, case_dir / "graddiff_x1", "graddiff")
    # The FLOP floor of the work these runs do (forget and normal tokens, no random answers): that of graddiff's step
    flops = [step_flops(case, step) for step in base_steps]
    base = summarise(RunSettings("graddiff x1", 1, threads), base_steps, warmup, flops, rate)
    rows = [base]
    for method in methods:
        steps = run_dsunlearn(case, 1, threads, case_dir / f"{method}_x1", method)
        check_same_work(base_steps, steps, f"{case.name}: {method} x1", against="graddiff x1")
        row = summarise(RunSettings(f"{method} x1", 1, threads), steps, warmup, flops, rate)
        row["step_vs_graddiff"] = row["step_s"] / base["step_s"]
        row["memory_vs_graddiff"] = row["peak_mem_mib"] / base["peak_mem_mib"]
        row["held_vs_graddiff"] = row["held_mem_mib"] / base["held_mem_mib"]
        rows.append(row)
    return rows


def step_flops(case: Case, step: dict) -> int:
    """A floor of the FLOPs a method row's step needs, whose work is not the paper loop's: 6 x the transformer
    layers' parameters x its real tokens (trained forward and backward; the head and attention left out)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(case.model_dir)
    hidden = config.hidden_size
    layer_parameters = 4 * hidden * hidden + 3 * hidden * config.intermediate_size  # attention and MLP of a Llama
    return 6 * config.num_hidden_layers * layer_parameters * step["real_tokens"]


def _why_not(processes: int) -> str | None:
    """Why dsunlearn cannot run on ``processes`` processes here (None: it can)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed on this machine"
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        return f"{processes} ranks need {processes} GPUs, this machine has {torch.cuda.device_count()}"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), torch {torch.__version__}"


PHASE_COLUMNS = (
    ("batch", "batch"),
    ("policy_forward", "policy fwd"),
    ("reference_forward", "ref fwd"),
    ("head_loss", "head+loss"),
    ("backward", "backward"),
    ("optimizer", "optim"),
    ("zero3_gather", "of which gathers"),
    ("zero3_reduce", "of which reduce"),
)


def format_markdown(result: dict) -> str:
    header = (
        [
            "case",
            "run",
            "procs x threads",
            "s/step",
            "vs paper",
            "tokens/s",
            "padded",
            "peak MiB/proc",
            "mem vs paper",
            "held MiB",
            "floor share",
        ]
        + [label for _, label in PHASE_COLUMNS]
        + ["other"]
    )
    lines = [
        f"Step benchmark, preset {result['preset']}: {result['machine']}, {result['date']}",
        (
            f"`{result['command']}`; every row on {result['cores']} cores in all; matmul rate "
            f"{result['matmul_gflops']:.1f} GFLOP/s per {result['rate_unit']}; "
            f"means over steps {result['warmup'] + 1}-{result['steps']}; phase times in ms"
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for case in result["cases"]:
        for row in case["rows"]:
            if row["status"] != "ok":
                lines.append(
                    f"| {case['case']} | {row['run']} | {row['processes']} x {row['threads']} | "
                    f"{row['status']}: {row['note']} |"
                )
                continue
            phases = [f"{1000 * row['phase_s'][key]:.0f}" for key, _ in PHASE_COLUMNS]
            if "speedup_vs_paper" in row:
                speed, memory = _ratio(row["speedup_vs_paper"], "faster", "slower"), _ratio(row["memory_vs_paper"])
            elif "step_vs_graddiff" in row:  # a method row: its step and peak over graddiff's, on their own work
                speed = f"{row['step_vs_graddiff']:.2f}x graddiff's step"
                memory = f"{row['memory_vs_graddiff']:.2f}x graddiff's"
            else:  # graddiff's row, the methods' baseline
                speed = memory = "(methods' baseline)"
            lines.append(
                "| "
                + " | ".join(
                    [
                        case["case"],
                        row["run"],
                        f"{row['processes']} x {row['threads']}",
                        f"{row['step_s']:.3f}",
                        speed,
                        f"{row['tokens_per_s']:.0f}",
                        f"{100 * row['padding_share']:.0f}%",
                        f"{row['peak_mem_mib']:.0f} (base {row['baseline_mem_mib']:.0f})",
                        memory,
                        f"{row['held_mem_mib']:.0f}",
                        f"{100 * row['floor_share']:.1f}%",
                        *phases,
                        f"{1000 * row['other_s']:.0f}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _ratio(value: float, above: str = "", below: str = "") -> str:
    """``1.37x faster`` / ``1.25x slower`` for a speed ratio, ``0.55x`` for a memory ratio; the paper row is ``-``."""
    if value == 1.0:
        return "-"
    if below and value < 1:
        return f"{1 / value:.2f}x {below}"
    return f"{value:.2f}x {above}".rstrip()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m dsunlearn.tools.bench_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, help="write OUT/bench_step.json and OUT/bench_step.md (and keep the runs)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the means (default: the preset's)")
    parser.add_argument("--ranks", type=int, help="ranks of the multi-rank run (default: the preset's)")
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=("ga", "graddiff", "npo", "simnpo"),
        help="presets run on 1 process against graddiff (default: the preset's; none: no such rows)",
    )
    parser.add_argument(
        "--methods-only",
        action="store_true",
        help="only the method rows (graddiff and --methods), no paper loop or yao runs",
    )
    parser.add_argument("--vocab-sizes", type=int, nargs="+", help="these of the preset's vocabularies (default: all)")
    parser.add_argument(
        "--profiles", nargs="+", choices=("equal", "realistic"), help="these length profiles (default: the preset's)"
    )
    parser.add_argument(
        "--cores",
        type=int,
        help="total cores of every row, split over its processes as torch threads "
        "(default: the cores this process may run on)",
    )
    parser.add_argument("--paper-worker", help=argparse.SUPPRESS)  # internal: the paper loop's subprocess
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.paper_worker:
        result = paper_loop(Case(**json.loads(args.paper_worker)))
        args.worker_result.write_text(json.dumps(result))
        return result
    preset = PRESETS[args.preset]
    steps, warmup = args.steps or preset.steps, preset.warmup if args.warmup is None else args.warmup
    ranks = args.ranks or preset.ranks
    methods = preset.methods if args.methods is None else tuple(args.methods)
    cores = args.cores or len(os.sched_getaffinity(0))
    if not 0 <= warmup < steps:
        raise SystemExit(f"--warmup {warmup} must leave at least one of the {steps} steps")
    if args.methods_only and not methods:
        raise SystemExit("--methods-only needs methods (--methods npo simnpo)")
    try:
        runs = run_settings(cores, ranks)
    except ValueError as error:
        raise SystemExit(f"--cores {cores}, --ranks {ranks}: {error}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from dsunlearn.runtime.engines import PRECISION_DTYPES

    rate = matmul_rate(PRECISION_DTYPES[preset.precision], device, 8192 if device.type == "cuda" else 1024)
    cases = []
    result = {
        "preset": args.preset,
        "machine": machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m dsunlearn.tools.bench_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": steps,
        "warmup": warmup,
        "matmul_gflops": rate / 1e9,
        "rate_unit": "device" if device.type == "cuda" else "core",
        "cores": cores,
        "settings": dataclasses.asdict(preset),
        "cases": cases,
    }
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.out / "runs" if args.out else Path(scratch)
        for vocab_size in args.vocab_sizes or preset.vocab_sizes:
            model_dir = build_model(work_dir / f"model_V{vocab_size}", preset, vocab_size)
            for profile in args.profiles or preset.length_profiles:
                forget, normal = write_data(work_dir / f"data_{profile}", preset, profile)
                case = Case(args.preset, vocab_size, profile, str(model_dir), str(forget), str(normal), steps)
                cases.append(run_case(case, work_dir, warmup, runs, rate, methods, args.methods_only))
                print(f"done: {case.name}", file=sys.stderr, flush=True)
                if args.out:  # after every case, so a later failure keeps the cases done
                    write_result(args.out, result)
    print(format_markdown(result))
    return result


def write_result(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step.json").write_text(json.dumps(result, indent=1))
    (out / "bench_step.md").write_text(format_markdown(result))


if __name__ == "__main__":
    main()
