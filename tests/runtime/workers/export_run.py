"""One rank of a 2-rank ZeRO-3 policy engine that trains a step and exports, for tests/runtime/test_export.py.

Run with RANK/WORLD_SIZE/MASTER_* set and DS_ACCELERATOR=cpu:

    export_run.py MODEL_DIR RUN_DIR [--lora_rank R] [--train_step] [--export FOLDER:SIZE ...] [--reference]
                  [--measure_memory]

``--export`` runs ``export_hf`` into RUN_DIR/FOLDER with that ``max_shard_size``, in the order given. Rank 0 writes:
``--reference``: RUN_DIR/reference.pt, the weights as DeepSpeed's consolidated 16-bit state dict has them (LoRA:
merged by peft's ``merge_and_unload`` on a full CPU model, the export this project had before); ``--measure_memory``:
RUN_DIR/memory.json, rank 0's peak resident memory above its level before, during each export and during
DeepSpeed's consolidated gather, and the model's size.
"""

import argparse
import json
import threading
from pathlib import Path

import torch


class PeakRss:
    """Samples this process's resident memory (VmRSS) every millisecond in a thread; ``peak_extra`` is the highest
    reading above the one taken at the start, in bytes."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def peak_extra(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lora_rank", type=int, default=0)
    parser.add_argument("--train_step", action="store_true")
    parser.add_argument("--export", action="append", default=[], help="FOLDER:MAX_SHARD_SIZE")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--measure_memory", action="store_true")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from dsunlearn.objective import Segment
    from dsunlearn.runtime import distributed, ds_config, engines, export
    from dsunlearn.settings.config import ModelConfig, OutputConfig, RunConfig, TrainConfig

    rank, world_size, _ = distributed.init_distributed()
    cfg = RunConfig(
        model=ModelConfig(name_or_path=args.model_dir, precision="fp32", lora_rank=args.lora_rank, lora_alpha=8),
        train=TrainConfig(optimizer="sgd", lr=0.5, lr_schedule="constant", max_steps=1),
        output=OutputConfig(dir=str(args.run_dir)),
    )
    hidden_size = engines.text_hidden_size(AutoConfig.from_pretrained(args.model_dir))
    policy_ds_config = ds_config.build_policy_ds_config(
        ds_config.load_ds_config(cfg.train.deepspeed_config), cfg, world_size, hidden_size
    )
    engine = engines.build_policy_engine(engines.load_causal_lm(policy_ds_config, cfg), cfg, policy_ds_config)
    lm = engine.module.lm
    if args.train_step:
        # Any loss that moves every weight (the head included) will do: the export must hold the trained values.
        generator = torch.Generator().manual_seed(rank)
        input_ids = torch.randint(3, lm.config.vocab_size, (2, 8), generator=generator)
        segment = Segment(input_ids, torch.ones_like(input_ids), None, torch.arange(input_ids.numel()))
        logits = engine([segment], mode="logits")
        engine.backward(logits.logsumexp(-1).mean())
        engine.step()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    memory = {"model_bytes": sum(p.ds_numel * p.element_size() for p in lm.parameters()), "export_peak_extra": []}
    for spec in args.export:
        folder, size = spec.split(":")
        cfg.output.max_shard_size = size
        with PeakRss() as rss:
            export.export_hf(engine, lm, tokenizer, args.run_dir / folder, cfg)
        memory["export_peak_extra"].append(rss.peak_extra)

    if args.reference or args.measure_memory:
        with PeakRss() as rss:
            state_dict = engine._zero3_consolidated_16bit_state_dict()
        memory["consolidated_peak_extra"] = rss.peak_extra
        if rank == 0:
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
            if args.lora_rank:
                state_dict = _peft_merged(state_dict, lm.config, cfg)
            torch.save(state_dict, args.run_dir / "reference.pt")
            (args.run_dir / "memory.json").write_text(json.dumps(memory))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _peft_merged(state_dict: dict, config, cfg) -> dict:
    """The adapters of ``state_dict`` merged by peft into a full CPU model: the reference for the streaming merge."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dsunlearn.runtime.engines import lora_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else from_config on rank 0 alone would run zero.Init collectives
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), lora_config(cfg))
    peft_model.base_model.model.load_state_dict(state_dict, strict=True)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


if __name__ == "__main__":
    main()
