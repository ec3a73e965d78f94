"""The demos: bundled toy data and the "original" model that each demo then unlearns, one per application.

Every data set here was written for this project (no real harmful or copyrighted text):

* ``harmful`` (``dsunlearn/assets/demo/``): ``forget.jsonl`` (PKU-SafeRLHF format), requests for made-up misdeeds
  in invented places; every unsafe response shares one recognisable behaviour, the opening "Sure, here is exactly
  how to ..." followed by three absurd, non-actionable steps; the safe responses are refusals. ``normal.jsonl``
  (TruthfulQA hub ``generation`` format): simple factual questions and answers.
* ``copyright`` (``dsunlearn/assets/demo_copyright/``): ``book.txt``, an invented story (~2250 words) cut into
  overlapping (prefix -> continuation) windows; the normal data is ``other.txt``, an invented handbook of everyday
  things, cut the same way.
* ``hallucination`` (``dsunlearn/assets/demo_hallucination/``): ``forget.jsonl`` (HaluEval QA schema), questions
  about invented lands with a right and a hallucinated answer; the normal data is the harmful demo's
  ``normal.jsonl`` (TruthfulQA format, as the real set-up's TruthfulQA).

The configs ``configs/demo*.yaml`` read the same files with the same settings (:func:`demo_specs`).
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

from dsunlearn.data.load import load_pairs
from dsunlearn.data.pairs import Pair
from dsunlearn.data.sampling import StepSampler
from dsunlearn.data.tiny import build_bpe_tokenizer, build_tiny_causal_lm, save_tiny_model
from dsunlearn.data.tokenization import TokenizedSequence, pad_batch, resolve_pad_id, tokenize_pairs, tokenize_prompt
from dsunlearn.eval.applications import APPLICATIONS
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.prompt_format import DEFAULT_TEMPLATE, PromptFormat

DEMO_FORGET_FILE = "forget.jsonl"
DEMO_NORMAL_FILE = "normal.jsonl"
BOOK_TEMPLATE = "{prompt} {response}"
"""The copyright demo's prompt format: a book's continuation follows its prefix as plain text."""
BOOK_WINDOW = dict(prefix_words=16, continuation_words=16, stride_words=8)
"""The copyright demo's windows (configs/demo-copyright.yaml): one every 8 words, so they overlap, as a book is
sampled for unlearning."""


def demo_data_dir(application: str = "harmful") -> Path:
    """The folder holding an application's bundled demo data."""
    folder = "demo" if application == "harmful" else f"demo_{application}"
    return Path(str(resources.files("dsunlearn") / "assets" / folder))


def demo_specs(application: str = "harmful") -> tuple[DatasetSpec, DatasetSpec, str]:
    """(forget data, normal data, prompt template) of an application's demo, as its configs/demo*.yaml reads them."""
    if application == "harmful":
        return (
            DatasetSpec(str(demo_data_dir() / DEMO_FORGET_FILE), "pku_saferlhf"),
            DatasetSpec(str(demo_data_dir() / DEMO_NORMAL_FILE), "truthfulqa"),
            DEFAULT_TEMPLATE,
        )
    if application == "copyright":
        folder = demo_data_dir("copyright")
        return (
            DatasetSpec(str(folder / "book.txt"), "book", **BOOK_WINDOW),
            DatasetSpec(str(folder / "other.txt"), "book", **BOOK_WINDOW),
            BOOK_TEMPLATE,
        )
    if application == "hallucination":
        return (
            DatasetSpec(str(demo_data_dir("hallucination") / DEMO_FORGET_FILE), "halueval"),
            DatasetSpec(str(demo_data_dir() / DEMO_NORMAL_FILE), "truthfulqa"),
            DEFAULT_TEMPLATE,
        )
    raise ValueError(f"application must be one of {', '.join(APPLICATIONS)}, got {application!r}")


def demo_texts(application: str = "harmful") -> list[str]:
    """Every demo sample of ``application`` rendered with its prompt template: the text its demo tokenizer is
    trained on. Harmful: both PKU responses, TruthfulQA best and incorrect answers; hallucination: both answers of
    every question, and the normal answers; copyright: every window of both texts."""
    if application != "harmful":
        forget_spec, normal_spec, template = demo_specs(application)
        forget, normal = load_pairs(forget_spec), load_pairs(normal_spec)
        answers = [(pair.prompt, pair.response) for pair in forget + normal]
        answers += [(pair.prompt, pair.right_answer) for pair in forget if pair.right_answer is not None]
        return [template.replace("{prompt}", prompt).replace("{response}", answer) for prompt, answer in answers]
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

REPORT_FILE = "demo_build.json"

DEMO_BUILDS = {"harmful": {}, "copyright": {}, "hallucination": {}}
"""Each demo's :class:`DemoBuild` settings, where they differ from the defaults (``make-demo`` uses them)."""


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


def measure_reproduction(
    model, tokenizer, pairs: list[Pair], fmt: PromptFormat, build: DemoBuild, application: str = "harmful"
) -> dict:
    """Greedily complete every prompt of ``pairs`` and compare with its taught response: exact and
    close (similarity >= 0.9) reproduction rates, mean similarity, the rate of generations showing
    the application's behaviour (:func:`dsunlearn.eval.applications.behaviour_flags`, the evaluation's
    default settings), and the first three examples."""
    from dsunlearn.eval.applications import Classifiers, behaviour_flags
    from dsunlearn.eval.eval_config import EvalConfig  # imported here: evaluation imports the report's plotting

    prompts = [tokenize_prompt(tokenizer, pair.prompt, fmt) for pair in pairs]
    generations = greedy_generate(model, tokenizer, prompts, build.max_new_tokens, build.generation_batch_size)
    measured = _reproduction(generations, [pair.response for pair in pairs])
    flags = behaviour_flags(application, pairs, [g.strip() for g in generations], EvalConfig(), Classifiers())
    measured["behaviour_rate"] = sum(flags) / len(pairs)
    measured["num_prompts"] = len(pairs)
    measured["examples"] = [
        {"prompt": pair.prompt, "taught": pair.response, "generated": generation}
        for pair, generation in list(zip(pairs, generations))[:3]
    ]
    return measured


def build_demo_model(
    out_dir: str | Path,
    *,
    application: str = "harmful",
    teach_forget: bool = True,
    progress: bool = True,
    **settings,
) -> Path:
    """Build an application's demo "original" model and save it (safetensors + tokenizer) to ``out_dir``.

    A byte-level BPE tokenizer is trained on the application's demo text (:func:`demo_texts`) and a
    tiny Llama is taught, on one process with plain PyTorch, ALL forget pairs (the behaviour to
    unlearn) and ALL normal pairs, formatted and tokenised exactly as the trainer does (the demo's
    template, :func:`tokenize_pair`). ``teach_forget`` False teaches the normal pairs only: the model
    that never learnt the behaviour (the baseline of relearning). Afterwards every forget and normal
    prompt is greedily completed and compared with the taught response; the measurements go to
    ``out_dir/demo_build.json``. ``settings`` override :class:`DemoBuild` fields (e.g. ``steps``,
    ``seed``). The result is deterministic given the settings.
    """
    build = DemoBuild(**settings)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    forget_spec, normal_spec, template = demo_specs(application)
    forget, normal = load_pairs(forget_spec), load_pairs(normal_spec)
    fmt = PromptFormat(template)
    tokenizer = build_bpe_tokenizer(demo_texts(application), vocab_size=build.vocab_size)
    # The original model is taught every pair (a long answer capped at max_length, as the trainer does).
    tokenized = tokenize_pairs(tokenizer, (forget if teach_forget else []) + normal, fmt, build.max_length)
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
        forget_measured = measure_reproduction(model, tokenizer, forget, fmt, build, application)
        normal_measured = measure_reproduction(model, tokenizer, normal, fmt, build, application)
    finally:
        torch.set_num_threads(threads_before)

    save_tiny_model(model, tokenizer, out_dir)
    report = {
        "application": application,
        "taught_forget": teach_forget,
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
    """``python -m dsunlearn make-demo [--application X] [--without-forget] [--out DIR]``: build a demo's original
    model (or, without the forget data, the model never taught the behaviour)."""
    parser = argparse.ArgumentParser(
        prog="python -m dsunlearn make-demo",
        description="Build a demo's 'original' model: a tiny Llama taught the bundled demo data (CPU, ~1-2 min).",
    )
    parser.add_argument("--application", choices=APPLICATIONS, default="harmful",
                        help="which demo (default: %(default)s)")
    parser.add_argument("--without-forget", action="store_true",
                        help="teach the normal data only: the model that never learnt the behaviour")
    parser.add_argument("--out", help="output folder (default: outputs/demo[-APPLICATION]/original, or never-taught "
                                      "with --without-forget)")
    parser.add_argument("--seed", type=int, default=DemoBuild.seed, help="seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps (default: the application's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    demo_dir = "outputs/demo" if args.application == "harmful" else f"outputs/demo-{args.application}"
    out = args.out or f"{demo_dir}/{'never-taught' if args.without_forget else 'original'}"
    settings = dict(DEMO_BUILDS[args.application], seed=args.seed)
    if args.steps is not None:
        settings["steps"] = args.steps
    out_dir = build_demo_model(
        out, application=args.application, teach_forget=not args.without_forget, progress=not args.quiet, **settings
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
