"""``python -m dsunlearn sweep``: a grid over the objective's weights and the learning rate, one training run per
point, then the trade-off between forgetting and utility with its Pareto front.

    python -m dsunlearn sweep --config configs/demo.yaml --out_dir outputs/sweep \\
        --forget_weight 0.5 1 --lr 1e-4 3e-4 [--grid grid.yaml] [--nproc 2] [-- --train.max_steps 20 ...]

Each point is a normal run through ``launch.sh`` (the launcher users run, so it works on a laptop, a GPU node or in a
SLURM allocation) into its own folder ``OUT_DIR/fw{e1}-rw{e2}-nw{e3}-lr{lr}``, with ``output.evaluate`` on. The sweep
is resumable: a point whose ``eval/eval.json`` exists is skipped, a point whose folder holds an unfinished run is
resumed (``--resume true``). A run stopped by SIGTERM (exit 75) stops the sweep with that code; a failed point is
reported and the others still run.

Report (``OUT_DIR/sweep.md``, ``sweep.png``, ``sweep.json``): per point, forgetting (the unlearned model's
``forget_train`` ``behaviour_rate``, or ``reproduction_rate`` where the evaluation has no behaviour rate) against
utility loss (``normal_held_out`` ``kl``, nats/token), both lower-is-better; the Pareto front is the points no other
point beats on both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from dsunlearn.runtime import distributed

logger = logging.getLogger("dsunlearn.tools.sweep")

GRID_KEYS = {
    "forget_weight": "objective.forget_weight",
    "random_weight": "objective.random_weight",
    "normal_weight": "objective.normal_weight",
    "lr": "train.lr",
}
"""Grid axes and the training setting each sets."""
LAUNCHER = Path(__file__).resolve().parents[2] / "launch.sh"


def grid_points(axes: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination of the axes' values (an axis without values keeps the config's setting)."""
    names = [name for name in GRID_KEYS if axes.get(name)]
    return [dict(zip(names, values)) for values in itertools.product(*(axes[name] for name in names))]


def point_name(point: dict[str, float]) -> str:
    short = {"forget_weight": "fw", "random_weight": "rw", "normal_weight": "nw", "lr": "lr"}
    return "-".join(f"{short[name]}{value:g}" for name, value in point.items()) or "config"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (x, y), both lower-is-better: whether no other point is at least as good on both and better on one."""
    return [
        not any(ox <= x and oy <= y and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        for i, (x, y) in enumerate(points)
    ]


def run_point(point: dict[str, float], run_dir: Path, config: str, nproc: Optional[int], extra: list[str]) -> int:
    """Train and evaluate one grid point into ``run_dir`` (resumed when it holds an unfinished run); its exit code."""
    settings = [arg for name, value in point.items() for arg in (f"--{GRID_KEYS[name]}", repr(value))]
    logger.info("sweep point %s", point_name(point))
    return launch_run(["--config", config, *extra, *settings], run_dir, nproc)


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, those after ``--`` for every training run)."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def launch_run(train_args: list[str], run_dir: Path, nproc: Optional[int]) -> int:
    """One training run with ``output.evaluate`` on, through ``launch.sh`` into ``run_dir`` (resumed when it holds an
    unfinished run); its exit code."""
    command = ["bash", str(LAUNCHER)]
    if nproc:
        command += ["--nproc", str(nproc)]
    command += [*train_args, "--output.dir", str(run_dir), "--output.evaluate", "true"]
    if (run_dir / "config.yaml").exists():
        command += ["--resume", "true"]
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    # The venv's deepspeed launcher, beside this interpreter, even when the venv is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MASTER_PORT", str(_free_port()))
    logger.info("%s", " ".join(command))
    return subprocess.run(command, env=env).returncode


def summarize_point(point: dict[str, float], run_dir: Path) -> dict:
    """The point's numbers from its ``eval/eval.json``."""
    summary = json.loads((run_dir / "eval" / "eval.json").read_text())
    forget = summary["unlearned"]["forget_train"]
    normal = summary["unlearned"]["normal_held_out"]
    forgetting_metric = "behaviour_rate" if "behaviour_rate" in forget else "reproduction_rate"
    return {
        "name": point_name(point), **point, "dir": str(run_dir),
        "forgetting_metric": forgetting_metric, "forgetting": forget[forgetting_metric],
        "forgetting_before": summary["original"]["forget_train"][forgetting_metric],
        "normal_kl": normal["kl"], "normal_reproduction_rate": normal["reproduction_rate"],
    }


def write_sweep_report(out_dir: Path, rows: list[dict]) -> Path:
    """``sweep.json``, ``sweep.md`` (table) and ``sweep.png`` (forgetting against normal KL, the front marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front([(row["normal_kl"], row["forgetting"]) for row in rows])
    for row, on_front in zip(rows, front):
        row["pareto"] = on_front
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    axes = [name for name in GRID_KEYS if any(name in row for row in rows)]
    metric = rows[0]["forgetting_metric"] if rows else "reproduction_rate"
    lines = ["# dsunlearn sweep", "",
             f"Forgetting: forget_train {metric} of the unlearned model (lower is better); utility loss: "
             "normal_held_out kl, nats/token (lower is better). Pareto: no other point is better on both.", "",
             "| point | " + " | ".join(axes) + f" | forget_train {metric} | normal_held_out kl | "
             "normal_held_out reproduction_rate | Pareto |",
             "|---|" + "---:|" * (len(axes) + 3) + "---|"]
    for row in rows:
        cells = [f"{row[name]:g}" for name in axes]
        cells += [f"{row['forgetting']:.4g}", f"{row['normal_kl']:.4g}", f"{row['normal_reproduction_rate']:.4g}"]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {'yes' if row['pareto'] else ''} |")
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.scatter([r["normal_kl"] for r in rows], [r["forgetting"] for r in rows], color="tab:blue", label="run")
    for row in rows:
        ax.annotate(row["name"], (row["normal_kl"], row["forgetting"]), fontsize=6)
    on_front = sorted((r["normal_kl"], r["forgetting"]) for r in rows if r["pareto"])
    if on_front:
        ax.plot(*zip(*on_front), color="tab:red", marker="o", label="Pareto front")
    ax.set_xlabel("normal_held_out KL (nats/token)")
    ax.set_ylabel(f"forget_train {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
    lines += ["", "![forgetting against utility](sweep.png)", ""]
    report = out_dir / "sweep.md"
    report.write_text("\n".join(lines))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsunlearn sweep", description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- go to every training run.")
    parser.add_argument("--config", required=True, help="the training config every point starts from")
    parser.add_argument("--out_dir", required=True, help="one folder per point inside, and the sweep's report")
    parser.add_argument("--grid", help="YAML file {forget_weight: [...], random_weight: [...], normal_weight: [...], "
                                       "lr: [...]} (command-line lists replace its axes)")
    for name, setting in GRID_KEYS.items():
        parser.add_argument(f"--{name}", type=float, nargs="+", help=f"values of {setting}")
    parser.add_argument("--nproc", type=int, help="ranks per run (launch.sh --nproc)")
    return parser


def main(argv: Optional[list[str]] = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_at_double_dash(argv)
    args = build_parser().parse_args(own)
    axes: dict[str, list[float]] = {}
    if args.grid:
        import yaml

        grid = yaml.safe_load(Path(args.grid).read_text()) or {}
        unknown = sorted(set(grid) - set(GRID_KEYS))
        if unknown:
            raise SystemExit(f"dsunlearn sweep: --grid {args.grid}: unknown axes {unknown}; use {list(GRID_KEYS)}")
        axes.update({name: [float(v) for v in values] for name, values in grid.items()})
    axes.update({name: getattr(args, name) for name in GRID_KEYS if getattr(args, name)})
    if not axes:
        raise SystemExit(f"dsunlearn sweep: give at least one axis ({', '.join('--' + n for n in GRID_KEYS)} or "
                         f"--grid)")
    points = grid_points(axes)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for point in points:
        run_dir = out_dir / point_name(point)
        if not (run_dir / "eval" / "eval.json").is_file():
            code = run_point(point, run_dir, args.config, args.nproc, extra)
            if code == distributed.EXIT_PREEMPTED:
                logger.info("sweep stopped at %s (exit %d): run it again to continue", point_name(point), code)
                raise SystemExit(code)
            if code != 0:
                failed.append((point_name(point), code))
                continue
        else:
            logger.info("sweep point %s: finished before, skipped", point_name(point))
        rows.append(summarize_point(point, run_dir))
    report = write_sweep_report(out_dir, rows)
    logger.info("sweep report: %s", report)
    if failed:
        logger.error("sweep points that failed: %s", ", ".join(f"{name} (exit {code})" for name, code in failed))
        raise SystemExit(distributed.EXIT_FAILED)
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
