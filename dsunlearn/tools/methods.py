"""``python -m dsunlearn methods``: the unlearning methods side by side on the bundled demos, with their intervals
and how fast each forgotten behaviour comes back.

    python -m dsunlearn methods --out_dir outputs/methods [--methods yao ga graddiff npo simnpo]
        [--applications harmful copyright hallucination] [--lrs 1e-4 3e-4 1e-3] [--tune_on harmful]
        [--kl_limit 0.1] [--relearn_steps 50] [--nproc 1] [-- --train.max_steps 30 ...]

Every method is a preset (``configs/presets/METHOD.yaml``) over an application's demo config
(:data:`APPLICATIONS`), and every run gets the same budget: the demo's steps, batches, seed and data; only the
learning rate is chosen per method, from the same grid for all (``--lrs``), on one application (``--tune_on``):
the rate whose unlearned model shows the lowest ``forget_train`` behaviour rate while its ``normal_held_out`` KL
stays within ``--kl_limit`` nats/token (ties: the lower KL; none within the limit: the lowest KL). That rate then
runs on every application. A run is ``launch.sh`` with ``output.evaluate`` on (so a laptop, a GPU node or a SLURM
allocation run it alike), into ``OUT_DIR/APPLICATION/METHOD-lrLR``; its export is then fine-tuned on half of the
forget train prompts (``python -m dsunlearn relearn``, into ``relearn/`` beside it) to count the steps until the
behaviour comes back.

Resumable as the sweep is: a run with ``eval/eval.json`` is skipped, an unfinished one resumed, a relearning with
``relearn.json`` kept; a run stopped by SIGTERM (exit 75) stops the command with that code, and a failed one is
reported while the others go on. Report: ``OUT_DIR/methods.md`` (one table per application, each value with its
bootstrap interval) and ``methods.json`` (every number, the grid's included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from dsunlearn.eval.report import format_value
from dsunlearn.runtime import distributed
from dsunlearn.tools.sweep import launch_run, split_at_double_dash

logger = logging.getLogger("dsunlearn.tools.methods")

REPO = Path(__file__).resolve().parents[2]
APPLICATIONS = {
    "harmful": "configs/demo.yaml",
    "copyright": "configs/demo-copyright.yaml",
    "hallucination": "configs/demo-hallucination.yaml",
}
"""Each application's demo config, relative to the checkout (its model is built by ``make-demo`` when missing)."""
METHODS = ("yao", "ga", "graddiff", "npo", "simnpo")
"""The presets compared, each ``configs/presets/NAME.yaml``."""
MIA_ATTACK = "min_k"
"""The membership-inference attack the table shows (MUSE's PrivLeak uses Min-K% Prob); eval.json holds all four."""


@dataclass
class Plan:
    """What one ``methods`` command runs."""

    out_dir: Path
    methods: Sequence[str]
    applications: Sequence[str]
    lrs: Sequence[float]
    tune_on: str
    kl_limit: float
    relearn_steps: int
    relearn_eval_every: int
    relearn_lr: float
    relearn_max_samples: Optional[int]
    nproc: Optional[int]
    extra: Sequence[str]

    def run_dir(self, application: str, method: str, lr: float) -> Path:
        return self.out_dir / application / f"{method}-lr{lr:g}"


def select_lr(results: dict[float, dict], kl_limit: float) -> float:
    """The learning rate whose run forgets most (lowest forget_train behaviour rate) with its normal KL within
    ``kl_limit``; ties go to the lower KL, then the lower rate; with none within the limit, the lowest KL.
    ``results``: ``{lr: {"forgetting": ..., "normal_kl": ...}}``."""
    within = [lr for lr, row in results.items() if row["normal_kl"] <= kl_limit]
    if within:
        return min(within, key=lambda lr: (results[lr]["forgetting"], results[lr]["normal_kl"], lr))
    return min(results, key=lambda lr: (results[lr]["normal_kl"], lr))


def run_numbers(run_dir: Path) -> dict:
    """The table's numbers of one evaluated run (``eval/eval.json``), each ``{"value", "ci"}``, plus the original
    model's behaviour rate and MIA AUC (the row each table starts with)."""
    summary = json.loads((run_dir / "eval" / "eval.json").read_text())

    def metric(role: str, set_name: str, name: str) -> dict:
        found = summary[role].get(set_name, {})
        return {"value": found.get(name), "ci": found.get("ci", {}).get(name)}

    def mia(role: str) -> dict:
        result = summary.get("mia") or {}
        return {
            "value": (result.get("auc") or {}).get(MIA_ATTACK, {}).get(role),
            "ci": ((result.get("auc_ci") or {}).get(MIA_ATTACK) or {}).get(role),
        }

    return {
        "forgetting": summary["unlearned"]["forget_train"]["behaviour_rate"],
        "normal_kl": summary["unlearned"]["normal_held_out"]["kl"],
        "forget_train": metric("unlearned", "forget_train", "behaviour_rate"),
        "forget_held_out": metric("unlearned", "forget_held_out", "behaviour_rate"),
        "normal_kl_ci": metric("unlearned", "normal_held_out", "kl"),
        "normal_reproduction": metric("unlearned", "normal_held_out", "reproduction_rate"),
        "fluency": metric("unlearned", "forget_train", "fluency_ppl"),
        "mia": mia("unlearned"),
        "original": {
            "forget_train": metric("original", "forget_train", "behaviour_rate"),
            "forget_held_out": metric("original", "forget_held_out", "behaviour_rate"),
            "normal_reproduction": metric("original", "normal_held_out", "reproduction_rate"),
            "fluency": metric("original", "forget_train", "fluency_ppl"),
            "mia": mia("original"),
        },
    }


def relearn_numbers(relearn_json: Path) -> dict:
    """Steps until the behaviour is back at 50% and 90% of the original's, and the last measured rate with its
    interval."""
    result = json.loads(relearn_json.read_text())
    last = result["curve"][-1]
    return {
        "steps_to_half": result["recovery_steps"].get("0.5"),
        "steps_to_90": result["recovery_steps"].get("0.9"),
        "last_step": last["step"],
        "last_rate": {"value": last["behaviour_rate"], "ci": last.get("ci")},
        "original_rate": result["original_rate"],
    }


def original_model(application: str, extra: Sequence[str]) -> Path:
    """The model every run of ``application`` starts from: ``--model.name_or_path`` after ``--``, else the demo
    config's, built with ``make-demo`` when missing."""
    if "--model.name_or_path" in extra[:-1]:
        return Path(extra[list(extra).index("--model.name_or_path") + 1]).resolve()
    config = yaml.safe_load((REPO / APPLICATIONS[application]).read_text())
    path = REPO / config["model"]["name_or_path"]
    if not (path / "config.json").is_file():
        logger.info("building the %s demo's original model into %s", application, path)
        command = [sys.executable, "-m", "dsunlearn", "make-demo", "--application", application, "--out", str(path)]
        subprocess.run(command, cwd=REPO, check=True)
    return path


def train(plan: Plan, application: str, method: str, lr: float) -> Optional[int]:
    """Train and evaluate one (application, method, lr) run unless it is evaluated already; the launcher's exit code
    (None: skipped). Exit 75 (stopped by SIGTERM) stops the whole command."""
    run_dir = plan.run_dir(application, method, lr)
    if (run_dir / "eval" / "eval.json").is_file():
        logger.info("%s: evaluated before, skipped", run_dir)
        return None
    train_args = ["--config", str(REPO / APPLICATIONS[application]),
                  "--config", str(REPO / "configs" / "presets" / f"{method}.yaml"),
                  *plan.extra, "--train.lr", repr(lr)]
    code = launch_run(train_args, run_dir, plan.nproc)
    if code == distributed.EXIT_PREEMPTED:
        logger.info("methods stopped at %s (exit %d): run the same command again to continue", run_dir, code)
        raise SystemExit(code)
    return code


def relearn(plan: Plan, run_dir: Path, original: Path, method: str) -> int:
    """Fine-tune the run's export on forget data (``dsunlearn relearn``, in this process, with the run's own data
    settings) into ``run_dir/relearn`` unless done before; 0, or the exit code of its error."""
    out_dir = run_dir / "relearn"
    if (out_dir / "relearn.json").is_file():
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    settings = {
        "model_path": str(run_dir / "final"), "original_path": str(original), "data": data,
        "steps": plan.relearn_steps, "eval_every": plan.relearn_eval_every, "lr": plan.relearn_lr, "batch_size": 8,
        "max_eval_samples": plan.relearn_max_samples, "output_dir": str(out_dir), "name": method,
    }
    (out_dir / "relearn.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    from dsunlearn.eval.relearn import main as relearn_main

    logger.info("relearning %s (python -m dsunlearn relearn --config %s)", run_dir, out_dir / "relearn.yaml")
    previous = os.getcwd()
    os.chdir(REPO)  # the data sources are named relative to the checkout, as the training runs read them
    try:
        relearn_main(["--config", str(out_dir / "relearn.yaml")])
    except SystemExit as stopped:
        return stopped.code if isinstance(stopped.code, int) else distributed.EXIT_FAILED
    except Exception:
        logger.exception("relearning %s failed", run_dir)
        return distributed.EXIT_FAILED
    finally:
        os.chdir(previous)
    return 0


def run_plan(plan: Plan) -> dict:
    """Every run of the plan (the tuning grid first), then their numbers: ``{"chosen_lr", "grid", "applications"}``;
    failed runs are listed under ``"failed"``."""
    failed: list[str] = []
    originals = {application: original_model(application, plan.extra) for application in plan.applications}
    grid: dict[str, dict[str, dict]] = {}
    chosen_lr: dict[str, float] = {}
    for method in plan.methods:
        results = {}
        for lr in plan.lrs:
            code = train(plan, plan.tune_on, method, lr)
            run_dir = plan.run_dir(plan.tune_on, method, lr)
            if code:
                failed.append(f"{run_dir} (exit {code})")
                continue
            results[lr] = run_numbers(run_dir)
        if not results:
            continue
        chosen_lr[method] = select_lr(results, plan.kl_limit)
        grid[method] = {f"{lr:g}": {"forgetting": row["forgetting"], "normal_kl": row["normal_kl"]}
                        for lr, row in results.items()}
        logger.info("%s: lr %g chosen on %s", method, chosen_lr[method], plan.tune_on)
    tables: dict[str, dict] = {}
    for application in plan.applications:
        rows = {}
        for method, lr in chosen_lr.items():
            run_dir = plan.run_dir(application, method, lr)
            code = train(plan, application, method, lr) if application != plan.tune_on else None
            if code:
                failed.append(f"{run_dir} (exit {code})")
                continue
            code = relearn(plan, run_dir, originals[application], method)
            if code:
                failed.append(f"{run_dir / 'relearn'} (exit {code})")
                continue
            rows[method] = {"lr": lr, "dir": str(run_dir), **run_numbers(run_dir),
                            "relearn": relearn_numbers(run_dir / "relearn" / "relearn.json")}
        tables[application] = rows
    return {"tune_on": plan.tune_on, "lrs": list(plan.lrs), "kl_limit": plan.kl_limit, "grid": grid,
            "chosen_lr": chosen_lr, "applications": tables, "failed": failed}


def write_methods_report(out_dir: Path, result: dict) -> Path:
    """``methods.json`` and ``methods.md``: per application, the original model's row, then one row per method."""
    (out_dir / "methods.json").write_text(json.dumps(result, indent=2) + "\n")

    def cell(number: Optional[dict]) -> str:
        return "–" if number is None else format_value(number["value"], number["ci"])

    lines = ["# Unlearning methods on the bundled demos", "",
             f"Learning rate of each method chosen on `{result['tune_on']}` from {result['lrs']}: the lowest "
             f"forget_train behaviour rate with normal_held_out KL <= {result['kl_limit']} nats/token. Every run "
             "has the demo's steps, batches and seed. Behaviour: the application's behaviour rate (lower is better); "
             f"normal KL in nats/token; fluency: perplexity of the forget-prompt generations under the original "
             f"model; MIA: ROC AUC of the `{MIA_ATTACK}` attack between forget_train and never-seen holdout prompts "
             "(0.5: indistinguishable); relearning: steps of fine-tuning on half the forget train prompts until the "
             "behaviour is back at 50% / 90% of the original's ('>N': not within N), and the rate after the last "
             "step. Values are `value [low, high]`, the 95% bootstrap interval.", ""]
    header = ("| method | lr | forget train behaviour | forget held-out behaviour | normal KL | normal reproduction | "
              "fluency ppl | MIA AUC | relearn steps to 50% / 90% | behaviour after relearning |")
    for application, rows in result["applications"].items():
        if not rows:
            continue
        lines += [f"## {application}", "", header, "|---|---:|" + "---:|" * 8]
        original = next(iter(rows.values()))["original"]
        lines.append(f"| original | – | {cell(original['forget_train'])} | {cell(original['forget_held_out'])} | 0 | "
                     f"{cell(original['normal_reproduction'])} | {cell(original['fluency'])} | "
                     f"{cell(original['mia'])} | – | – |")
        for method, row in rows.items():
            relearned = row["relearn"]
            steps = " / ".join(
                str(found) if found is not None else f">{relearned['last_step']}"
                for found in (relearned["steps_to_half"], relearned["steps_to_90"])
            )
            lines.append(
                f"| {method} | {row['lr']:g} | {cell(row['forget_train'])} | {cell(row['forget_held_out'])} | "
                f"{cell(row['normal_kl_ci'])} | {cell(row['normal_reproduction'])} | {cell(row['fluency'])} | "
                f"{cell(row['mia'])} | {steps} | {cell(relearned['last_rate'])} (step {relearned['last_step']}) |"
            )
        lines.append("")
    if result["grid"]:
        lines += [f"## Learning-rate grid on {result['tune_on']}", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in result["lrs"]) + " | chosen |",
                  "|---|" + "---|" * (len(result["lrs"]) + 1)]
        for method, by_lr in result["grid"].items():
            cells = [
                f"{by_lr[f'{lr:g}']['forgetting']:.3g} / {by_lr[f'{lr:g}']['normal_kl']:.3g}"
                if f"{lr:g}" in by_lr else "failed"
                for lr in result["lrs"]
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {result['chosen_lr'][method]:g} |")
        lines += ["", "(each cell: forget_train behaviour rate / normal_held_out KL)", ""]
    if result["failed"]:
        lines += ["Failed: " + "; ".join(result["failed"]), ""]
    report = out_dir / "methods.md"
    report.write_text("\n".join(lines))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsunlearn methods", description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- go to every training run.")
    parser.add_argument("--out_dir", required=True, help="one folder per application and run inside, and the report")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="presets compared")
    parser.add_argument("--applications", nargs="+", default=list(APPLICATIONS), choices=list(APPLICATIONS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3],
                        help="the learning-rate grid every method is tuned over")
    parser.add_argument("--tune_on", choices=list(APPLICATIONS), default="harmful",
                        help="the application the learning rates are chosen on")
    parser.add_argument("--kl_limit", type=float, default=0.1,
                        help="the largest normal_held_out KL (nats/token) a chosen learning rate may give")
    parser.add_argument("--relearn_steps", type=int, default=50, help="fine-tuning steps of the relearning test")
    parser.add_argument("--relearn_eval_every", type=int, default=5, help="measure the behaviour every N steps")
    parser.add_argument("--relearn_lr", type=float, default=3e-4, help="AdamW learning rate of the relearning")
    parser.add_argument("--relearn_max_samples", type=int,
                        help="measure the relearning on only this many forget prompts (default: all)")
    parser.add_argument("--nproc", type=int, help="ranks per training run (launch.sh --nproc)")
    return parser


def main(argv: Optional[list[str]] = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_at_double_dash(argv)
    args = build_parser().parse_args(own)
    problems = []
    if args.tune_on not in args.applications:
        problems.append(f"--tune_on {args.tune_on} is not among --applications {args.applications}")
    if args.kl_limit <= 0:
        problems.append(f"--kl_limit {args.kl_limit} must be > 0")
    if any(lr <= 0 for lr in args.lrs):
        problems.append(f"--lrs {args.lrs}: every learning rate must be > 0")
    if args.relearn_steps < 1 or not 1 <= args.relearn_eval_every <= args.relearn_steps:
        problems.append(f"--relearn_steps {args.relearn_steps} must be >= 1 and --relearn_eval_every "
                        f"{args.relearn_eval_every} within [1, relearn_steps]")
    blocked = [arg for arg in extra if arg.split("=")[0] in ("--train.lr", "--output.dir", "--config")]
    if blocked:
        problems.append(f"{blocked} after --: the command sets the config, each run's folder and its learning rate")
    if problems:
        raise SystemExit("dsunlearn methods: " + "; ".join(problems))
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(out_dir, args.methods, args.applications, args.lrs, args.tune_on, args.kl_limit, args.relearn_steps,
                args.relearn_eval_every, args.relearn_lr, args.relearn_max_samples, args.nproc, extra)
    result = run_plan(plan)
    report = write_methods_report(out_dir, result)
    logger.info("methods report: %s", report)
    if result["failed"]:
        logger.error("runs that failed: %s", "; ".join(result["failed"]))
        raise SystemExit(distributed.EXIT_FAILED)
    return report


if __name__ == "__main__":
    main()
