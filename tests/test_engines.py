"""Output heads: the fused loss only where it is exact, the model's own logits elsewhere."""

import pytest
import torch
from torch import nn

from dsunlearn.engines import UnlearningModel, fused_head_problem, lr_lambda


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def tiny_cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25))


def test_fused_head_problem_names_what_the_fused_loss_cannot_do():
    assert fused_head_problem(tiny_llama()) is None
    assert "logit_scale=0.25" in fused_head_problem(tiny_cohere())
    biased = tiny_llama()
    biased.lm_head = nn.Linear(16, 61, bias=True)
    assert "bias" in fused_head_problem(biased)
    with pytest.raises(ValueError, match="not exact"):
        UnlearningModel(tiny_cohere(), head_path="fused")


@pytest.mark.parametrize("make_model, expected_path", [(tiny_llama, "fused"), (tiny_cohere, "logits")])
def test_loss_is_the_objective_on_the_models_own_logits(make_model, expected_path):
    """Whatever the path, the loss equals the formula on ``model(...).logits`` (scaling included)."""
    model = UnlearningModel(make_model(), head_path="auto", loss_backend="chunked")
    assert model.head_path == expected_path
    input_ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    token_index = torch.tensor([2, 3, 4, 9, 10, 11])  # positions of the [2*7] grid
    targets = input_ids.reshape(-1)[token_index + 1]
    ce_weight = torch.tensor([-0.5, -0.5, 1.0, 0.0, 0.0, 0.0])
    kl_weight = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.7, 0.7])

    reference = make_model()  # same seed: identical weights, so build a different reference by perturbing
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ref_model = UnlearningModel(reference, head_path="auto", loss_backend="chunked")
    with torch.no_grad():
        if model.head_path == "fused":
            ref_inputs = {"ref_hidden": ref_model(input_ids, attention_mask, token_index, mode="hidden"),
                          "ref_weight": reference.lm_head.weight}
        else:
            ref_inputs = {"ref_logits": ref_model(input_ids, attention_mask, token_index, mode="logits")}
    loss, token_ce, token_kl = model(input_ids, attention_mask, token_index, mode="loss", targets=targets,
                                     ce_weight=ce_weight, kl_weight=kl_weight, **ref_inputs)

    with torch.no_grad():
        logits = model.lm(input_ids=input_ids).logits.reshape(-1, 61)[token_index].double()
        ref_logits = reference(input_ids=input_ids).logits.reshape(-1, 61)[token_index].double()
    log_p, log_q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    expected_ce = -log_p.gather(1, targets[:, None]).squeeze(1)
    expected_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = (ce_weight.double() * expected_ce).sum() + (kl_weight.double() * expected_kl).sum()
    # The terms (about ±4 nats each) nearly cancel: compare at their scale, not the small total's.
    assert float(loss.detach()) == pytest.approx(float(expected), abs=2e-6)
    assert token_kl[3:].tolist() == pytest.approx(expected_kl[3:].tolist(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.lm.model.layers.parameters())


def test_generation_still_uses_the_plain_head():
    model = UnlearningModel(tiny_llama(), head_path="fused")
    lm = model.lm
    out = lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_linear_schedule_decays_to_zero_after_warmup():
    assert [lr_lambda(s, 0, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_lambda(s, 2, 6, "linear") for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_lambda(3, 0, 4, "constant") == 1.0
