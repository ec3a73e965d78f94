"""End to end: ``deepspeed dsunlearn/train.py`` on 2 CPU ranks writes metrics, checkpoints, resumes, exports."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from launching import launch
from warm_start import popen_python

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def demo_args(model_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", "4", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "0", *extra]


def test_train_checkpoint_resume_export(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    no_evaluation = ("--output.evaluate", "false")  # evaluation at the end of training: test_evaluation, the LoRA test
    code, output = launch(demo_args(tiny_model_dir, run_dir, *no_evaluation))
    assert code == 0, output[-4000:]
    straight = read_metrics(run_dir)
    assert [row["step"] for row in straight] == [1, 2, 3, 4]
    first = straight[0]
    assert abs(first["normal_kl"]) < 1e-6  # the reference is the original model: KL is 0 before any update
    assert first["forget_ce"] > 0 and first["random_ce"] > 0 and first["normal_ce"] > 0
    assert first["total"] == pytest.approx(-0.5 * first["forget_ce"] + first["random_ce"] + first["normal_kl"], rel=1e-5)
    assert straight[-1]["normal_kl"] > 0 and straight[-1]["forget_ce"] > first["forget_ce"]
    assert all(row["grad_norm"] > 0 and row["tokens_per_s"] > 0 for row in straight)
    assert (run_dir / "config.yaml").read_text().count("max_steps: 4") == 1
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert (checkpoints / "step_00000002").is_dir()

    # A crash after step 2: later checkpoints and metrics are gone. Resuming must replay steps 3-4 exactly.
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")
    shutil.rmtree(run_dir / "final")
    code, output = launch(demo_args(tiny_model_dir, run_dir, *no_evaluation, "--resume", "true"))
    assert code == 0, output[-4000:]
    assert "resumed from" in output
    resumed = read_metrics(run_dir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for before, after in zip(straight[2:], resumed[2:]):
        for key in ("forget_ce", "random_ce", "normal_kl", "total", "lr"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), key

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "final"
    assert (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer("### Question: What colour is fresh grass?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits, original_logits = model(ids).logits, original(ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, original_logits)  # it was trained


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path):
    """A preempted job (SIGTERM, as SLURM sends) stops after the current step with a checkpoint of that step."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = demo_args(tiny_model_dir, run_dir)
    args[args.index("--train.max_steps") + 1] = "500"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    process = popen_python(["-m", "dsunlearn", "train", *args], env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 75, output[-4000:]  # EXIT_PREEMPTED
    last_step = read_metrics(run_dir)[-1]["step"]
    assert 3 <= last_step < 500
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last_step:08d}"
    assert "--resume true" in output


def test_lora_uses_the_base_model_as_reference_and_exports_merged_weights(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "lora"
    args = demo_args(tiny_model_dir, run_dir, "--model.lora_rank", "4", "--model.lora_alpha", "8",
                     "--train.lr", "1e-2", "--train.checkpoint_every", "0",
                     # the evaluation loads the original beside the LoRA run (which built no reference): a few prompts
                     "--output.eval_max_samples", "4", "--output.eval_max_new_tokens", "16")
    code, output = launch(args)
    assert code == 0, output[-4000:]
    assert "the reference is this model with its adapters off" in output
    assert (run_dir / "eval" / "eval.json").is_file()
    metrics = read_metrics(run_dir)
    assert abs(metrics[0]["normal_kl"]) < 1e-6  # adapters start at B = 0: the model is the reference
    assert metrics[-1]["normal_kl"] > 1e-6 and metrics[-1]["forget_ce"] > metrics[0]["forget_ce"]

    from safetensors.torch import load_file

    exported = load_file(run_dir / "final" / "model.safetensors")
    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert set(exported) == set(original)  # merged: a plain model, no adapter tensors
    assert torch.equal(exported["lm_head.weight"], original["lm_head.weight"])  # the head has no adapter
    changed = [k for k in original if not torch.equal(exported[k], original[k])]
    assert any("q_proj" in k for k in changed) and all("norm" not in k for k in changed)
