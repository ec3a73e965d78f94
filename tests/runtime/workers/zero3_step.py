"""One step of the full objective on a ZeRO-3 policy engine and a ZeRO-3 reference engine (one rank of several).

Run by tests/runtime/test_zero3_step.py with RANK/WORLD_SIZE/MASTER_* set and DS_ACCELERATOR=cpu. Rank 0 saves the full
gradients (before the step) and the full updated weights (after it) to the output file.
"""

import os
import sys

import torch


def main(policy_dir: str, reference_dir: str, out_file: str, backend: str, head_path: str, packing: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from dsunlearn.runtime import distributed, engines
    from dsunlearn.runtime import ds_config as ds_configs
    from dsunlearn.train import forward_loss

    # The test module beside this folder, and tests/ for the launching helpers it imports (as pytest's path has them).
    tests_dir = __import__("pathlib").Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(tests_dir / "runtime"), str(tests_dir)]
    from test_zero3_step import make_config, rank_batch

    rank, world_size, _ = distributed.init_distributed()
    cfg = make_config(policy_dir, reference_dir, backend, head_path, packing)
    from transformers import AutoConfig

    hidden_size = AutoConfig.from_pretrained(policy_dir).hidden_size
    ds_config = ds_configs.build_policy_ds_config(
        ds_configs.load_ds_config(cfg.train.deepspeed_config), cfg, world_size, hidden_size
    )
    ref_head_status = {"policy_layers": [], "fused_loss": []}  # the reference head weight's ZeRO-3 status, seen there

    def ref_head_status_at(place):
        ref_head_status[place].append(reference.module.lm.get_output_embeddings().weight.ds_status.name)

    import dsunlearn.kernels

    fused_linear_ce_kl = dsunlearn.kernels.fused_linear_ce_kl

    def recording_fused_linear_ce_kl(*args, **kwargs):
        ref_head_status_at("fused_loss")
        return fused_linear_ce_kl(*args, **kwargs)

    dsunlearn.kernels.fused_linear_ce_kl = recording_fused_linear_ce_kl  # the policy head binds it when it is built
    policy = engines.build_policy_engine(engines.load_causal_lm(ds_config, cfg), cfg, ds_config)
    ref_ds_config = ds_configs.build_reference_ds_config(ds_config, offload=False)
    reference = engines.build_reference_engine(engines.load_causal_lm(ref_ds_config, cfg, reference=True), cfg,
                                          ref_ds_config)

    for layer in policy.module.lm.model.layers:
        layer.register_forward_pre_hook(lambda *_: ref_head_status_at("policy_layers"))

    batch = rank_batch(rank, cfg, policy.module.packing, reference.module.packing)
    loss, _, _ = forward_loss(policy, reference, batch)
    policy.backward(loss)
    names = [name for name, _ in policy.module.named_parameters()]
    grads = {name: safe_get_full_grad(param).clone() for name, param in policy.module.named_parameters()}
    policy.step()
    weights = {name: safe_get_full_fp32_param(param).clone() for name, param in policy.module.named_parameters()}
    losses = [torch.zeros(()) for _ in range(world_size)]
    torch.distributed.all_gather(losses, loss.detach().reshape(()))
    if rank == 0:
        torch.save({"names": names, "grads": grads, "weights": weights, "losses": [float(x) for x in losses],
                    "head_path": policy.module.head_path, "ref_head_status": ref_head_status,
                    "packing": [policy.module.packing, reference.module.packing]}, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:7])
    # As train.py: the interpreter's teardown can abort in C++ now and then ("terminate called without an active
    # exception"), even after destroy_process_group; the result is written, so end here.
    sys.stdout.flush()
    os._exit(0)
