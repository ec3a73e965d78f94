"""The authors' loop (kevinyaobytedance/llm_unlearn), which the step benchmark measures dsunlearn against: three policy
forwards (forget, random, normal), each padded on its own, materialised logits, a full second copy of the model as the
reference with a forward every step, the true KL on normal response tokens, torch AdamW. It runs in its own subprocess
(``python -m dsunlearn.tools.bench_step --paper-worker``), without DeepSpeed; and the FLOPs a step's real tokens need.
"""

from __future__ import annotations

import time

import torch

from dsunlearn.tools.bench_cases import Case, build_run_config


def body_parameters(model) -> int:
    """Parameters of the transformer layers: those every token's matmuls read (not the embedding, not the head)."""
    return sum(p.numel() for p in model.model.layers.parameters())


def step_flops(sequences, normal_sequences, body_params: int, hidden_size: int, vocab_size: int,
               num_layers: int) -> int:
    """The FLOPs a step's real tokens need: 6 x body parameters x tokens for the trained forward+backward, 2 x for the
    reference forward of the normal sequences, the head (6HV trained, 2HV reference) at the positions the loss scores,
    and causal attention (QK^T and AV: 2 n^2 H per layer and forward of an n-token sequence, x3 when trained)."""

    def totals(group):
        return (sum(len(s) for s in group), sum(sum(s.response_mask) for s in group),
                sum(len(s) ** 2 for s in group))

    tokens, scored, squares = totals(sequences)
    normal_tokens, normal_scored, normal_squares = totals(normal_sequences)
    return (6 * body_params * tokens + 2 * body_params * normal_tokens
            + 6 * hidden_size * vocab_size * scored + 2 * hidden_size * vocab_size * normal_scored
            + 2 * num_layers * hidden_size * (3 * squares + normal_squares))


def _sequence_mean(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] values, [B, L-1] mask -> mean over each sequence's masked positions, then over sequences."""
    return ((token_values * mask).sum(1) / mask.sum(1)).mean()


def paper_loop(case: Case) -> dict:
    """The authors' loop on ``case``: per step, its work, phase seconds, peak memory and FLOPs; step 0's losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsunlearn.data.step_data import StepData
    from dsunlearn.data.tokenization import pad_batch
    from dsunlearn.runtime import step_timing
    from dsunlearn.runtime.engines import PRECISION_DTYPES, disable_dropout

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = step_timing.StepTimer(True, device)
    cfg = build_run_config(case, 1, out_dir="unused")
    dtype = PRECISION_DTYPES[cfg.model.precision]
    tokenizer = AutoTokenizer.from_pretrained(case.model_dir)
    model = AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=dtype).to(device)
    disable_dropout(model)
    model.train()
    reference = AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=dtype).to(device).eval()
    reference.requires_grad_(False)
    train = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    step_data = StepData(cfg, tokenizer, world_size=1)
    objective = cfg.objective
    config = model.config
    body_params = body_parameters(model)
    steps = []
    for step in range(case.steps):
        started = time.perf_counter()
        with timer.phase("batch"):
            slot = step_data.slot(step, 0, 0)
            terms = {name: {k: v.to(device) for k, v in pad_batch(group, step_data.pad_id).items()}
                     for name, group in (("forget", slot.forget), ("random", slot.random), ("normal", slot.normal))}
        term_values = {}
        for name, batch in terms.items():
            timer.count_work(batch["input_ids"], batch["attention_mask"])
            # Position t predicts token t+1: [B, L-1] targets and the mask of the response tokens among them.
            targets = batch["input_ids"][:, 1:]
            scored = (batch["response_mask"] * batch["attention_mask"])[:, 1:].to(torch.float32)
            with timer.phase("policy_forward"):
                hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            if name == "normal":
                with timer.phase("reference_forward"), torch.no_grad():
                    ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with timer.phase("head_loss"):
                log_probs = torch.log_softmax(model.lm_head(hidden)[:, :-1].float(), -1)  # [B, L-1, V]
                if name == "normal":
                    ref_log_probs = torch.log_softmax(ref_logits[:, :-1].float(), -1)
                    token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)  # [B, L-1]
                    term_values[name] = _sequence_mean(token_kl, scored)
                else:
                    token_ce = -log_probs.gather(-1, targets[..., None]).squeeze(-1)  # [B, L-1]
                    term_values[name] = _sequence_mean(token_ce, scored)
        loss = (-objective.forget_weight * term_values["forget"] + objective.random_weight * term_values["random"]
                + objective.normal_weight * term_values["normal"])
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - started
        record = timer.step_fields()
        record.update(
            step=step + 1, step_s=step_s,
            forget_ce=float(term_values["forget"].detach()), random_ce=float(term_values["random"].detach()),
            normal_kl=float(term_values["normal"].detach()),
            flops=step_flops(slot.forget + slot.random + slot.normal, slot.normal, body_params, config.hidden_size,
                             config.vocab_size, config.num_hidden_layers),
        )
        steps.append(record)
    return {"steps": steps}
