"""The Hugging Face export of the trained model: sharded safetensors, config, generation config, tokenizer.

The weights stream: every rank gathers one module's parameters at a time (ZeRO-3 collectives, the same modules in
the same order everywhere) and rank 0 copies them to CPU into the current shard, writing it once it reaches
``output.max_shard_size``. So rank 0 holds at most one shard and one module, never the whole model. LoRA adapters
are merged per module while it is gathered (peft's own delta), so the export is a plain model under the base
model's names.

The folder is written as ``final.tmp-*`` beside ``final/``, synced, then renamed to ``final/`` (an earlier export
is moved aside first, then removed): ``final/`` is complete or absent. Leftovers of a killed export are removed by
the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from dsunlearn.runtime.checkpoints import fsync_dir, fsync_tree
from dsunlearn.settings.config import RunConfig, parse_size

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def export_hf(engine, lm: nn.Module, tokenizer, out_dir: Path, cfg: RunConfig) -> None:
    """Write a Hugging Face folder at ``out_dir`` that ``from_pretrained`` loads. A collective: call on every rank.

    ``lm`` is the engine's causal LM (with LoRA: the base model with adapters injected).
    """
    is_main = torch.distributed.get_rank() == 0
    writer = None
    if is_main:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_export_leftovers(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
        _chmod_as_mkdir(staging)
        writer = ShardWriter(staging, parse_size(cfg.output.max_shard_size))
    stream_weights(engine, lm, writer)
    if is_main:
        writer.finish()
        save_config(lm, cfg, staging)
        tokenizer.save_pretrained(staging)
        publish(staging, out_dir)
    torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def stream_weights(engine, lm: nn.Module, writer: Optional["ShardWriter"]) -> None:
    """Gather ``lm`` one module at a time on every rank; rank 0 (the one with a ``writer``) writes its tensors.

    Tied parameters are gathered and written once, under the name Hugging Face keeps; buffers that belong to the
    state dict are written as they are (ZeRO-3 does not partition buffers).
    """
    import deepspeed

    entries = list(_export_entries(lm))
    kept_names = _kept_names(lm, entries)
    optimizer = getattr(engine, "optimizer", None)
    # ZeRO-3 keeps small parameters gathered between steps; partition everything so each gather starts clean, as
    # DeepSpeed's own consolidated state dict does.
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()
    for prefix, module, is_lora in entries:
        owned = module.get_base_layer() if is_lora else module
        written = [(f"{prefix}{name}", param) for name, param in owned.named_parameters(recurse=False)
                   if kept_names[id(param)] == f"{prefix}{name}"]
        # A LoRA layer's delta reads its adapters too.
        gathered = list(module.parameters()) if is_lora else [param for _, param in written]
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None):
            if writer is None:
                continue
            for name, param in written:
                tensor = param.detach().to("cpu", copy=True)
                if is_lora and param is owned.weight:
                    tensor = _merged_lora_weight(module, tensor)
                writer.add(name, tensor)
            for name, buffer in owned.named_buffers(recurse=False):
                if name not in owned._non_persistent_buffers_set:
                    writer.add(f"{prefix}{name}", buffer.detach().to("cpu", copy=True))
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()


def _export_entries(lm: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """(name prefix, module, is a LoRA layer) for every module whose own tensors the export writes, in module order.

    A LoRA layer is one entry: its base layer's tensors, the adapters merged in, under the layer's own name (the base
    model's name); the modules inside it have no entry.
    """
    lora_layer = _lora_layer_type()
    inside_lora: Optional[str] = None
    for name, module in lm.named_modules():
        if inside_lora is not None and name.startswith(inside_lora):
            continue
        prefix = f"{name}." if name else ""
        if lora_layer is not None and isinstance(module, lora_layer):
            inside_lora = prefix
            yield prefix, module, True
        else:
            yield prefix, module, False


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft there are no adapters to merge
        return None
    return LoraLayer


def _kept_names(lm: nn.Module, entries: list[tuple[str, nn.Module, bool]]) -> dict[int, str]:
    """id(parameter) -> the one name it is exported under.

    A tied parameter has several names; as Hugging Face's ``save_pretrained`` does, the names the model declares as
    tied copies (``_tied_weights_keys``, e.g. lm_head.weight) give way to the source (the embedding).
    """
    tied_copies = [
        f"{name}.{key}" if name else key
        for name, module in lm.named_modules()
        for key in (getattr(module, "_tied_weights_keys", None) or {})
    ]
    names: dict[int, list[str]] = {}
    merged_weights = []
    for prefix, module, is_lora in entries:
        owned = module.get_base_layer() if is_lora else module
        for name, param in owned.named_parameters(recurse=False):
            names.setdefault(id(param), []).append(f"{prefix}{name}")
        if is_lora:
            merged_weights.append(id(owned.weight))
    for param_id in merged_weights:
        if len(names[param_id]) > 1:
            raise ValueError(f"LoRA export: {' and '.join(names[param_id])} are one tied weight; merging an adapter "
                             f"into it would change both")
    kept = {}
    for param_id, candidates in names.items():
        sources = [name for name in candidates if not any(re.search(pattern, name) for pattern in tied_copies)]
        kept[param_id] = (sources or candidates)[0]
    return kept


def _merged_lora_weight(layer: nn.Module, base_weight: torch.Tensor) -> torch.Tensor:
    """``base_weight`` (a CPU copy of the gathered base weight) plus the active adapters' deltas, the arithmetic of
    peft's ``merge`` (in place, in the base weight's dtype). Only plain LoRA: variants (DoRA, ...) and adapter biases
    merge differently, and are refused rather than exported wrong. An embedding layer keeps its adapters in
    ``lora_embedding_A/B``, a Linear or Conv layer in ``lora_A/B``; ``get_delta_weight`` knows each."""
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"LoRA export: adapter {adapter!r} is a LoRA variant or has a bias; only plain LoRA merges")
        base_weight += layer.get_delta_weight(adapter).to("cpu")
    return base_weight


class ShardWriter:
    """Collects tensors on CPU and writes safetensors shards of at most ``max_shard_size`` bytes (a larger tensor
    gets a shard of its own), named as Hugging Face names them once the count is known."""

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder = folder
        self.max_shard_size = max_shard_size
        self.current: dict[str, torch.Tensor] = {}
        self.current_size = 0
        self.shards: list[tuple[Path, list[str]]] = []  # (written file, its tensor names), in order
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.total_size += size
        if size > self.max_shard_size:
            self._write({name: tensor})
            return
        if self.current and self.current_size + size > self.max_shard_size:
            self._write(self.current)
            self.current, self.current_size = {}, 0
        self.current[name] = tensor
        self.current_size += size

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        self.shards.append((path, list(tensors)))

    def finish(self) -> None:
        """Write the last shard, give the shards their final names and, for several, write the index."""
        if self.current:
            self._write(self.current)
            self.current, self.current_size = {}, 0
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / SAFE_WEIGHTS_NAME)
            return
        weight_map = {}
        for number, (path, names) in enumerate(self.shards, start=1):
            filename = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.folder / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Config, and the atomic folder
# --------------------------------------------------------------------------------------------------------------------


def save_config(lm: nn.Module, cfg: RunConfig, folder: Path) -> None:
    """config.json and generation_config.json as the original model has them, and the model's own code for
    ``trust_remote_code`` models.

    The trained model's config is not the one to write: training turned the cache off (``use_cache``, which a
    composite config such as Gemma 3's does not even have at its top level) and dropout to 0. Only the precision is
    the export's own (the weights are written in the run's precision).
    """
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    config.dtype = lm.dtype
    config.architectures = [type(lm).__name__]  # what the folder holds, as save_pretrained writes it
    config.save_pretrained(folder)
    if lm.can_generate():
        try:
            generation_config = GenerationConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
        except OSError:  # the original has no generation_config.json: Hugging Face's own save derives one
            generation_config = lm.generation_config
        if generation_config is not None:
            generation_config.save_pretrained(folder)
    if getattr(lm, "_auto_class", None) is not None:
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(lm, folder, config=config)


def remove_export_leftovers(out_dir: Path) -> None:
    """Remove the temporary and set-aside folders of an export that was killed before it finished."""
    for pattern in (f"{out_dir.name}.tmp-*", f"{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            shutil.rmtree(leftover)


def publish(staging: Path, out_dir: Path) -> None:
    """Make the complete ``staging`` folder ``out_dir``: sync it, move an earlier export aside, rename, remove the old.

    A kill at any point leaves ``out_dir`` complete (old or new) or absent, never partly written.
    """
    fsync_tree(staging)
    set_aside = staging.with_name(staging.name.replace(".tmp-", ".old-", 1))
    if out_dir.exists():
        os.rename(out_dir, set_aside)
    os.rename(staging, out_dir)
    fsync_dir(out_dir.parent)
    if set_aside.exists():
        shutil.rmtree(set_aside)


def _chmod_as_mkdir(folder: Path) -> None:
    """mkdtemp makes a folder only its owner can read; final/ gets the permissions a plain mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)

