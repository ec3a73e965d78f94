"""Markdown report with PNG plots for one or several evaluated runs.

An evaluation summary (``eval.json``, written by :mod:`dsunlearn.eval.evaluation`) holds, per prompt set,
the metrics of the original model (``"original"``) and of the unlearned one (``"unlearned"``):

    {"name": ..., "model": ..., "reference": ..., "metrics_jsonl": ... | null,
     "original":  {"forget_train": {"nll": ..., ..., "ci": {"nll": [low, high], ...}}, "forget_held_out": {...}, ...},
     "unlearned": {...same sets...}}

Each value with a confidence interval (``ci``) is shown as ``0.8 [0.62, 0.95]``.

:func:`write_report` puts several runs side by side: one column per distinct original model, then
one per run (the paper's comparison: original, gradient ascent only, + random mismatch, + KL).
Run as ``python -m dsunlearn.eval.report RUN_A/eval.json RUN_B/eval.json --out_dir DIR`` to compare
saved evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from dsunlearn.eval.metrics import rouge_settings  # noqa: E402
from dsunlearn.settings.eval_names import METRIC_DESCRIPTIONS, SET_ORDER  # noqa: E402

OBJECTIVE_TERMS = ("forget_ce", "random_ce", "normal_kl", "total")
"""Columns of the trainer's metrics.jsonl plotted over the steps (a term may be null or absent)."""

Run = tuple[str, dict, "str | Path | None"]

EVAL_DURING_FAMILIES = {
    "likelihood": ("nll", "ppl", "kl"),
    "generation": ("similarity_to_original", "distinct_1", "distinct_2", "generation_tokens"),
}
"""Metric families of the evaluations during training, one PNG each; every other metric (the rates, ROUGE, BLEU) is
in the family ``behaviour``."""


def write_report(out_dir: str | Path, runs: Sequence[Run], relearning: dict[str, dict] | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir`` and return the report's path.

    ``runs``: ``(name, eval_summary, metrics_jsonl_path or None)`` per run, in column order. ``relearning``:
    ``{name: relearn.json content}`` (:func:`read_relearning`) for a section with the relearning curves.
    Plots: one bar chart per prompt set (original vs each run, one panel per metric) and, when
    any run has a metrics.jsonl, the objective terms over the steps (one panel per term, one
    line per run).
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name, _, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}")
    for name, summary, _ in runs:
        missing = [key for key in ("original", "unlearned") if not isinstance(summary.get(key), dict)]
        if missing:
            raise ValueError(f"run {name!r}: evaluation summary lacks {missing} (expected an eval.json from dsunlearn)")

    columns = _columns(runs)
    rows = _rows(columns)
    lines = ["# dsunlearn evaluation report", "", "## Runs", ""]
    lines += ["| run | model | original (reference) | samples |", "|---|---|---|---|"]
    for name, summary, _ in runs:
        counts = ", ".join(f"{s}: {n}" for s, n in summary.get("num_samples", {}).items())
        lines.append(f"| {name} | `{summary.get('model', '?')}` | `{summary.get('reference', '?')}` | {counts} |")
    lines += ["", "## Metrics", ""]
    lines += ["| set / metric | " + " | ".join(label for label, _ in columns) + " |"]
    lines += ["|---|" + "---:|" * len(columns)]
    for set_name, metric in rows:
        cells = [
            format_value(values.get(set_name, {}).get(metric), values.get(set_name, {}).get("ci", {}).get(metric))
            for _, values in columns
        ]
        lines.append(f"| {set_name} / {metric} | " + " | ".join(cells) + " |")
    lines += ["", "### Metric definitions", "", "| metric | definition |", "|---|---|"]
    used_metrics = [m for m in METRIC_DESCRIPTIONS if any(metric == m for _, metric in rows)]
    lines += [f"| `{m}` | {METRIC_DESCRIPTIONS[m]} |" for m in used_metrics]
    lines += ["", *_settings_notes(runs)]

    lines += ["", "## Before / after", ""]
    for set_name in _ordered_sets(columns):
        png = out_dir / f"metrics_{_slug(set_name)}.png"
        _plot_set(png, set_name, columns, [m for s, m in rows if s == set_name])
        lines += [f"![{set_name}]({png.name})", ""]

    lines += _mia_lines(runs)
    lines += _benchmark_lines(runs)

    histories = {name: _read_metrics_jsonl(path) for name, _, path in runs if path is not None}
    if histories:
        png = out_dir / "objective_terms.png"
        _plot_objective(png, histories)
        lines += ["## Objective over training steps", "", f"![objective terms]({png.name})", ""]

    if relearning:
        lines += ["## Relearning", "", *relearning_section(out_dir, relearning)]
    # ---- evaluations during training (output.eval_every): eval_during.jsonl beside each run's metrics.jsonl ----
    during = {name: _read_metrics_jsonl(Path(path).with_name("eval_during.jsonl")) for name, _, path in runs
              if path is not None and Path(path).with_name("eval_during.jsonl").is_file()}
    if any(during.values()):
        lines += ["## Evaluation during training", "",
                  "The model's metrics on the evaluation subsets (output.eval_during_max_samples) every "
                  "output.eval_every steps, one line per set.", ""]
        for family, metrics in _eval_during_families(during).items():
            png = out_dir / f"eval_during_{family}.png"
            _plot_eval_during(png, family, metrics, during)
            lines += [f"![evaluation during training: {family}]({png.name})", ""]

    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def compare(
    eval_paths: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    metrics_paths: Sequence[str | Path | None] | None = None,
    relearn_paths: Sequence[str | Path] = (),
) -> Path:
    """Put several saved ``eval.json`` files side by side in one report (see :func:`write_report`).

    ``names`` default to each summary's ``name`` (else its directory name); ``metrics_paths``
    default to each summary's ``metrics_jsonl`` entry when that file exists; ``relearn_paths``: ``relearn.json``
    files whose curves the report shows.
    """
    if names is not None and len(names) != len(eval_paths):
        raise ValueError(f"{len(names)} names for {len(eval_paths)} eval.json files")
    if metrics_paths is not None and len(metrics_paths) != len(eval_paths):
        raise ValueError(f"{len(metrics_paths)} metrics paths for {len(eval_paths)} eval.json files")
    runs = []
    for i, path in enumerate(eval_paths):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation summary at {path}")
        summary = json.loads(path.read_text())
        name = names[i] if names is not None else summary.get("name") or path.parent.name
        if metrics_paths is not None:
            metrics = metrics_paths[i]
        else:
            logged = summary.get("metrics_jsonl")
            metrics = logged if logged and Path(logged).is_file() else None
        runs.append((name, summary, metrics))
    return write_report(out_dir, runs, read_relearning(relearn_paths) if relearn_paths else None)


def _columns(runs: Sequence[Run]) -> list[tuple[str, dict]]:
    """(label, {set: {metric: value}}): one column per distinct original model, then one per run."""
    originals: dict[str, dict] = {}
    for _, summary, _ in runs:
        originals.setdefault(str(summary.get("reference")), summary["original"])
    if len(originals) == 1:
        columns = [("original", next(iter(originals.values())))]
    else:
        columns = [(f"original ({Path(ref).name})", values) for ref, values in originals.items()]
    return columns + [(name, summary["unlearned"]) for name, summary, _ in runs]


def _ordered_sets(columns: Sequence[tuple[str, dict]]) -> list[str]:
    present = {s for _, values in columns for s in values}
    return [s for s in SET_ORDER if s in present] + sorted(present - set(SET_ORDER))


def _rows(columns: Sequence[tuple[str, dict]]) -> list[tuple[str, str]]:
    """(set, metric) pairs that any column reports, sets and metrics in their canonical order."""
    rows = []
    for set_name in _ordered_sets(columns):
        present = {m for _, values in columns for m in values.get(set_name, {}) if m != "ci"}
        ordered = [m for m in METRIC_DESCRIPTIONS if m in present] + sorted(present - set(METRIC_DESCRIPTIONS))
        rows += [(set_name, m) for m in ordered]
    return rows


def _mia_lines(runs: Sequence[Run]) -> list[str]:
    """The "MIA AUC" section: per attack, the AUC of the original model, of each run and of the retrained model,
    then each run's PrivLeak where a retrained model was given; nothing when no run has membership inference."""
    from dsunlearn.eval.mia import ATTACK_DESCRIPTIONS, ATTACKS

    measured = [(name, summary["mia"]) for name, summary, _ in runs if summary.get("mia")]
    if not measured:
        return []
    first = measured[0][1]

    def auc_cells(result: dict, role: str) -> dict[str, str]:
        # eval.json files written before the intervals existed have no auc_ci: their AUCs show alone.
        intervals = result.get("auc_ci") or {}
        return {
            attack: format_value(result["auc"][attack][role], intervals.get(attack, {}).get(role)) for attack in ATTACKS
        }

    # (label, {attack: formatted AUC}); the original model is the first run's (the runs share one original as a rule).
    columns = [("original", auc_cells(first, "original"))]
    columns += [(name, auc_cells(result, "unlearned")) for name, result in measured]
    with_retrained = [(name, result) for name, result in measured if result.get("privleak")]
    if with_retrained:
        columns.append(("retrained", auc_cells(with_retrained[0][1], "retrained")))
    counts = ", ".join(f"{set_name}: {count}" for set_name, count in first["num_samples"].items())
    lines = ["## MIA AUC", "",
             f"Membership inference between `{first['member_set']}` (members) and the never-seen "
             f"`{first['nonmember_set']}` ({counts}; k = {first['k']}): ROC AUC, 1 = every forget sample recognised, "
             "0.5 = indistinguishable from never-seen ones (a retrained model's value is the goal). [low, high]: "
             "the stratified bootstrap interval (members and never-seen samples resampled separately).", ""]
    lines += ["| attack | " + " | ".join(label for label, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for attack in ATTACKS:
        lines.append(f"| {attack} | " + " | ".join(formatted[attack] for _, formatted in columns) + " |")
    if with_retrained:
        lines += ["", "PrivLeak (MUSE, %: (AUC'_model − AUC'_retrained) / AUC'_retrained with AUC' = 1 − AUC; ~0 is "
                  "good, negative = the forget set still leaks, positive = over-unlearned):", ""]
        lines += ["| attack | original | " + " | ".join(name for name, _ in with_retrained) + " |",
                  "|---|" + "---:|" * (len(with_retrained) + 1)]
        for attack in ATTACKS:
            cells = [format_value(with_retrained[0][1]["privleak"][attack]["original"])]
            cells += [format_value(result["privleak"][attack]["unlearned"]) for _, result in with_retrained]
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", "Attacks (a higher score says \"not a member\"):", ""]
    lines += [f"- `{attack}`: {ATTACK_DESCRIPTIONS[attack]}" for attack in ATTACKS]
    return lines + [""]


def _benchmark_lines(runs: Sequence[Run]) -> list[str]:
    """The "TOFU" section (forget quality and model utility of the original model and each run) and the "MUSE"
    section (VerbMem and KnowMem) of the runs that have them (dsunlearn/eval/benchmarks.py); nothing without."""
    lines = []
    tofu = [(name, summary["tofu"]) for name, summary, _ in runs if summary.get("tofu")]
    if tofu:
        columns = [("original", "original", tofu[0][1])] + [(name, "unlearned", section) for name, section in tofu]

        def cell(section: dict, key: str, role: str):
            value = (section.get(key) or {}).get(role)
            return value["value"] if isinstance(value, dict) else value

        lines += ["## TOFU", "", "| metric | " + " | ".join(label for label, _, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for key, label in (("forget_quality", "forget quality"), ("model_utility", "model utility")):
            cells = [format_value(cell(section, key, role)) for _, role, section in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        retain_models = "; ".join(sorted({section["retain_model"] for _, section in tofu if section["retain_model"]}))
        lines += ["", "Forget quality: p-value of the KS test between the forget set's truth ratios under the model "
                  f"and under the retain model ({retain_models or 'none given: –'}); high = indistinguishable. "
                  "Model utility: harmonic mean of the normal set's answer_prob, rouge_l_recall and retain_truth_ratio "
                  "(those present).", ""]
    muse = [(name, summary["muse"]) for name, summary, _ in runs if summary.get("muse")]
    if muse:
        from dsunlearn.eval.benchmarks import MUSE_METRICS

        columns = [("original", muse[0][1].get("original", {}))]
        columns += [(name, section.get("unlearned", {})) for name, section in muse]
        present = [name for name in MUSE_METRICS if any(name in values for _, values in columns)]
        lines += ["## MUSE", "", "| metric | " + " | ".join(label for label, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(format_value(values.get(name)) for _, values in columns) + " |"
                  for name in present]
        lines += ["", "ROUGE-L F1 (no stemmer, as MUSE) of the greedy continuation (verbmem) or answer (knowmem) on "
                  "the forget set (_f) and the normal set (_r); PrivLeak is in the MIA section.", ""]
    return lines


def _settings_notes(runs: Sequence[Run]) -> list[str]:
    """One line each on the settings that define the metrics above: ROUGE convention, threshold, interval."""
    configs = [summary.get("config", {}) for _, summary, _ in runs]

    def distinct(describe) -> str:
        return ", ".join(sorted({describe(config) for config in configs}))

    def rouge(config: dict) -> str:
        preset = config.get("rouge", "tofu")
        measure, stemmer = rouge_settings(preset, config.get("rouge_measure"), config.get("rouge_stemmer"))
        return f"{preset} (ROUGE-L {measure}, stemmer {'on' if stemmer else 'off'})"

    def interval(config: dict) -> str:
        return f"{config.get('confidence_level', 0.95):.0%} ({config.get('bootstrap_resamples')} resamples)"

    notes = [f"- ROUGE: rouge-score's rougeL, preset {distinct(rouge)}"]
    if any("reproduction_threshold" in config for config in configs):
        notes.append(f"- reproduction threshold: {distinct(lambda config: str(config.get('reproduction_threshold')))}")
    if any("confidence_level" in config for config in configs):
        notes.append(
            f"- value [low, high]: the {distinct(interval)} percentile bootstrap interval over the set's samples "
            "(seeded; token-level means resample whole samples, paired)"
        )
    return notes


def format_value(value, interval=None) -> str:
    """``0.8`` or, with its confidence interval, ``0.8 [0.62, 0.95]``."""
    if value is None:
        return "–"
    text = _number(value)
    if interval is not None:
        text += f" [{_number(interval[0])}, {_number(interval[1])}]"
    return text


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _plot_set(png: Path, set_name: str, columns: Sequence[tuple[str, dict]], metrics: Sequence[str]) -> None:
    """One panel per metric, one bar per column (original, then each run), with its confidence interval when known."""
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    labels = [label for label, _ in columns]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        values = [values.get(set_name, {}).get(metric) for _, values in columns]
        # Missing and infinite values get no bar; their label stays so columns line up across panels.
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax.bar(range(len(labels)), heights, color=[colors[i % len(colors)] for i in range(len(labels))])
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                ax.text(i, 0, "–" if v is None else "inf", ha="center", va="bottom")
        for i, (_, column) in enumerate(columns):
            interval = column.get(set_name, {}).get("ci", {}).get(metric)
            # A null bound is a perplexity past a double's range: no bar to draw it on.
            if interval is not None and None not in interval and all(map(math.isfinite, [*interval, heights[i]])):
                below, above = max(heights[i] - interval[0], 0.0), max(interval[1] - heights[i], 0.0)
                ax.errorbar(i, heights[i], yerr=[[below], [above]], color="black", capsize=3, linewidth=1)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(set_name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _read_metrics_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training metrics at {path}")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from error
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{line_number}: expected an object with a 'step' field")
        rows.append(row)
    return rows


def _plot_objective(png: Path, histories: dict[str, list[dict]]) -> None:
    """One panel per objective term, one line per run; null entries are gaps, not zeros."""
    fig, axes = plt.subplots(1, len(OBJECTIVE_TERMS), figsize=(3.6 * len(OBJECTIVE_TERMS), 3.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, term in zip(axes.flat, OBJECTIVE_TERMS):
        plotted = False
        # A run keeps its colour in every panel, also where another run did not log the term.
        for run_index, (name, rows) in enumerate(histories.items()):
            points = [(row["step"], row[term]) for row in rows if row.get(term) is not None]
            if points:
                steps, values = zip(*points)
                color = colors[run_index % len(colors)]
                ax.plot(steps, values, label=name, color=color, marker="." if len(points) < 30 else None)
                plotted = True
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step")
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def read_relearning(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> dict[str, dict]:
    """``{name: result}`` from ``relearn.json`` files (``dsunlearn relearn``); names default to each run's ``name``."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} relearn.json files")
    named = []
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no relearning result at {path}")
        result = json.loads(Path(path).read_text())
        named.append((names[i] if names is not None else result["name"], result))
    if len({name for name, _ in named}) != len(named):
        raise ValueError(f"curve names must be distinct, got {[name for name, _ in named]}")
    return dict(named)


def relearning_section(out_dir: Path, results: dict[str, dict]) -> list[str]:
    """Markdown lines of the relearning curves of ``results`` (``{name: relearn.json content}``): a table of each
    model's rates and recovery steps, and ``relearn_curves.png`` (written into ``out_dir``)."""
    png = out_dir / "relearn_curves.png"
    plot_relearning(png, results)
    fractions = sorted({fraction for result in results.values() for fraction in result["recovery_steps"]}, key=float)
    lines = ["| model | rate at step 0 | last rate | original's rate | "
             + " | ".join(f"steps to {float(f):.0%} of it" for f in fractions) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(fractions)]
    for name, result in results.items():
        first, last = result["curve"][0], result["curve"][-1]
        steps = [str(result["recovery_steps"].get(f) if result["recovery_steps"].get(f) is not None else "not reached")
                 for f in fractions]
        lines.append(f"| {name} | {first['behaviour_rate']:.3g} | {last['behaviour_rate']:.3g} (step {last['step']}) "
                     f"| {result['original_rate']:.3g} | " + " | ".join(steps) + " |")
    lines += ["", "Behaviour rate: the share of greedy generations, on forget prompts the model was not fine-tuned on, "
              "that show the behaviour being unlearned (shaded: its bootstrap interval). Steps to X% of it: the first "
              "measured fine-tuning step whose rate reaches X% of the original model's.", "",
              f"![relearning curves]({png.name})", ""]
    return lines


def plot_relearning(png: Path, results: dict[str, dict]) -> None:
    """Relearning curves (``dsunlearn relearn``): behaviour rate over fine-tuning steps, one line per model with its
    bootstrap interval shaded, and each model's original rate as a dotted line of the same colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, result) in enumerate(results.items()):
        color = colors[index % len(colors)]
        steps = [point["step"] for point in result["curve"]]
        ax.plot(steps, [point["behaviour_rate"] for point in result["curve"]], marker=".", color=color, label=name)
        ax.fill_between(steps, [point["ci"][0] for point in result["curve"]],
                        [point["ci"][1] for point in result["curve"]], color=color, alpha=0.15)
        ax.axhline(result["original_rate"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning steps on forget data")
    ax.set_ylabel("behaviour rate (not fine-tuned prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Relearning: how fast the behaviour returns (dotted: the original's rate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _eval_during_families(during: dict[str, list[dict]]) -> dict[str, list[str]]:
    """``{family: [metric, ...]}`` of the metrics in ``eval_during.jsonl`` rows, families in a fixed order."""
    measured = list(dict.fromkeys(row["metric"] for rows in during.values() for row in rows))
    family_of = {metric: family for family, metrics in EVAL_DURING_FAMILIES.items() for metric in metrics}
    families: dict[str, list[str]] = {"behaviour": [], **{family: [] for family in EVAL_DURING_FAMILIES}}
    for metric in measured:
        families[family_of.get(metric, "behaviour")].append(metric)
    return {family: metrics for family, metrics in families.items() if metrics}


def _plot_eval_during(png: Path, family: str, metrics: Sequence[str], during: dict[str, list[dict]]) -> None:
    """One panel per metric of ``family``, one line per (run, set); null values (an overflowing ppl) are gaps."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, rows in during.items():
            for set_name in dict.fromkeys(row["set"] for row in rows):
                points = sorted((row["step"], row["value"]) for row in rows
                                if row["set"] == set_name and row["metric"] == metric and row["value"] is not None)
                if points:
                    steps, values = zip(*points)
                    label = set_name if len(during) == 1 else f"{name}: {set_name}"
                    ax.plot(steps, values, label=label, marker=".")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"evaluation during training: {family}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m dsunlearn.eval.report EVAL_JSON... --out_dir DIR [--names A B ...]``: compare saved evaluations."""
    parser = argparse.ArgumentParser(prog="python -m dsunlearn.eval.report",
                                     description=compare.__doc__.splitlines()[0])
    parser.add_argument("eval_json", nargs="+", help="eval.json files written by `dsunlearn eval`")
    parser.add_argument("--out_dir", required=True, help="where report.md and the PNGs go")
    parser.add_argument("--names", nargs="+", help="column names, one per eval.json (default: run names)")
    parser.add_argument("--relearn", nargs="+", default=[], help="relearn.json files (dsunlearn relearn) to plot")
    args = parser.parse_args(argv)
    report = compare(args.eval_json, args.out_dir, names=args.names, relearn_paths=args.relearn)
    print(report)
    return report


if __name__ == "__main__":
    main()
