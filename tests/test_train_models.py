"""End to end on model shapes the tiny Llama does not have, on 2 CPU ranks: OPT's projected head (the head reads rows
narrower than ``hidden_size``)."""

import json

import pytest
import torch
from launching import launch

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def projected_opt_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny OPT built as OPT-350m is: the decoder's 64-wide states are projected down to 32 before the (tied) head,
    ``word_embed_proj_dim`` 32 != ``hidden_size`` 64."""
    from transformers import OPTConfig, OPTForCausalLM

    from dsunlearn.data.tiny import save_tiny_model

    config = OPTConfig(vocab_size=len(bpe_tokenizer), hidden_size=64, word_embed_proj_dim=32, ffn_dim=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                       pad_token_id=bpe_tokenizer.pad_token_id, bos_token_id=bpe_tokenizer.bos_token_id,
                       eos_token_id=bpe_tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OPTForCausalLM(config).float().eval()
    assert model.get_output_embeddings().in_features == 32 != model.config.hidden_size
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("projected_opt"))


def test_opt_with_a_projected_head_trains_with_the_reference_cache_on_and_off(projected_opt_dir, tmp_path):
    """The reference cache's rows are the head's input width (32), not hidden_size (64): the cached run logs the
    uncached run's steps."""
    runs = {}
    for cache in ("memory", "off"):
        run_dir = tmp_path / cache
        args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(projected_opt_dir),
                "--output.dir", str(run_dir), "--train.max_steps", "2", "--train.checkpoint_every", "0",
                "--model.reference_cache", cache, "--output.evaluate", "false", "--output.export", "false"]
        code, output = launch(args)
        assert code == 0, output[-4000:]
        runs[cache] = read_metrics(run_dir)
    assert [row["step"] for row in runs["memory"]] == [1, 2]
    for cached, uncached in zip(runs["memory"], runs["off"]):
        for key in ("forget_ce", "random_ce", "normal_ce", "total"):
            assert cached[key] == pytest.approx(uncached[key], rel=1e-5), key
        assert cached["normal_kl"] == pytest.approx(uncached["normal_kl"], rel=1e-3, abs=1e-7)
    assert runs["memory"][1]["normal_kl"] > 1e-6  # the second step's KL says something

