"""The same global batch gives the same numbers on any topology: 1 rank x 2 accumulation steps against 2 ranks x 1.
The npo case also stops the 2-rank run after step 2 and resumes it: s_ref, never in a checkpoint, is recomputed by
the resumed run, and its step 3 is the uninterrupted 1-rank run's."""

import json

import pytest
from launching import launch

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

COMPARED = ("forget_ce", "random_ce", "normal_kl", "total", "grad_norm")


def run_metrics(model_dir, out_dir, nproc, gradient_accumulation_steps, reduction, forget_loss, max_steps=3,
                *extra):
    code, output = launch([
        "--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
        "--model.precision", "fp32", "--train.optimizer", "sgd", "--train.lr", "0.5",
        "--train.lr_schedule", "constant", "--train.max_steps", str(max_steps), "--train.checkpoint_every", "0",
        "--train.gradient_accumulation_steps", str(gradient_accumulation_steps), "--objective.reduction", reduction,
        "--objective.forget_loss", forget_loss, "--output.export", "false", "--output.evaluate", "false", *extra,
    ], nproc=nproc)
    assert code == 0, output[-4000:]
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()], output


# npo keeps Yao's random and KL terms here, so one run covers s_ref (its own pass), the KL's reference cache and both.
@pytest.mark.parametrize("reduction, forget_loss", [("sequence_mean", "ga"), ("token_mean", "npo")])
def test_one_rank_accumulating_matches_two_ranks(tiny_model_dir, tmp_path, reduction, forget_loss):
    one_rank, _ = run_metrics(tiny_model_dir, tmp_path / "one_rank", 1, 2, reduction, forget_loss)
    if forget_loss == "npo":
        run_metrics(tiny_model_dir, tmp_path / "two_ranks", 2, 1, reduction, forget_loss, 2)
        two_ranks, output = run_metrics(tiny_model_dir, tmp_path / "two_ranks", 2, 1, reduction, forget_loss, 3,
                                        "--resume", "true")
        assert "resumed from" in output and "npo: s_ref of" in output
    else:
        two_ranks, _ = run_metrics(tiny_model_dir, tmp_path / "two_ranks", 2, 1, reduction, forget_loss)
    assert [row["step"] for row in one_rank] == [row["step"] for row in two_ranks] == [1, 2, 3]
    # The updates moved the model away from the reference (KL 0 at step 1), so steps 2 and 3 compare trained models.
    assert one_rank[2]["normal_kl"] > 5e-4
    for single, double in zip(one_rank, two_ranks):
        for key in COMPARED:
            # Each rank's micro-batch is the same on both topologies, and so are the cached reference rows and npo's
            # s_ref (both passes forward the same groups on any rank count, test_reference_cache): what is left is
            # the order of the gradient sums. abs: the KL of step 1 is rounding (~1e-9: the policy's rows come from
            # the step's batch shapes, the reference's from the cache pass's).
            assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-8), (single["step"], key)
