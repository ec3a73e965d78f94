"""One step of the full objective under ZeRO-3 on 2 CPU ranks equals the same step in one plain PyTorch process.

The ranks run the layout the engines chose (packed, or one padded forward per term); the single process runs the
old layout, every sequence of a rank in one batch padded to the longest. Plain SGD, so the updated weights expose the
gradient's scale too (Adam's first step would hide it: it normalises).
"""

import os
from pathlib import Path

import pytest
import torch
from launching import free_port
from warm_start import popen_python

from dsunlearn.data.tokenization import TokenizedSequence, pad_batch
from dsunlearn.objective import PADDED, build_step_batch, response_positions
from dsunlearn.settings.config import ModelConfig, ObjectiveConfig, RunConfig, TrainConfig

WORLD_SIZE = 2
LR = 0.5
VOCAB = 97


def make_config(policy_dir: str, reference_dir: str, backend: str = "chunked", head_path: str = "auto",
                packing: str = "auto") -> RunConfig:
    return RunConfig(
        model=ModelConfig(name_or_path=policy_dir, reference_path=reference_dir, precision="fp32", loss_backend=backend,
                          head_path=head_path, packing=packing),
        objective=ObjectiveConfig(forget_weight=0.5, random_weight=1.0, normal_weight=2.0, num_random_answers=2),
        train=TrainConfig(optimizer="sgd", lr=LR, lr_schedule="constant", max_steps=1, forget_batch_size=2, normal_batch_size=2),
    )


def _Sequence(generator, prompt_len, response_len):
    ids = torch.randint(3, VOCAB, (prompt_len + response_len,), generator=generator).tolist()
    return TokenizedSequence(input_ids=ids, response_mask=[0] * prompt_len + [1] * response_len)


def rank_sequences(rank: int, cfg: RunConfig):
    """This rank's micro-batch: 2 forget, 2*K random and 2 normal sequences of varied lengths (so padding matters),
    the forget answers longer than the others."""
    generator = torch.Generator().manual_seed(1000 + rank)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))
    forget = [_Sequence(generator, draw(2, 6), draw(6, 14)) for _ in range(2)]
    random = [_Sequence(generator, draw(2, 6), draw(1, 4)) for _ in range(2 * cfg.objective.num_random_answers)]
    normal = [_Sequence(generator, draw(2, 6), draw(1, 7)) for _ in range(2)]
    return forget, random, normal


def rank_batch(rank: int, cfg: RunConfig, layout: str, ref_layout: str):
    return build_step_batch(*rank_sequences(rank, cfg), pad_id=0, objective=cfg.objective, layout=layout,
                            ref_layout=ref_layout)


def _old_padded_inputs(sequences):
    """Every sequence in one batch padded to the longest, and the flat positions that predict a response token."""
    padded = pad_batch(sequences, pad_id=0)
    token_index, targets, _ = response_positions(padded["response_mask"], padded["input_ids"])
    return padded["input_ids"], padded["attention_mask"], token_index, targets


def _tiny_llama(path: Path, seed: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


def _single_process_step(policy_dir, reference_dir, cfg):
    """The same step with plain PyTorch: materialised logits through the `torch` backend, mean over ranks' losses."""
    from transformers import AutoModelForCausalLM

    from dsunlearn.kernels import fused_linear_ce_kl

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    losses = []
    for rank in range(WORLD_SIZE):
        forget, random, normal = rank_sequences(rank, cfg)
        batch = rank_batch(rank, cfg, PADDED, PADDED)  # the weights; the tokens are in the same order in any layout
        input_ids, attention_mask, token_index, targets = _old_padded_inputs(forget + random + normal)
        assert targets.tolist() == batch.targets.tolist()
        hidden = policy.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        hidden = hidden.reshape(-1, hidden.shape[-1])[token_index]
        with torch.no_grad():
            ref_input_ids, ref_attention_mask, ref_token_index, _ = _old_padded_inputs(normal)
            ref_hidden = reference.model(input_ids=ref_input_ids, attention_mask=ref_attention_mask)[0]
            ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])[ref_token_index]
        padded_ref = torch.zeros_like(hidden)
        padded_ref[-ref_hidden.shape[0]:] = ref_hidden
        losses.append(
            fused_linear_ce_kl(
                hidden, policy.lm_head.weight, batch.targets, batch.ce_weight, padded_ref, reference.lm_head.weight,
                batch.kl_weight, backend="torch",
            )
        )
    # DeepSpeed averages the ranks' gradients: the global objective is the mean of the ranks' losses.
    torch.stack(losses).mean().backward()
    grads = {"lm." + name: p.grad.clone() for name, p in policy.named_parameters()}
    weights = {"lm." + name: (p - LR * p.grad).detach() for name, p in policy.named_parameters()}
    return [float(x.detach()) for x in losses], grads, weights


def _relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tied, backend, head_path, packing",
    [(False, "chunked", "auto", "auto"), (True, "chunked", "auto", "padded"), (False, "triton", "auto", "auto"),
     (False, "torch", "logits", "auto")],
    ids=["untied_head", "tied_embeddings_padded_per_term", "triton_interpreter", "logits_path"],
)
def test_zero3_step_matches_single_process(tmp_path, tied, backend, head_path, packing):
    # The triton case runs the trainer's head path with the Triton kernel in Triton's CPU interpreter; the logits
    # case the path for heads the fused loss cannot stand in for (the model's own logits, materialised).
    # Tied embeddings: the head weight is the embedding, a parameter used by two modules under ZeRO-3.
    # packing=auto packs (a Llama keeps packed sequences apart); padded runs three forwards per rank, one per term.
    policy_dir, reference_dir = tmp_path / "policy", tmp_path / "reference"
    _tiny_llama(policy_dir, seed=0, tied=tied)
    _tiny_llama(reference_dir, seed=1, tied=tied)  # a different reference, so the KL term has a non-zero gradient
    out_file = tmp_path / "zero3.pt"
    worker = Path(__file__).parent / "workers" / "zero3_step.py"
    env = dict(os.environ, DS_ACCELERATOR="cpu", WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               **({"TRITON_INTERPRET": "1"} if backend == "triton" else {}))
    procs = [
        popen_python([str(worker), str(policy_dir), str(reference_dir), str(out_file), backend, head_path, packing],
                     dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
        for rank in range(WORLD_SIZE)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs[-1].splitlines()[-40:])

    result = torch.load(out_file)
    assert result["head_path"] == ("logits" if head_path == "logits" else "fused")  # the probe passes a plain head
    assert result["packing"] == ["padded" if packing == "padded" else "packed"] * 2  # the policy's, the reference's
    if result["head_path"] == "fused":
        # The reference head [V, H] is gathered only inside the policy head's fused loss, not through the layers.
        assert set(result["ref_head_status"]["policy_layers"]) == {"NOT_AVAILABLE"}
        assert result["ref_head_status"]["fused_loss"] == ["AVAILABLE"]
    cfg = make_config(str(policy_dir), str(reference_dir))
    losses, grads, weights = _single_process_step(policy_dir, reference_dir, cfg)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert set(result["grads"]) == set(grads)
    for name in grads:
        assert grads[name].norm() > 0, name
        assert _relative_error(result["grads"][name], grads[name]) < 1e-5, name
        assert _relative_error(result["weights"][name], weights[name]) < 1e-5, name
