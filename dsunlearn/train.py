"""Unlearn a causal LM with the objective of Yao, Xu & Liu on DeepSpeed ZeRO-3.

    deepspeed dsunlearn/train.py --config configs/opt-1.3b-harmful.yaml [--train.lr 2e-6 ...]
    python -m dsunlearn train --config configs/demo.yaml

Reads top to bottom: settings -> process group -> data -> engines -> (resume) -> the loop -> export.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":
    # SIGTERM is blocked in every thread of a rank and taken by the watchdog's thread (runtime/distributed.py), which
    # saves the step and ends every rank with 75. Threads inherit the mask of the thread that starts them, and `import
    # torch` imports numpy, whose OpenBLAS starts its worker threads at import: blocked after that, they keep SIGTERM
    # unblocked, the kernel hands a SIGTERM to one of them and its default action kills the rank (-15, no
    # checkpoint). So this is the first thing the script does, before any import that can start a thread.
    # (`python -m dsunlearn train` blocks it in __main__.py.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

# Run as a script (`deepspeed dsunlearn/train.py`), Python puts this file's folder first on sys.path, where each module
# and room of the package (data/, eval/, tools/, ...) would be a top-level name that hides an installed one of that name
# (DESIGN.md §3). Drop it before anything else is imported: `dsunlearn` itself comes from the install.
_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _SCRIPT_DIR]

import contextlib
import io
import logging
import random
import time
from pathlib import Path
from typing import Optional

import torch

from dsunlearn import objective
from dsunlearn.data.step_data import StepData
from dsunlearn.eval import eval_during
from dsunlearn.runtime import checkpoints, distributed, ds_config, engines, export, guards, reference_cache, step_timing
from dsunlearn.settings import noise
from dsunlearn.settings.config import RunConfig, parse_run_config

logger = logging.getLogger("dsunlearn.train")


def main(argv: Optional[list[str]] = None) -> Path:
    """Every way out is the same on every rank (distributed.py: exit codes): a failure anywhere ends all ranks within
    seconds with one message, a clean end tears the process group down."""
    noise.silence_known_noise()
    watchdog = distributed.Watchdog()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Every rank parses the same flags: a wrong one is reported by rank 0 alone (jsonargparse prints, then exits).
        quiet = contextlib.redirect_stderr(io.StringIO()) if watchdog.rank else contextlib.nullcontext()
        with quiet:
            cfg, resolved_yaml = parse_run_config(argv)
        out_dir = train(cfg, resolved_yaml, watchdog)
    except SystemExit:  # --help, or jsonargparse's message about a wrong flag
        raise
    except BaseException as err:
        watchdog.fail(err)
    watchdog.close()
    return out_dir


def train(cfg: RunConfig, resolved_yaml: str, watchdog: distributed.Watchdog) -> Path:
    rank, world_size, _ = distributed.init_distributed(cfg.train.collective_timeout_s)
    watchdog.connect(world_size, cfg.train.collective_timeout_s)
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    device = distributed.device()
    step_timer = step_timing.StepTimer(cfg.train.time_phases, device)  # train.time_phases: off, it does nothing
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    # ---- the run folder: refused if it holds another run; a resume checks its checkpoint's settings first. Nothing is
    # written before every input check below passed on every rank (watchdog.agree_on_inputs) ----
    out_dir = Path(cfg.output.dir)
    checkpoint_dir = out_dir / "checkpoints"
    ds_template = ds_config.load_ds_config(cfg.train.deepspeed_config)
    run_shape = checkpoints.RunShape.of(cfg, ds_template, world_size)
    run_folder = checkpoints.prepare_run_folder(out_dir, cfg, run_shape)
    resume_from = run_folder.resume_from

    # ---- data: every rank loads, splits and tokenises the same pairs; each step reads its slots of one global
    # example stream ----
    model_config, ref_config, tokenizer = _load_model_config_and_tokenizer(cfg)
    try:  # a bad file, data.max_length shorter than every prompt, too few pairs for the ranks: EXIT_USAGE
        step_data = StepData(cfg, tokenizer, world_size)
    except ValueError as err:
        raise distributed.UsageError(str(err)) from None
    if is_main:
        step_data.log_summary()
    gas = cfg.train.gradient_accumulation_steps

    def step_batches(step: int) -> list[objective.StepBatch]:
        """This rank's micro-batches of optimizer step ``step``, in the layouts the engines chose (packed or padded,
        engines.UnlearningModel.choose_packing; the reference's is its own model's)."""
        slots = [step_data.slot(step, rank, micro) for micro in range(gas)]
        step_term_tokens = None
        if cfg.objective.reduction == "token_mean":
            # token_mean divides by the tokens of the whole step: count every micro-batch up front, one all_reduce.
            step_term_tokens = sum(
                objective.term_token_counts(slot.forget, slot.random, slot.normal) for slot in slots
            ).to(device)
            torch.distributed.all_reduce(step_term_tokens)
        batches = []
        for slot in slots:
            batch = objective.build_step_batch(
                slot.forget, slot.random, slot.normal, step_data.pad_id, cfg.objective, step_term_tokens,
                world_size * gas, layout=policy_engine.module.packing,
                ref_layout=(ref_engine or policy_engine).module.packing,  # both probed when built (below)
                forget_reference_sums=None if forget_reference is None else forget_reference[slot.forget_indices],
            )
            batch.normal_indices = tuple(slot.normal_indices)  # the reference cache's rows of this batch
            step_timer.count_sequences(slot.forget + slot.random + slot.normal, batch.num_positions)
            batches.append(batch.to(device))
        return batches

    # ---- every input checked on every rank (the DeepSpeed config last); from here on the run writes ----
    if ref_config is not None:
        # The reference may be another model of any width, but the KL compares next-token distributions id by id.
        policy_vocab, ref_vocab = engines.text_vocab_size(model_config), engines.text_vocab_size(ref_config)
        if ref_vocab != policy_vocab:
            raise distributed.UsageError(
                f"model.reference_path {cfg.model.reference_path} has a vocabulary of {ref_vocab} tokens but "
                f"model.name_or_path {cfg.model.name_or_path} has {policy_vocab}: the reference must use the "
                f"policy's vocabulary (the same tokenizer)"
            )
    policy_ds_config = ds_config.build_policy_ds_config(
        ds_template, cfg, world_size, engines.text_hidden_size(model_config)
    )
    watchdog.agree_on_inputs()
    run_folder.claim(resolved_yaml, run_shape)

    # ---- engines: the trained model and the frozen reference, both ZeRO-3 sharded. The reference only for a term
    # that reads it: the KL retain term, npo's s_ref (one pass, below) ----
    policy_engine = engines.build_policy_engine(engines.load_causal_lm(policy_ds_config, cfg), cfg, policy_ds_config)
    ref_engine = None
    kl_term, npo_term = objective.reference_reads(cfg.objective)
    if (kl_term or npo_term) and cfg.model.lora_rank == 0:  # with LoRA the policy engine, adapters off, is the reference
        ref_ds_config = ds_config.build_reference_ds_config(policy_ds_config, cfg.model.reference_offload)
        ref_lm = engines.load_causal_lm(ref_ds_config, cfg, reference=True)
        ref_engine = engines.build_reference_engine(ref_lm, cfg, ref_ds_config)
        if cfg.model.reference_path:  # another model: is the fused loss exact for its head too?
            policy_engine.module.check_reference_head(ref_engine.module)
    policy_lm = policy_engine.module.lm
    if is_main and cfg.model.lora_rank > 0:
        trainable = sum(p.ds_numel for p in policy_lm.parameters() if p.requires_grad)
        logger.info("LoRA rank %d: %d trainable parameters; the reference is this model with its adapters off",
                    cfg.model.lora_rank, trainable)

    start_step, end_step = 0, cfg.train.max_steps
    step_guards = guards.StepGuards(cfg)
    if resume_from is not None:
        start_step = int(checkpoints.load_checkpoint(policy_engine, checkpoint_dir, resume_from)["step"])
        engines.continue_lr_schedule(policy_engine)  # train.max_steps may have grown: the new schedule's rate
        if is_main:
            logger.info("resumed from %s at step %d", checkpoint_dir / resume_from.tag, start_step)
        if step_guards.done_before(resume_from.done):  # objective.stop_forget_ce ended it: no more ascent
            end_step = start_step
            if is_main:
                logger.info("unlearning was done at step %d (forget CE %.4g > objective.stop_forget_ce=%g): going "
                            "straight to the outputs", start_step, resume_from.done["forget_ce"],
                            cfg.objective.stop_forget_ce)
    # ---- evaluation during training, best step, TensorBoard (output.eval_every, keep_best, tensorboard): the
    # original's side measured once, while the reference is alive (eval_during.py) ----
    during = eval_during.DuringTraining.start(cfg, tokenizer, policy_engine, ref_engine, rank, world_size, start_step,
                                              device)
    # ---- npo: s_ref(y) of every forget training sequence, one pass of the reference (recomputed on resume: never in
    # a checkpoint); the reference is then freed whole unless the KL term reads it ----
    forget_reference = None
    if npo_term:
        started = time.perf_counter()
        forget_reference = reference_cache.forget_reference_sums(step_data, policy_engine, ref_engine, device)
        if is_main:
            logger.info("npo: s_ref of %d forget training sequences from one pass of the reference (%.1f s)",
                        forget_reference.numel(), time.perf_counter() - started)
        if ref_engine is not None and not kl_term:
            reference_cache.free_reference(ref_engine)
            ref_engine = None
    # ---- the reference cache: the reference's rows of every normal example, computed once (or reused from disk);
    # the reference model is then freed but its head (reference_cache.py) ----
    ref_cache = None
    if kl_term:
        # The rows are what the reference's head reads: its input width, not config.hidden_size (OPT projects first).
        # With LoRA the policy is the reference.
        ref_width = engines.head_input_width((ref_engine or policy_engine).module.lm)
        ref_cache = reference_cache.prepare(cfg, step_data, policy_engine, ref_engine, ref_width, device)
        if ref_cache is not None:
            ref_engine = None  # freed: the end-of-run evaluation loads the original again
    step_timer.attach(policy_engine, ref_engine)  # after the cache pass, whose forwards belong to no step

    metrics_path = out_dir / "metrics.jsonl"
    metrics_log = checkpoints.MetricsLog(metrics_path, start_step) if is_main else None

    # ---- the loop ----
    progress = None
    if is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="unlearning", dynamic_ncols=True)
    watchdog.defer_stop(True)  # SIGTERM from here on: finish the step, save it, exit EXIT_PREEMPTED
    for step in range(start_step, end_step):
        started = time.perf_counter()
        lr = policy_engine.get_lr()[0]
        skipped_before = policy_engine.skipped_steps
        sums = torch.zeros(8, device=device)
        step_loss = torch.zeros((), device=device)
        step_tokens = torch.zeros((), device=device)
        step_positions = torch.zeros((), device=device)
        with step_timer.phase("batch"):
            batches = step_batches(step)
        for batch in batches:
            loss, token_ce, token_kl = forward_loss(policy_engine, ref_engine, batch, ref_cache)
            with step_timer.phase("backward"):
                policy_engine.backward(loss)
            with step_timer.phase("optimizer"):
                policy_engine.step()
            sums += objective.term_sums(batch, token_ce, token_kl)
            step_loss += loss.detach() / gas
            step_tokens += batch.num_tokens
            step_positions += batch.num_positions
        # Per-rank sums and means -> global values (each rank holds the same number of sequences).
        # The stop flag rides along, so all ranks agree to stop after the same step.
        stop = torch.tensor([float(watchdog.stop_requested)], device=device)
        totals = torch.cat([sums, step_loss.view(1), step_tokens.view(1), stop, step_positions.view(1)])
        torch.distributed.all_reduce(totals)
        elapsed = time.perf_counter() - started
        row = {"step": step + 1, **objective.term_means(totals[:8])}
        row.update(
            total=float(totals[8]) / world_size,
            lr=lr,
            grad_norm=_grad_norm(policy_engine),
            tokens_per_s=float(totals[9]) / elapsed,
            padded_share=1 - float(totals[9]) / float(totals[11]),
        )
        if cfg.train.time_phases:  # per-phase seconds, peak memory and the step's work, over all ranks
            row.update(step_timer.step_fields(), step_s=elapsed)
        if is_main:
            metrics_log.append(row)
            during.log_training_row(row)
            progress.update(1)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
                progress.set_postfix(_postfix(row), refresh=False)
        # Raises RunDiverged before anything of this step is saved; True: the authors' stopping rule says done.
        done = step_guards.check(row, skipped=policy_engine.skipped_steps > skipped_before)
        every = cfg.train.checkpoint_every
        stopping = bool(totals[10] > 0)
        if during.is_due(step + 1) and not stopping:  # a stop first leaves this evaluation to the resumed run
            stopping = during.evaluate(step + 1, policy_engine, watchdog)  # True: SIGTERM came during it
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.max_steps or stopping or done:
            # A done step is saved as such, so a resume goes straight to the outputs (also after a SIGTERM now).
            checkpoints.save_checkpoint(
                policy_engine, checkpoint_dir, step + 1, {"step": step + 1}, cfg.train.keep_checkpoints, run_shape,
                done=step_guards.done_record(row) if done else None,
            )
        if stopping:
            raise distributed.Preempted(
                f"stopped by SIGTERM after step {step + 1}; checkpoint saved: continue with --resume true"
                + (" (unlearning was done at this step: it goes straight to the outputs)" if done else "")
            )
        if done:
            if is_main:
                logger.info("forget CE %.4g > objective.stop_forget_ce=%g: unlearning done at step %d",
                            row["forget_ce"], cfg.objective.stop_forget_ce, step + 1)
            break
    if is_main:
        progress.close()
        metrics_log.close()
    during.close()
    watchdog.defer_stop(False)  # every step is saved: from here SIGTERM ends the run at once

    # ---- outputs ----
    final_dir = out_dir / "final"
    if cfg.output.export:
        export.export_hf(policy_engine, policy_lm, tokenizer, final_dir, cfg)
        if is_main:
            logger.info("exported the unlearned model to %s", final_dir)
    if cfg.output.evaluate:
        evaluate_run(cfg, policy_lm, ref_engine, tokenizer, final_dir, rank, world_size)
    if is_main:
        logger.info("metrics: %s; checkpoints: %s", metrics_path, checkpoint_dir)
    return out_dir


def _load_model_config_and_tokenizer(cfg: RunConfig):
    """The model's config, the reference's config (None when the reference is the model itself) and the tokenizer,
    read before any engine is built, each at its own revision: a model folder that is missing, unreadable or corrupt
    (config.json that is not JSON, no tokenizer) is the user's to fix, so it is a ``UsageError``."""
    from transformers import AutoConfig, AutoTokenizer

    configs = {}
    for setting, reference in (("name_or_path", False), ("reference_path", True)):
        if reference and cfg.model.reference_path in (None, "", cfg.model.name_or_path):
            continue
        path, load_kwargs = engines.pretrained_source(cfg, reference)
        try:
            configs[setting] = AutoConfig.from_pretrained(
                path, revision=load_kwargs.get("revision"), trust_remote_code=cfg.model.trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise distributed.UsageError(f"model.{setting}: cannot read the model config of {path!r}: "
                                         f"{_in_one_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise distributed.UsageError(f"model.name_or_path: cannot load the tokenizer of {cfg.model.name_or_path!r}: "
                                     f"{_in_one_line(err)}") from None
    return configs["name_or_path"], configs.get("reference_path"), tokenizer


def _in_one_line(err: BaseException) -> str:
    """``err``'s message on one line, with the error it was raised from (e.g. where the JSON breaks)."""
    text = " ".join(str(err).split()) or type(err).__name__
    cause = err.__cause__ or err.__context__
    return f"{text} ({' '.join(str(cause).split())})" if cause is not None and str(cause) else text


def forward_loss(policy_engine, ref_engine, batch: objective.StepBatch,
                 ref_cache: Optional[reference_cache.ReferenceCache] = None):
    """The policy's forward over [forget; random; normal] (packed, or one padded forward per term), then one loss over
    their response tokens; before it, the reference's hidden states for the normal rows (from ``ref_cache`` when
    there is one: no reference forward).

    On the fused path the reference's head goes into the loss inputs: its weight, a ZeRO-3 shard, is gathered (on
    every rank) inside the policy head's forward, only while the fused loss reads it, and never receives a gradient.
    Without a reference engine (LoRA) the policy engine with its adapters off is the reference, and the head (which
    has no adapter) is shared.
    """
    loss_inputs = {"targets": batch.targets, "ce_weight": batch.ce_weight}
    if batch.sequence_forget is not None:  # npo/simnpo: the head weighs the forget tokens after a first pass
        loss_inputs["sequence_forget"] = batch.sequence_forget
    if batch.kl_weight is not None and ref_cache is not None:
        ref_rows = _pad_reference_rows(ref_cache.rows_of(batch.normal_indices, batch.targets.device), batch)
        loss_inputs.update({"ref_hidden": ref_rows, "kl_weight": batch.kl_weight})
        if ref_cache.head is not None:
            loss_inputs["ref_head"] = ref_cache.head
    elif batch.kl_weight is not None:
        if ref_engine is None:
            reference, reference_context = policy_engine, engines.reference_mode(policy_engine.module.lm)
        else:
            reference, reference_context = ref_engine, torch.no_grad()
        # Fused path: the reference's hidden states [M_n, H] (its head weight is read inside the loss); logits path:
        # its own logits [M_n, V].
        on_logits = policy_engine.module.head_path == "logits"
        with reference_context:
            ref_selected = reference([batch.ref_segment], mode="logits" if on_logits else "hidden")
        ref_rows = _pad_reference_rows(ref_selected, batch)
        loss_inputs.update({"ref_logits" if on_logits else "ref_hidden": ref_rows, "kl_weight": batch.kl_weight})
        if ref_engine is not None and not on_logits:
            loss_inputs["ref_head"] = ref_engine.module.lm.get_output_embeddings()
    return policy_engine(batch.segments, mode="loss", **loss_inputs)


def _pad_reference_rows(ref_selected: torch.Tensor, batch: objective.StepBatch) -> torch.Tensor:
    """[M_n, D] reference rows of the normal tokens -> [M, D], one row per token as the loss wants: zeros for the
    forget and random tokens before them (their kl_weight is 0)."""
    num_tokens = batch.targets.numel()
    rows = ref_selected.new_zeros(num_tokens, ref_selected.shape[-1])
    rows[num_tokens - ref_selected.shape[0]:] = ref_selected
    return rows


def evaluate_run(cfg: RunConfig, policy_lm, ref_engine, tokenizer, final_dir: Path, rank: int, world_size: int):
    """Original vs unlearned on forget-train, forget-held-out and normal-held-out prompts, with the engines already
    built (generation runs on the sharded models with ``synced_gpus``); writes ``output.dir/eval``."""
    from dsunlearn.eval.eval_config import EvalConfig
    from dsunlearn.eval.evaluation import build_eval_sets, evaluate_models

    eval_cfg = EvalConfig.from_run(cfg, model_path=str(final_dir))
    if ref_engine is None:  # no KL term, or the reference cache freed the reference: load the original again, from the
        # trainer's own source (revision, trust_remote_code)
        dtype = engines.PRECISION_DTYPES[cfg.model.precision]
        inference_config = ds_config.inference_ds_config(dtype, cfg.model.reference_offload)
        ref_engine = engines.load_original_engine(cfg, inference_config)
        reference_lm = ref_engine.module
    else:
        reference_lm = ref_engine.module.lm
    sets, splits = build_eval_sets(cfg.data, eval_cfg.sets, eval_cfg.max_samples)
    return evaluate_models(
        policy_lm, reference_lm, tokenizer, sets, eval_cfg, rank=rank, world_size=world_size, splits=splits
    )


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _postfix(row: dict) -> dict:
    shown = {"fgt": row["forget_ce"], "rdn": row["random_ce"], "kl": row["normal_kl"], "tok/s": row["tokens_per_s"]}
    return {k: f"{v:.3g}" for k, v in shown.items() if v is not None}


if __name__ == "__main__":
    main()
    # Past a clean end (process group torn down, files closed) the interpreter's teardown is skipped: a C++ thread
    # still joinable there aborts the process now and then ("terminate called without an active exception", -6; seen
    # even after destroy_process_group).
    distributed._exit(distributed.EXIT_OK)
