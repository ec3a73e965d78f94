"""The Hugging Face export of the trained model (safetensors, config, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsunlearn.config import RunConfig
from dsunlearn.engines import lora_config


def export_hf(engine, lm: nn.Module, tokenizer, out_dir: Path, cfg: RunConfig, prefix: str = "lm.") -> None:
    """Write a Hugging Face folder (safetensors, config, tokenizer) that ``from_pretrained`` loads.

    The consolidated state dict is gathered on every rank (a collective) and written by rank 0. LoRA adapters are
    merged into the weights, so the export is a plain model.
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if torch.distributed.get_rank() == 0:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.lora_rank > 0:
            merged = merge_lora(state_dict, lm.config, cfg)
            merged.save_pretrained(out_dir, safe_serialization=True)
        else:
            lm.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    torch.distributed.barrier()


def merge_lora(state_dict: dict, config, cfg: RunConfig) -> nn.Module:
    """A plain CPU model with the adapters of ``state_dict`` merged in, by peft's own merge (fan-in/fan-out layouts
    and scaling as peft defines them). Rank 0 only: the full model is built in CPU memory."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state_dict.values())).dtype
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=dtype), lora_config(cfg))
    adapted = peft_model.base_model.model
    missing, unexpected = adapted.load_state_dict(state_dict, strict=False)
    # Tied weights appear once in the consolidated state dict; anything else missing would be a silent bug.
    missing = [k for k in missing if k not in _tied_keys(adapted)]
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return peft_model.merge_and_unload()


def _tied_keys(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied
