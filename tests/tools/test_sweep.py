"""python -m dsunlearn sweep: the grid, the Pareto front, and a 2-point sweep of 2-step runs that resumes."""

import json
import os
import random
import subprocess
import sys

import pytest

from dsunlearn.tools.sweep import grid_points, pareto_front, point_name


def test_grid_points_cover_every_combination_in_order():
    points = grid_points({"lr": [1e-4, 3e-4], "forget_weight": [0.5, 1.0], "random_weight": []})
    assert points == [{"forget_weight": 0.5, "lr": 1e-4}, {"forget_weight": 0.5, "lr": 3e-4},
                      {"forget_weight": 1.0, "lr": 1e-4}, {"forget_weight": 1.0, "lr": 3e-4}]
    assert point_name(points[1]) == "fw0.5-lr0.0003"


def test_pareto_front_against_a_sweep_line():
    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.choice([0.0, 0.1, 0.2, 0.3]), rng.choice([0.0, 0.5, 1.0])) for _ in range(rng.randint(1, 9))]
        # Independently: sorted by x then y, a point is on the front when its y is below every y seen before it,
        # or it repeats a front point exactly (equal points do not dominate each other).
        front, best_y = set(), float("inf")
        for x, y in sorted(points):
            if y < best_y:
                front.add((x, y))
                best_y = y
        assert pareto_front(points) == [point in front for point in points]
    assert pareto_front([(0.1, 0.5), (0.2, 0.2), (0.3, 0.3)]) == [True, True, False]


@pytest.mark.integration
def test_a_two_point_sweep_reports_and_resumes(tiny_model_dir, tmp_path):
    out_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "dsunlearn", "sweep", "--config", "configs/demo.yaml", "--out_dir", str(out_dir),
               "--forget_weight", "0.5", "1", "--nproc", "1", "--",
               "--model.name_or_path", str(tiny_model_dir), "--train.max_steps", "2", "--train.checkpoint_every", "1",
               "--output.eval_max_samples", "2", "--output.eval_max_new_tokens", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def sweep():
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    sweep()
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [row["name"] for row in rows] == ["fw0.5", "fw1"]
    for row in rows:
        summary = json.loads((out_dir / row["name"] / "eval" / "eval.json").read_text())
        assert row["forgetting"] == summary["unlearned"]["forget_train"]["reproduction_rate"]
        assert row["normal_kl"] == summary["unlearned"]["normal_held_out"]["kl"]
    assert [row["pareto"] for row in rows] == pareto_front([(r["normal_kl"], r["forgetting"]) for r in rows])
    assert "| fw1 | 1 |" in (out_dir / "sweep.md").read_text() and (out_dir / "sweep.png").stat().st_size > 0

    # fw1 lost its evaluation (a kill after training): the next sweep skips fw0.5 and resumes fw1, no step re-run.
    finished = (out_dir / "fw0.5" / "eval" / "eval.json").stat().st_mtime_ns
    for path in (out_dir / "fw1" / "eval").iterdir():
        path.unlink()
    steps_before = (out_dir / "fw1" / "metrics.jsonl").read_text()
    output = sweep()
    assert "sweep point fw0.5: finished before, skipped" in output
    assert "--output.dir " + str(out_dir / "fw1") in output and "--resume true" in output
    assert (out_dir / "fw0.5" / "eval" / "eval.json").stat().st_mtime_ns == finished
    assert (out_dir / "fw1" / "metrics.jsonl").read_text() == steps_before
    assert json.loads((out_dir / "sweep.json").read_text()) == rows
    assert all((out_dir / row["name"] / "final" / "model.safetensors").is_file() for row in rows)
