"""The embedded demo, shortened, end to end: teach a tiny model the demo data, unlearn it under ZeRO-3 on one CPU rank
with the demo's global batch, evaluate original vs unlearned. Thresholds leave a wide margin: the full demo's numbers
(2 ranks) are in the README."""

import json

import pytest
from launching import REPO, launch

from dsunlearn.tools.demo import build_demo_model

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def one_rank_global_batch(config: str) -> list[str]:
    """Flags that give one rank twice the config's per-rank batches: the 2-rank demo's global batch, so each step
    sees the same examples (DESIGN §6a: a function of seed, step and global index, never of the rank count). The
    quality thresholds do not depend on the rank count; a rank's start-up (~12 CPU-s) does."""
    import yaml

    train = yaml.safe_load((REPO / config).read_text())["train"]
    return ["--train.forget_batch_size", str(2 * train["forget_batch_size"]),
            "--train.normal_batch_size", str(2 * train["normal_batch_size"])]


def test_short_demo_unlearns_forget_and_keeps_normal(tmp_path):
    # The build's own greedy check of every pair is cut to one token (the same model: the check runs after teaching;
    # the evaluation below measures the reproduction).
    original = build_demo_model(tmp_path / "original", progress=False, steps=120, max_new_tokens=1)
    run_dir = tmp_path / "unlearned"
    code, output = launch([
        "--config", "configs/demo.yaml", "--model.name_or_path", str(original), "--output.dir", str(run_dir),
        "--train.max_steps", "20", "--train.checkpoint_every", "0", *one_rank_global_batch("configs/demo.yaml"),
        "--output.eval_max_samples", "6", "--output.eval_max_new_tokens", "64",
    ], nproc=1)
    assert code == 0, output[-4000:]
    summary = json.loads((run_dir / "eval" / "eval.json").read_text())
    before, after = summary["original"], summary["unlearned"]
    assert before["forget_train"]["reproduction_rate"] >= 0.75  # the original learned the unwanted behaviour
    assert after["forget_train"]["nll"] > before["forget_train"]["nll"] + 0.2  # and unlearned it
    assert after["forget_held_out"]["nll"] > before["forget_held_out"]["nll"]  # also on prompts it never trained on
    assert after["normal_held_out"]["kl"] < 0.3  # while staying close to the original on normal data
    assert (run_dir / "eval" / "report.md").is_file() and (run_dir / "eval" / "objective_terms.png").is_file()


@pytest.mark.parametrize("application, steps", [("copyright", 40), ("hallucination", 20)])
def test_short_application_demo_lowers_the_behaviour_and_keeps_normal(tmp_path, application, steps):
    """Each application's demo, shortened: the taught behaviour (its own metric) goes down on the unlearned examples
    while the normal KL stays small."""
    # The book's overlapping windows take the demo's full teaching to be memorised; the build's own greedy check of
    # every window is cut to one token (the evaluation below measures the behaviour).
    teaching_steps = {"copyright": 200, "hallucination": 120}[application]
    original = build_demo_model(tmp_path / "original", application=application, progress=False,
                                steps=teaching_steps, max_new_tokens=1)
    run_dir = tmp_path / "unlearned"
    config = f"configs/demo-{application}.yaml"
    code, output = launch([
        "--config", config, "--model.name_or_path", str(original),
        "--output.dir", str(run_dir), "--train.max_steps", str(steps), "--train.checkpoint_every", "0",
        *one_rank_global_batch(config),
        "--output.eval_max_samples", "8", "--output.eval_max_new_tokens", "40", "--output.export", "false",
    ], nproc=1)
    assert code == 0, output[-4000:]
    summary = json.loads((run_dir / "eval" / "eval.json").read_text())
    before, after = summary["original"], summary["unlearned"]
    assert before["forget_train"]["behaviour_rate"] >= 0.75  # the original learned the behaviour
    assert after["forget_train"]["behaviour_rate"] <= before["forget_train"]["behaviour_rate"] - 0.5  # unlearned
    assert after["forget_train"]["nll"] > before["forget_train"]["nll"] + 0.2
    assert after["normal_held_out"]["kl"] < 0.3
    own = {"copyright": ("bleu", "rouge_l_recall"), "hallucination": ("hallucination_rate",)}[application]
    assert all(name in after[set_name] for name in own for set_name in ("forget_train", "forget_held_out"))
