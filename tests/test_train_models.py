"""End to end on model shapes the tiny Llama does not have, on 2 CPU ranks: OPT's projected head (the head reads rows
narrower than ``hidden_size``), LoRA on the input embedding."""

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


LORA_TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def test_lora_on_the_embeddings_trains_and_the_export_merges_its_adapters(tiny_model_dir, tmp_path):
    """peft's lora.Embedding reads its adapters (lora_embedding_A/B) itself, outside any module's forward that ZeRO-3
    would gather them for; and they are not lora_A/lora_B. The run trains them, and the export holds them merged: it
    gives the logits of the trained model (its last checkpoint, consolidated, adapters and all)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "lora_embeddings"
    args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir", str(run_dir),
            "--train.max_steps", "2", "--train.checkpoint_every", "0", "--train.lr", "1e-2",
            "--model.lora_rank", "4", "--model.lora_alpha", "8",
            "--model.lora_target_modules", "[" + ", ".join(LORA_TARGETS) + "]", "--output.evaluate", "false"]
    code, output = launch(args)
    assert code == 0, output[-4000:]
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000002")
    adapters = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained = get_peft_model(base, adapters).base_model.model
    trained.load_state_dict({name.removeprefix("lm."): tensor for name, tensor in checkpoint.items()}, strict=True)
    assert float(trained.model.embed_tokens.lora_embedding_A["default"].abs().max()) > 0  # peft starts A at 0: trained

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    original = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(exported.state_dict()["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    input_ids = torch.arange(3, 3 + 24).view(2, 12) % exported.config.vocab_size
    with torch.no_grad():
        expected = trained.eval()(input_ids=input_ids).logits
        actual = exported.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
