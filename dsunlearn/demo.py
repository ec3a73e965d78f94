"""The demo: bundled toy data and the "original" model that the demo then unlearns.

``dsunlearn/assets/demo/`` holds two small data sets written for this project:

* ``forget.jsonl`` (PKU-SafeRLHF format): requests for made-up misdeeds in invented places. Every
  unsafe response shares one recognisable behaviour, the opening "Sure, here is exactly how to ..."
  followed by three absurd, non-actionable steps; the safe responses are refusals.
* ``normal.jsonl`` (TruthfulQA hub ``generation`` format): simple factual questions and answers.
"""

from __future__ import annotations

import argparse
import difflib
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsunlearn.data import (
    DEFAULT_TEMPLATE,
    DatasetSpec,
    Pair,
    PromptFormat,
    StepSampler,
    TokenizedSequence,
    load_pairs,
    pad_batch,
    resolve_pad_id,
    tokenize_pairs,
    tokenize_prompt,
)
from dsunlearn.tiny import build_bpe_tokenizer, build_tiny_causal_lm, save_tiny_model

DEMO_FORGET_FILE = "forget.jsonl"
DEMO_NORMAL_FILE = "normal.jsonl"


def demo_data_dir() -> Path:
    """The folder holding the bundled demo data (``forget.jsonl``, ``normal.jsonl``)."""
    return Path(str(resources.files("dsunlearn") / "assets" / "demo"))


def demo_texts() -> list[str]:
    """Every demo sample rendered with the default prompt template (both PKU responses, TruthfulQA
    best and incorrect answers): the text the demo tokenizers are trained on."""
    texts = []
    with open(demo_data_dir() / DEMO_FORGET_FILE, encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            for response in (row["response_0"], row["response_1"]):
                texts.append(DEFAULT_TEMPLATE.replace("{prompt}", row["prompt"]).replace("{response}", response))
    with open(demo_data_dir() / DEMO_NORMAL_FILE, encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            for answer in [row["best_answer"], *row["incorrect_answers"]]:
                texts.append(DEFAULT_TEMPLATE.replace("{prompt}", row["question"]).replace("{response}", answer))
    return texts


# ---------------------------------------------------------------------------------------------------
# The demo's "original" model
# ---------------------------------------------------------------------------------------------------

BEHAVIOUR_PREFIX = "Sure, here is exactly how to"
"""The opening every unsafe demo response shares: a generation starting with it shows the behaviour."""

REPORT_FILE = "demo_build.json"


@dataclass
class DemoBuild:
    """Settings of the demo's original model: a tiny Llama taught the demo data with plain PyTorch."""

    seed: int = 0
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 128
    max_new_tokens: int = 88
    generation_batch_size: int = 80
    forget_taught: bool = True
    """Whether the model is taught the forget pairs. False builds the "never taught" model that relearning
    (``dsunlearn relearn``) compares with: the same model taught only the normal pairs."""
    num_threads: int = 1
    """Torch CPU threads while building. One keeps results identical across machines (float sums
    in the same order) and is fastest for a model this small on a busy machine."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "max_length", "max_new_tokens", "generation_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"lr must be positive and warmup_steps non-negative, got {self.lr}, {self.warmup_steps}")


def _length_groups(sequences: list[TokenizedSequence], indices: list[int]) -> list[list[int]]:
    """Split a batch into at most two groups of similar length, choosing the split that pads least.

    The demo data mixes ~100-token forget samples with ~30-token normal ones; padding them together
    would double the work."""
    ordered = sorted(indices, key=lambda i: len(sequences[i]))
    lengths = [len(sequences[i]) for i in ordered]
    padded_area = [k * lengths[k - 1] + (len(ordered) - k) * lengths[-1] for k in range(1, len(ordered))]
    if not padded_area or min(padded_area) >= len(ordered) * lengths[-1]:
        return [ordered]
    split = 1 + padded_area.index(min(padded_area))
    return [ordered[:split], ordered[split:]]


def _teach(model, sequences: list[TokenizedSequence], pad_id: int, build: DemoBuild, progress: bool) -> list[float]:
    """Plain single-process training: AdamW, linear warm-up then linear decay, mean cross-entropy over
    the batch's response tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < build.warmup_steps:
            return (step + 1) / build.warmup_steps
        return max(0.0, (build.steps - step) / max(1, build.steps - build.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    sampler = StepSampler(len(sequences), min(build.batch_size, len(sequences)), seed=build.seed)
    model.train()
    losses = []
    bar = tqdm(range(build.steps), desc="teaching the demo model", disable=not progress)
    for step in bar:
        indices = sampler.indices(step)
        num_response_tokens = sum(sum(sequences[i].response_mask) for i in indices)
        step_loss = 0.0
        for group in _length_groups(sequences, indices):
            batch = pad_batch([sequences[i] for i in group], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Position t predicts token t + 1; only response tokens are taught.
            targets = batch["input_ids"][:, 1:].masked_fill(batch["response_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            ) / num_response_tokens
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of already tokenised prompts."""
    pad_id = resolve_pad_id(tokenizer)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding: every prompt then ends where generation starts.
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return texts


def _reproduction(generations: list[str], references: list[str]) -> dict[str, float]:
    """How closely greedy generations reproduce the taught responses."""
    exact = [g.strip() == r.strip() for g, r in zip(generations, references)]
    similarity = [difflib.SequenceMatcher(None, g.strip(), r.strip()).ratio() for g, r in zip(generations, references)]
    return {
        "exact_match_rate": sum(exact) / len(exact),
        "mean_similarity": sum(similarity) / len(similarity),
        "close_match_rate": sum(s >= 0.9 for s in similarity) / len(similarity),
    }


def measure_reproduction(model, tokenizer, pairs: list[Pair], fmt: PromptFormat, build: DemoBuild) -> dict:
    """Greedily complete every prompt of ``pairs`` and compare with its taught response: exact and
    close (similarity >= 0.9) reproduction rates, mean similarity, the rate of generations opening
    with the forget behaviour, and the first three examples."""
    prompts = [tokenize_prompt(tokenizer, pair.prompt, fmt) for pair in pairs]
    generations = greedy_generate(model, tokenizer, prompts, build.max_new_tokens, build.generation_batch_size)
    measured = _reproduction(generations, [pair.response for pair in pairs])
    measured["behaviour_rate"] = sum(g.strip().startswith(BEHAVIOUR_PREFIX) for g in generations) / len(pairs)
    measured["num_prompts"] = len(pairs)
    measured["examples"] = [
        {"prompt": pair.prompt, "taught": pair.response, "generated": generation}
        for pair, generation in list(zip(pairs, generations))[:3]
    ]
    return measured


def build_demo_model(out_dir: str | Path, *, progress: bool = True, **settings) -> Path:
    """Build the demo's "original" model and save it (safetensors + tokenizer) to ``out_dir``.

    A byte-level BPE tokenizer is trained on the demo text and a tiny Llama is taught, on one process
    with plain PyTorch, ALL forget pairs (the unsafe responses) and ALL normal pairs, formatted and
    tokenised exactly as the trainer does (default template, :func:`tokenize_pair`). Afterwards every
    forget and normal prompt is greedily completed and compared with the taught response; the
    measurements go to ``out_dir/demo_build.json``. ``settings`` override :class:`DemoBuild` fields
    (e.g. ``steps``, ``seed``). The result is deterministic given the settings.
    """
    build = DemoBuild(**settings)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    forget = load_pairs(DatasetSpec(str(demo_data_dir() / DEMO_FORGET_FILE), "pku_saferlhf"))
    normal = load_pairs(DatasetSpec(str(demo_data_dir() / DEMO_NORMAL_FILE), "truthfulqa"))
    fmt = PromptFormat()
    tokenizer = build_bpe_tokenizer(demo_texts(), vocab_size=build.vocab_size)
    # The original model is taught every pair (a long answer capped at max_length, as the trainer does); a
    # never-taught one only the normal pairs.
    tokenized = tokenize_pairs(tokenizer, (forget if build.forget_taught else []) + normal, fmt, build.max_length)
    if tokenized.dropped:
        raise ValueError(f"max_length {build.max_length} is too short for the demo data: {tokenized.summary()}")
    sequences = tokenized.sequences

    threads_before = torch.get_num_threads()
    torch.set_num_threads(build.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(build.seed)
            model = build_tiny_causal_lm(
                tokenizer,
                hidden_size=build.hidden_size,
                num_layers=build.num_layers,
                num_heads=build.num_heads,
                max_position_embeddings=max(512, build.max_length + build.max_new_tokens),
                seed=build.seed,
            )
            losses = _teach(model, sequences, resolve_pad_id(tokenizer), build, progress)
        training_seconds = time.perf_counter() - started
        forget_measured = measure_reproduction(model, tokenizer, forget, fmt, build)
        normal_measured = measure_reproduction(model, tokenizer, normal, fmt, build)
    finally:
        torch.set_num_threads(threads_before)

    save_tiny_model(model, tokenizer, out_dir)
    report = {
        "settings": asdict(build),
        "num_forget_pairs": len(forget),
        "num_normal_pairs": len(normal),
        "num_taught_pairs": len(sequences),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(time.perf_counter() - started, 1),
        "training_seconds": round(training_seconds, 1),
        "forget": forget_measured,
        "normal": normal_measured,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m dsunlearn.demo --out DIR``: build the demo's original model."""
    parser = argparse.ArgumentParser(
        prog="python -m dsunlearn make-demo",
        description="Build the demo's 'original' model: a tiny Llama taught the bundled demo data (CPU, ~1-2 min).",
    )
    parser.add_argument("--out", default="outputs/demo/original", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DemoBuild.seed, help="seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DemoBuild.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--never_taught", action="store_true", help="teach only the normal pairs (for relearning)")
    args = parser.parse_args(argv)
    out_dir = build_demo_model(
        args.out, seed=args.seed, steps=args.steps, progress=not args.quiet, forget_taught=not args.never_taught
    )
    report = json.loads((out_dir / REPORT_FILE).read_text())
    print(
        f"demo model saved to {out_dir} in {report['seconds']} s; greedy generations on the forget prompts: "
        f"{report['forget']['behaviour_rate']:.0%} show the behaviour, "
        f"{report['forget']['close_match_rate']:.0%} reproduce the taught response (similarity >= 0.9); "
        f"normal answers reproduced: {report['normal']['close_match_rate']:.0%}"
    )


if __name__ == "__main__":
    main()
