"""End to end: ``model.reference_path`` naming another model, on 2 CPU ranks through the deepspeed launcher."""

import json
import math

import pytest
from launching import launch

from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model
from dsunlearn.runtime.distributed import EXIT_USAGE

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def run_args(model_dir, reference_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir),
            "--model.reference_path", str(reference_dir), "--output.dir", str(out_dir), "--train.max_steps", "2",
            "--train.checkpoint_every", "0", "--output.evaluate", "false", "--output.export", "false", *extra]


def test_reference_of_another_width_trains(tiny_model_dir, bpe_tokenizer, tmp_path):
    # Same tokenizer and vocabulary as the policy (hidden 32), another width: ref_hidden [N, 48], ref_weight [V, 48].
    reference = build_tiny_causal_lm(bpe_tokenizer, hidden_size=48, num_layers=1, num_heads=4, seed=1)
    reference_dir = save_tiny_model(reference, bpe_tokenizer, tmp_path / "reference")
    run_dir = tmp_path / "run"
    code, output = launch(run_args(tiny_model_dir, reference_dir, run_dir))  # finished if stopped from outside
    assert code == 0, output[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    # Two different random models: the KL to the reference is far from 0 from the first step on.
    assert math.isfinite(rows[0]["normal_kl"]) and rows[0]["normal_kl"] > 0.01
    assert all(math.isfinite(row["total"]) for row in rows)


def test_reference_with_another_vocabulary_is_a_usage_error(tiny_model_dir, bpe_tokenizer, tmp_path):
    reference = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=1, num_heads=4, seed=1)
    reference.resize_token_embeddings(len(bpe_tokenizer) + 64)
    reference_dir = save_tiny_model(reference, bpe_tokenizer, tmp_path / "reference")
    code, output = launch(run_args(tiny_model_dir, reference_dir, tmp_path / "run"))
    assert code == EXIT_USAGE, output[-4000:]
    vocab, ref_vocab = len(bpe_tokenizer), len(bpe_tokenizer) + 64
    messages = [line for line in output.splitlines() if f"vocabulary of {ref_vocab} tokens" in line]
    assert len(messages) == 1, output[-4000:]
    assert f"has {vocab}:" in messages[0]
    assert "Traceback" not in output
