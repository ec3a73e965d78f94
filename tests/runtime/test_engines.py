"""Output heads: the fused loss only where it is exact, the model's own logits elsewhere; dropout; where models load
from."""

import pytest
import torch
from torch import nn

from dsunlearn.objective import Segment
from dsunlearn.runtime.distributed import UsageError
from dsunlearn.runtime.engines import (
    UnlearningModel,
    disable_dropout,
    head_structure_problem,
    lr_lambda,
    pretrained_source,
)
from dsunlearn.settings.config import ConfigError, ModelConfig, RunConfig


def tiny_llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=False, **extra)


def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def tiny_cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25))


def tiny_falcon_h1_like():
    """A Llama whose forward multiplies its logits by ``config.lm_head_multiplier``, as Falcon-H1's does."""
    from transformers import LlamaForCausalLM

    class MultipliedLogitsLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * self.config.lm_head_multiplier
            return output

    torch.manual_seed(0)
    return MultipliedLogitsLlama(tiny_llama_config(lm_head_multiplier=0.039))


def tiny_gemma3_like():
    """A Llama that softcaps its logits with ``config.text_config.final_logit_softcapping``, where Gemma 3 keeps it (a
    cap of 0.5 bends these small logits visibly)."""
    from transformers import LlamaForCausalLM

    class NestedSoftcapLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            cap = self.config.text_config.final_logit_softcapping
            output.logits = cap * torch.tanh(output.logits / cap)
            return output

    config = tiny_llama_config()
    config.text_config = tiny_llama_config(final_logit_softcapping=0.5)
    torch.manual_seed(0)
    return NestedSoftcapLlama(config)


def tiny_biased_head():
    model = tiny_llama()
    model.lm_head = nn.Linear(16, 61, bias=True)
    return model


def chosen(lm, head_path="auto"):
    model = UnlearningModel(lm, head_path=head_path, loss_backend="chunked")
    model.choose_head_path()
    return model


def test_the_head_probe_names_what_the_fused_loss_cannot_do(caplog):
    assert head_structure_problem(tiny_llama()) is None
    assert "bias" in head_structure_problem(tiny_biased_head())
    with caplog.at_level("WARNING", logger="dsunlearn.runtime.engines"):
        assert chosen(tiny_falcon_h1_like()).head_path == "logits"
        assert chosen(tiny_cohere()).head_path == "logits"
    assert "the model's logits are 0.039 x hidden @ W^T" in caplog.text
    assert "the model's logits are 0.25 x hidden @ W^T" in caplog.text
    gemma = chosen(tiny_gemma3_like())
    assert (gemma.head_path, gemma.softcap) == ("fused", 0.5)
    for make_model in (tiny_cohere, tiny_falcon_h1_like, tiny_biased_head):
        with pytest.raises(UsageError, match="not exact"):
            chosen(make_model(), head_path="fused")


@pytest.mark.parametrize("make_reference", [tiny_falcon_h1_like, tiny_gemma3_like, tiny_biased_head])
def test_a_reference_head_the_fused_loss_would_misread_sends_the_loss_to_the_logits_path(make_reference, caplog):
    """reference_path may name another model: the fused loss reads its logits as ref_hidden @ W_ref^T with the
    policy's softcap (here none)."""
    model = chosen(tiny_llama())
    model.check_reference_head(UnlearningModel(tiny_llama()))
    assert model.head_path == "fused"
    with caplog.at_level("WARNING", logger="dsunlearn.runtime.engines"):
        model.check_reference_head(UnlearningModel(make_reference()))
    assert model.head_path == "logits" and "the reference: " in caplog.text
    assert "forward" not in vars(model.lm.lm_head)  # the attached loss is gone: the plain linear head again
    with pytest.raises(UsageError, match="the reference: "):
        chosen(tiny_llama(), head_path="fused").check_reference_head(UnlearningModel(make_reference()))


@pytest.mark.parametrize("make_model, expected_path", [
    (tiny_llama, "fused"), (tiny_cohere, "logits"), (tiny_falcon_h1_like, "logits"), (tiny_gemma3_like, "fused"),
    (tiny_biased_head, "logits"),
])
def test_loss_is_the_objective_on_the_models_own_logits(make_model, expected_path):
    """Whatever the path, the loss equals the formula on ``model(...).logits`` (scaling, softcap, bias included)."""
    model = chosen(make_model())
    assert model.head_path == expected_path
    vocab = model.lm.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    token_index = torch.tensor([2, 3, 4, 9, 10, 11])  # positions of the [2*7] grid
    segments = [Segment(input_ids, attention_mask, None, token_index)]
    targets = input_ids.reshape(-1)[token_index + 1]
    ce_weight = torch.tensor([-0.5, -0.5, 1.0, 0.0, 0.0, 0.0])
    kl_weight = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.7, 0.7])

    reference = make_model()  # same seed: identical weights, so build a different reference by perturbing
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ref_model = UnlearningModel(reference)
    with torch.no_grad():
        if model.head_path == "fused":
            ref_inputs = {"ref_hidden": ref_model(segments, mode="hidden"), "ref_head": reference.lm_head}
        else:
            ref_inputs = {"ref_logits": ref_model(segments, mode="logits")}
    loss, token_ce, token_kl = model(segments, mode="loss", targets=targets,
                                     ce_weight=ce_weight, kl_weight=kl_weight, **ref_inputs)

    with torch.no_grad():
        logits = model.lm(input_ids=input_ids).logits.reshape(-1, vocab)[token_index].double()
        ref_logits = reference(input_ids=input_ids).logits.reshape(-1, vocab)[token_index].double()
    log_p, log_q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    expected_ce = -log_p.gather(1, targets[:, None]).squeeze(1)
    expected_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = (ce_weight.double() * expected_ce).sum() + (kl_weight.double() * expected_kl).sum()
    # The terms (about ±4 nats each) nearly cancel: compare at their scale, not the small total's.
    assert float(loss.detach()) == pytest.approx(float(expected), abs=2e-6)
    assert token_ce[:3].tolist() == pytest.approx(expected_ce[:3].tolist(), abs=1e-5)
    assert token_kl[3:].tolist() == pytest.approx(expected_kl[3:].tolist(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.lm.model.layers.parameters())


def test_disable_dropout_makes_training_mode_deterministic_and_keeps_lora_dropout():
    """GPT-2 holds nn.Dropout modules and reads config rates; Llama copies ``attention_dropout`` into each attention
    module at construction and reads it in forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    llama = LlamaForCausalLM(tiny_llama_config(attention_dropout=0.5))
    input_ids = torch.arange(1, 13)[None]
    for lm in (gpt2, llama):
        lm.train()
        with torch.no_grad():
            assert not torch.equal(lm(input_ids=input_ids).logits, lm(input_ids=input_ids).logits)
            disable_dropout(lm)
            assert torch.equal(lm(input_ids=input_ids).logits, lm(input_ids=input_ids).logits)
    assert (gpt2.config.attn_pdrop, gpt2.config.resid_pdrop, gpt2.config.embd_pdrop) == (0.0, 0.0, 0.0)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.0
    adapted = get_peft_model(llama, LoraConfig(r=2, lora_dropout=0.3, target_modules=["q_proj"]))
    assert adapted.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.3


def test_the_reference_has_its_own_revision():
    def source(reference, **model):
        path, kwargs = pretrained_source(RunConfig(model=ModelConfig(**model)), reference=reference)
        return path, kwargs.get("revision")

    assert source(False, name_or_path="org/policy", revision="v1") == ("org/policy", "v1")
    # The reference is the policy itself: its revision too.
    assert source(True, name_or_path="org/policy", revision="v1") == ("org/policy", "v1")
    assert source(True, name_or_path="org/policy", revision="v1", reference_path="org/policy") == ("org/policy", "v1")
    # Another repository: its default branch, or the revision given for it.
    assert source(True, name_or_path="org/policy", revision="v1", reference_path="org/base") == ("org/base", None)
    assert source(True, name_or_path="org/policy", revision="v1", reference_path="org/base",
                  reference_revision="r2") == ("org/base", "r2")
    with pytest.raises(ConfigError, match="model.reference_revision: with LoRA"):
        RunConfig(model=ModelConfig(lora_rank=4, reference_revision="r2"))


def test_generation_still_uses_the_plain_head():
    lm = chosen(tiny_llama(), head_path="fused").lm
    out = lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_linear_schedule_decays_to_zero_after_warmup():
    assert [lr_lambda(s, 0, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_lambda(s, 2, 6, "linear") for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_lambda(3, 0, 4, "constant") == 1.0


@pytest.mark.distributed
@pytest.mark.integration
def test_a_model_with_dropout_trains_with_a_kl_of_zero_at_step_one(bpe_tokenizer, tmp_path):
    """A tiny GPT-2 with dropout 0.1 (its default) through the trainer on 2 ranks: the policy is the reference at
    step 1, so its KL is 0 unless dropout makes the two forwards differ."""
    import json

    from launching import launch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dsunlearn.data.tiny import save_tiny_model

    config = GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=bpe_tokenizer.bos_token_id, eos_token_id=bpe_tokenizer.eos_token_id,
                        pad_token_id=bpe_tokenizer.pad_token_id)
    assert config.attn_pdrop == config.resid_pdrop == config.embd_pdrop == 0.1
    torch.manual_seed(0)
    model_dir = save_tiny_model(GPT2LMHeadModel(config), bpe_tokenizer, tmp_path / "gpt2")
    run_dir = tmp_path / "run"
    code, output = launch(["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir),
                           "--output.dir", str(run_dir), "--train.max_steps", "1", "--output.evaluate", "false",
                           "--output.export", "false"])
    assert code == 0, output[-4000:]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["normal_kl"]) < 1e-6


def test_lora_on_a_tied_embedding_is_refused_before_training_and_untied_targets_pass():
    """An adapter merged into an embedding tied to the head would change the head too: refused, naming the layer,
    before any step (the export would find it only after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsunlearn.runtime.engines import tied_lora_target_problem

    def adapted(tied, targets):
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, tie_word_embeddings=tied))
        return get_peft_model(lm, LoraConfig(r=2, target_modules=targets)).base_model.model

    problem = tied_lora_target_problem(adapted(True, ["embed_tokens", "q_proj"]))
    assert "model.embed_tokens is targeted but its weight is tied" in problem and "lm_head.weight" in problem
    assert tied_lora_target_problem(adapted(True, ["q_proj"])) is None
    assert tied_lora_target_problem(adapted(False, ["embed_tokens", "q_proj"])) is None
