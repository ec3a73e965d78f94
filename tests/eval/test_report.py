"""report.md lists every run side by side; its plots are real PNG files that decode."""

import json
import re

import matplotlib.image
import pytest

from dsunlearn.eval.mia import ATTACKS
from dsunlearn.eval.report import _mia_lines, compare, main, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(name, forget_nll, reproduction, kl, reference="/models/original"):
    original = {
        "forget_train": {"nll": 1.25, "reproduction_rate": 0.75, "distinct_1": 0.5},
        "normal_held_out": {"nll": 2.0, "kl": 0.0},
    }
    unlearned = {
        "forget_train": {"nll": forget_nll, "reproduction_rate": reproduction, "distinct_1": 0.25},
        "normal_held_out": {"nll": 2.5, "kl": kl, "similarity_to_original": 0.5},
    }
    return {
        "name": name,
        "model": f"/runs/{name}",
        "reference": reference,
        "num_samples": {"forget_train": 4, "normal_held_out": 3},
        "config": {"reproduction_threshold": 0.5},
        "original": original,
        "unlearned": unlearned,
    }


def _write_metrics(path, with_random):
    rows = []
    for step in range(1, 6):
        rows.append(
            {
                "step": step,
                "forget_ce": -1.0 - step,
                "random_ce": 3.0 / step if with_random else None,
                "normal_kl": 0.01 * step,
                "total": -1.0,
                "lr": 1e-5,
                "grad_norm": 1.0,
                "tokens_per_s": 100.0,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _assert_real_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    # A blank canvas would be a single colour; a plot has several.
    assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0


def _table_row(report_text, label):
    match = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", report_text, flags=re.MULTILINE)
    assert match, f"no table row {label!r}"
    return [cell.strip() for cell in match.group(1).split("|")]


def test_report_puts_runs_side_by_side_with_real_pngs(tmp_path):
    runs = [
        ("ga", _summary("ga", 9.5, 0.0, 0.5), _write_metrics(tmp_path / "ga.jsonl", with_random=False)),
        ("ga+rdn", _summary("ga+rdn", 7.25, 0.25, 0.25), _write_metrics(tmp_path / "rdn.jsonl", with_random=True)),
        ("ga+rdn+kl", _summary("ga+rdn+kl", 6.0, 0.25, 0.125), None),
    ]
    report = write_report(tmp_path / "out", runs)
    text = report.read_text()

    header = next(line for line in text.splitlines() if line.startswith("| set / metric |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["set / metric", "original", "ga", "ga+rdn", "ga+rdn+kl"]
    assert _table_row(text, "forget_train / nll") == ["1.25", "9.5", "7.25", "6"]
    assert _table_row(text, "forget_train / reproduction_rate") == ["0.75", "0", "0.25", "0.25"]
    assert _table_row(text, "normal_held_out / kl") == ["0", "0.5", "0.25", "0.125"]
    # The original has no similarity to itself reported: its cell is a dash.
    assert _table_row(text, "normal_held_out / similarity_to_original") == ["–", "0.5", "0.5", "0.5"]
    assert "- reproduction threshold: 0.5" in text
    # One definition per metric shown, in one table.
    assert "| `reproduction_rate` | fraction of greedy generations whose ROUGE-L" in text
    assert "| `similarity_to_original` |" in text and "| `nll` |" in text

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["metrics_forget_train.png", "metrics_normal_held_out.png", "objective_terms.png"]
    for image in images:
        _assert_real_png(report.parent / image)


def test_report_without_training_metrics_has_no_objective_plot(tmp_path):
    report = write_report(tmp_path, [("only", _summary("only", 3.0, 0.5, 0.0), None)])
    assert "objective_terms.png" not in report.read_text()
    assert not (tmp_path / "objective_terms.png").exists()
    _assert_real_png(tmp_path / "metrics_forget_train.png")


def test_report_keeps_distinct_originals_apart(tmp_path):
    runs = [
        ("a", _summary("a", 3.0, 0.5, 0.0, reference="/models/opt"), None),
        ("b", _summary("b", 4.0, 0.5, 0.0, reference="/models/llama"), None),
    ]
    text = write_report(tmp_path, runs).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| set / metric |"))
    assert "original (opt)" in header and "original (llama)" in header


def test_report_rejects_bad_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        write_report(tmp_path, [])
    with pytest.raises(ValueError, match="distinct"):
        write_report(tmp_path, [("x", _summary("x", 1, 0, 0), None), ("x", _summary("x", 1, 0, 0), None)])
    with pytest.raises(ValueError, match="lacks"):
        write_report(tmp_path, [("x", {"unlearned": {}}, None)])
    bad_metrics = tmp_path / "bad.jsonl"
    bad_metrics.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        write_report(tmp_path, [("x", _summary("x", 1, 0, 0), bad_metrics)])


def test_compare_reads_saved_eval_json(tmp_path):
    paths = []
    for name, nll in (("first", 5.0), ("second", 8.0)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        summary = _summary(name, nll, 0.0, 0.1)
        summary["metrics_jsonl"] = str(_write_metrics(run_dir / "metrics.jsonl", with_random=True))
        (run_dir / "eval.json").write_text(json.dumps(summary))
        paths.append(str(run_dir / "eval.json"))

    report = main([*paths, "--out_dir", str(tmp_path / "cmp"), "--names", "A", "B"])
    text = report.read_text()
    assert _table_row(text, "forget_train / nll") == ["1.25", "5", "8"]
    _assert_real_png(report.parent / "objective_terms.png")

    with pytest.raises(FileNotFoundError):
        compare([tmp_path / "missing" / "eval.json"], tmp_path / "cmp2")


def test_report_shows_confidence_intervals(tmp_path):
    summary = _summary("ci", 3.0, 0.8, 0.05)
    summary["config"].update(rouge="muse", confidence_level=0.9, bootstrap_resamples=200)
    summary["unlearned"]["forget_train"]["ci"] = {"reproduction_rate": [0.62, 0.95], "nll": [2.5, 3.5]}
    summary["original"]["forget_train"]["ci"] = {"reproduction_rate": [0.5, 1.0]}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text(json.dumps(summary))
    text = main([str(run_dir / "eval.json"), "--out_dir", str(tmp_path / "cmp")]).read_text()
    assert _table_row(text, "forget_train / reproduction_rate") == ["0.75 [0.5, 1]", "0.8 [0.62, 0.95]"]
    assert _table_row(text, "forget_train / nll") == ["1.25", "3 [2.5, 3.5]"]
    assert not re.search(r"^\| [a-z_]+ / ci \|", text, flags=re.MULTILINE)  # the intervals are no metric of their own
    assert "preset muse (ROUGE-L f1, stemmer off)" in text
    assert "the 90% (200 resamples) percentile bootstrap interval" in text


def _mia_summary(name, auc_unlearned, intervals=True):
    """A run's ``mia`` section (dsunlearn/eval/mia.py summarize), with or without its AUC intervals."""
    section = {
        "k": 0.4,
        "member_set": "forget_train",
        "nonmember_set": "holdout",
        "num_samples": {"forget_train": 59, "holdout": 20},
        "auc": {attack: {"original": 1.0, "unlearned": auc_unlearned, "retrained": None} for attack in ATTACKS},
        "privleak": None,
    }
    if intervals:
        section["auc_ci"] = {
            attack: {"original": [1.0, 1.0], "unlearned": [0.62, 0.95], "retrained": None} for attack in ATTACKS
        }
    return {**_summary(name, 3.0, 0.8, 0.05), "mia": section}


def test_mia_table_shows_auc_intervals_and_reads_eval_json_without_them():
    runs = [("new", _mia_summary("new", 0.8), None), ("old", _mia_summary("old", 0.7, intervals=False), None)]
    text = "\n".join(_mia_lines(runs))
    assert _table_row(text, "loss") == ["1 [1, 1]", "0.8 [0.62, 0.95]", "0.7"]
    assert _table_row(text, "min_k++") == ["1 [1, 1]", "0.8 [0.62, 0.95]", "0.7"]
    # An eval.json written before the intervals existed, alone: its AUCs show without brackets.
    assert _table_row("\n".join(_mia_lines(runs[1:])), "zlib") == ["1", "0.7"]
