"""Load a run's ZeRO-3 checkpoint with ``load_resharded`` (one rank of several), then record what the engine holds.

Run by tests/runtime/test_checkpoint_reshape.py with RANK/WORLD_SIZE/MASTER_* set and DS_ACCELERATOR=cpu, as
``reshape_load.py OUT_FILE TAG RUN_ARGS...``: the policy engine is built as train.py builds it from RUN_ARGS, and the
checkpoint TAG is loaded from ``output.dir/checkpoints``. Rank 0 saves, per trained parameter, the full fp32 master
weight and Adam moments gathered over the new partitioning, the Adam steps, the lr scheduler state and the client state.
"""

import sys
from pathlib import Path

import torch


def main(out_file: str, tag: str, *run_args: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from transformers import AutoConfig

    from dsunlearn.runtime import checkpoint_reshape, distributed, ds_config, engines
    from dsunlearn.settings.config import parse_run_config

    cfg, _ = parse_run_config(list(run_args))
    rank, world_size, _ = distributed.init_distributed()
    hidden_size = AutoConfig.from_pretrained(cfg.model.name_or_path).hidden_size
    policy_ds_config = ds_config.build_policy_ds_config(
        ds_config.load_ds_config(cfg.train.deepspeed_config), cfg, world_size, hidden_size
    )
    engine = engines.build_policy_engine(engines.load_causal_lm(policy_ds_config, cfg), cfg, policy_ds_config)
    client_state = checkpoint_reshape.load_resharded(engine, Path(cfg.output.dir) / "checkpoints", tag)

    states = {
        name: {
            "fp32": safe_get_full_fp32_param(param).cpu(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").cpu(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").cpu(),
        }
        for name, param in engine.module.named_parameters()
        if param.requires_grad
    }
    adam_steps = sorted({float(state["step"]) for state in engine.optimizer.optimizer.state.values()})
    if rank == 0:
        torch.save(
            {
                "states": states,
                "adam_steps": adam_steps,
                "lr_scheduler": engine.lr_scheduler.state_dict(),
                "lr": engine.get_lr()[0],
                "client_state": client_state,
                "world_size": world_size,
            },
            out_file,
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
