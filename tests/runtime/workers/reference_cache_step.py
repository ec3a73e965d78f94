"""The same micro-step's loss, per-token KL and gradients without and with the reference cache (one rank of several).

Run by tests/runtime/test_reference_cache.py with RANK/WORLD_SIZE/MASTER_* set and DS_ACCELERATOR=cpu: one plain SGD
step first, so the policy differs from the reference and the KL has a gradient; then the next step's batch without the
cache (its optimizer step at learning rate 0 keeps the weights), the cache built (memory), the same batch with it.
Rank 0 saves both results to the output file.
"""

import dataclasses
import logging
import os
import sys

import torch


def main(model_dir: str, out_dir: str, lora_rank: str) -> None:
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoTokenizer

    from dsunlearn import objective
    from dsunlearn.data.step_data import StepData
    from dsunlearn.runtime import distributed, engines, reference_cache
    from dsunlearn.runtime import ds_config as ds_configs
    from dsunlearn.settings.config import parse_run_config
    from dsunlearn.train import forward_loss

    logging.basicConfig(level=logging.INFO)
    rank, world_size, _ = distributed.init_distributed()
    cfg, _ = parse_run_config([
        "--config", "configs/demo.yaml", "--model.name_or_path", model_dir, "--output.dir", out_dir,
        "--train.optimizer", "sgd", "--train.lr", "0.5", "--train.lr_schedule", "constant",
        "--model.lora_rank", lora_rank, "--model.reference_cache", "memory",
    ])
    step_data = StepData(cfg, AutoTokenizer.from_pretrained(model_dir), world_size)
    model_config = __import__("transformers").AutoConfig.from_pretrained(model_dir)
    ds_config = ds_configs.build_policy_ds_config(
        ds_configs.load_ds_config(cfg.train.deepspeed_config), cfg, world_size, engines.text_hidden_size(model_config)
    )
    policy = engines.build_policy_engine(engines.load_causal_lm(ds_config, cfg), cfg, ds_config)
    reference = None
    if cfg.model.lora_rank == 0:
        ref_ds_config = ds_configs.build_reference_ds_config(ds_config, offload=False)
        reference = engines.build_reference_engine(engines.load_causal_lm(ref_ds_config, cfg, reference=True), cfg,
                                                   ref_ds_config)

    def batch_of(step):
        slot = step_data.slot(step, rank, 0)
        batch = objective.build_step_batch(
            slot.forget, slot.random, slot.normal, step_data.pad_id, cfg.objective, layout=policy.module.packing,
            ref_layout=(reference or policy).module.packing,
        )
        return dataclasses.replace(batch, normal_indices=tuple(slot.normal_indices))

    def loss_and_grads(batch, cache):
        loss, _, token_kl = forward_loss(policy, reference, batch, cache)
        policy.backward(loss)
        grads = {name: safe_get_full_grad(param).clone() for name, param in policy.module.named_parameters()
                 if param.requires_grad}
        for group in policy.optimizer.param_groups:
            group["lr"] = 0.0  # the step only clears the gradients; the scheduler restores the rate after it
        policy.step()
        return {"loss": float(loss.detach()), "token_kl": token_kl.detach().clone(), "grads": grads}

    loss, _, _ = forward_loss(policy, reference, batch_of(0))
    policy.backward(loss)
    policy.step()
    uncached = loss_and_grads(batch_of(1), None)
    ref_lm = reference.module.lm if reference is not None else None
    cache = reference_cache.prepare(cfg, step_data, policy, reference,
                                    engines.head_input_width((reference or policy).module.lm), distributed.device())
    freed = None
    if ref_lm is not None:
        head = set(map(id, ref_lm.get_output_embeddings().parameters()))
        freed = all(p.ds_tensor.numel() == 0 for p in ref_lm.parameters() if id(p) not in head)
    cached = loss_and_grads(batch_of(1), cache)
    results = [None] * world_size
    torch.distributed.all_gather_object(results, {"uncached": uncached, "cached": cached, "freed": freed,
                                                  "kl_rows": int((batch_of(1).kl_weight != 0).sum())})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # As train.py: the interpreter's teardown can abort in C++ now and then; the result is written, so end here.
    sys.stdout.flush()
    os._exit(0)
