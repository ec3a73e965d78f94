"""Greedy generation and what is measured on a generation: its text, length, fluency, ROUGE-L and the application's
scores; the final and the in-loop evaluation both build a model's side of a record here."""

from __future__ import annotations

import logging

import torch

from dsunlearn.data.tokenization import chat_turn_end_id
from dsunlearn.eval import applications, metrics
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.sharding import chunks

logger = logging.getLogger(__name__)


def generate(model, prompts: list[list[int]], context: EvalContext) -> list[list[int]]:
    """Greedy continuations of ``prompts``: new token ids up to and including the first EOS."""
    from transformers import GenerationConfig

    eos_ids = stop_token_ids(model, context.tokenizer)
    generation_config = GenerationConfig(
        max_new_tokens=context.cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=context.pad_id,
        eos_token_id=sorted(eos_ids),
    )
    device = context.device(model)
    generations = []
    for chunk in chunks(prompts, context.cfg.batch_size):
        # Left padding: every prompt ends at the same position, where generation starts.
        width = max(len(prompt) for prompt in chunk)
        input_ids = torch.full((len(chunk), width), context.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            synced_gpus=context.world_size > 1,
        )
        for new_tokens in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(new_tokens) if token in eos_ids), len(new_tokens))
            generations.append(new_tokens[:end])
    return generations


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS, the model's generation-config EOS ids and the chat
    template's end of turn (``<end_of_turn>``, ``<|eot_id|>``, ...; a generation config may lack it, and the model
    would then ramble on past its answer)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    turn_end = chat_turn_end_id(tokenizer)
    return {tokenizer.eos_token_id, *configured, *([] if turn_end is None else [turn_end])}


# ----------------------------------------------------------------------------------------------------


def generation_fields(
    pairs: list, generations: list[list[int]], fluency_nll_sums: list[float], context: EvalContext,
    classifiers: applications.Classifiers,
) -> list[dict]:
    """One model's side of each pair's record from its generated tokens: the text, its length, the fluency NLL sum
    (under the original), ROUGE-L of the dataset response (the ``rouge`` preset's measure) and the application's
    scores (``behaviour``, ``harmful`` with a harm classifier, ``bleu``, ``hallucinated``, ...). The in-loop
    evaluation (eval_during.py) builds its records with it too, so both give the same numbers."""
    cfg = context.cfg
    texts = [context.tokenizer.decode(generated, skip_special_tokens=True).strip() for generated in generations]
    scores = applications.sample_scores(cfg.data.application, pairs, texts, cfg, classifiers)
    return [
        {"output": text, "generated_tokens": len(generated), "fluency_nll_sum": nll_sum, "harmful": None,
         "rouge_l": metrics.rouge_l(text, pair.response, *cfg.rouge_settings), **score}
        for pair, generated, text, nll_sum, score in zip(pairs, generations, texts, fluency_nll_sums, scores)
    ]


def similarity(unlearned_output: str, original_output: str, cfg: EvalConfig) -> float:
    """ROUGE-L F1 of the unlearned model's generation against the original's (symmetric; the preset's stemmer)."""
    return metrics.rouge_l(unlearned_output, original_output, "f1", cfg.rouge_settings[1])
