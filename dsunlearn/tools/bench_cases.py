"""The step benchmark's inputs: its presets, a tiny Llama of each vocabulary, synthetic forget/normal data whose token
lengths it controls (``equal`` and ``realistic``), one :class:`Case` per (vocabulary, length profile), and the trainer's
run settings for a case."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_sizes: tuple
    length_profiles: tuple
    precision: str
    steps: int
    warmup: int
    ranks: int
    forget_batch_size: int = 2  # global, per step
    normal_batch_size: int = 2
    num_random_answers: int = 5
    equal_length: int = 128
    num_pairs: int = 48
    # Other methods' rows (configs/presets/NAME.yaml) on 1 process, each against a graddiff row on the same work.
    methods: tuple = ()


PRESETS = {
    "cpu": Preset(256, 4, 4, (32_000, 128_256), ("equal", "realistic"), "fp32", steps=4, warmup=1, ranks=2,
                  methods=("npo", "simnpo")),
    "tiny": Preset(64, 2, 4, (2_048,), ("realistic",), "fp32", steps=3, warmup=1, ranks=2, equal_length=64,
                   num_pairs=16),
    # One H200: the N-rank row needs a second device (skipped with the reason), deepspeed only if its wheel travels.
    "gpu": Preset(2048, 8, 16, (128_256,), ("equal", "realistic"), "bf16", steps=6, warmup=2, ranks=2,
                  forget_batch_size=4, normal_batch_size=4, methods=("npo", "simnpo")),
}

# Lengths in words (one word is one token) of the realistic profile, close to PKU-SafeRLHF and TruthfulQA.
PROMPT_WORDS = (6, 16)
FORGET_WORDS = (90, 170)
ANSWER_WORDS = (8, 25)
REALISTIC_MAX_LENGTH = 256
TEMPLATE = "Question: {prompt}\nAnswer: {response}"


class WorkMismatch(RuntimeError):
    """Two runs of a case did not process the same tokens in some step."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs: model folder, data files, run settings
# --------------------------------------------------------------------------------------------------------------------


def _words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 6))))
    return sorted(words)


WORDS = _words(300, seed=0)


def _text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def build_model(model_dir: Path, preset: Preset, vocab_size: int) -> Path:
    """A random tiny Llama with ``vocab_size`` ids and a word-level tokenizer (tiny.py's BPE trained on the benchmark's
    words, so each word is one token); saved in the preset's precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsunlearn.data import tiny

    if (model_dir / "config.json").exists():
        return model_dir
    corpus = [" ".join(WORDS[i:i + 20]) for i in range(0, len(WORDS), 20)] * 4
    tokenizer = tiny.build_bpe_tokenizer(corpus, vocab_size=4096)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocabulary {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=preset.hidden_size, intermediate_size=4 * preset.hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        max_position_embeddings=2 * REALISTIC_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    from dsunlearn.runtime.engines import PRECISION_DTYPES

    model.to(PRECISION_DTYPES[preset.precision]).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def write_data(data_dir: Path, preset: Preset, profile: str, seed: int = 0) -> tuple[Path, Path]:
    """forget.jsonl and normal.jsonl (``pairs`` format) of one length profile."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    if profile == "equal":
        forget_words = answer_words = (preset.equal_length + 20,) * 2  # longer than max_length: every sequence is cut
    else:
        forget_words, answer_words = FORGET_WORDS, ANSWER_WORDS
    paths = []
    for name, response_words in (("forget", forget_words), ("normal", answer_words)):
        rows = [
            {"prompt": _text(rng, rng.randint(*PROMPT_WORDS)), "response": _text(rng, rng.randint(*response_words))}
            for _ in range(preset.num_pairs)
        ]
        path = data_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


@dataclass
class Case:
    """One benchmark case: a model, a length profile, and where its runs write."""

    preset: str
    vocab_size: int
    profile: str
    model_dir: str
    forget_path: str
    normal_path: str
    steps: int
    data_seed: int = 0

    @property
    def name(self) -> str:
        return f"V={self.vocab_size} {self.profile}"


def build_run_config(case: Case, ranks: int, out_dir: str, method: str = "yao"):
    """The run settings of ``case`` on ``ranks`` ranks (the global batch of the preset, split over the ranks), with the
    objective of preset ``method`` (configs/presets/METHOD.yaml)."""
    import yaml

    from dsunlearn.settings.config import DataConfig, ModelConfig, ObjectiveConfig, OutputConfig, RunConfig, TrainConfig
    from dsunlearn.settings.dataset import DatasetSpec
    from dsunlearn.settings.paths import resolve_path

    preset = PRESETS[case.preset]
    for name in ("forget_batch_size", "normal_batch_size"):
        if getattr(preset, name) % ranks:
            raise ValueError(f"{name}={getattr(preset, name)} does not split over {ranks} ranks")
    max_length = preset.equal_length if case.profile == "equal" else REALISTIC_MAX_LENGTH
    return RunConfig(
        model=ModelConfig(name_or_path=case.model_dir, precision=preset.precision),
        data=DataConfig(
            forget=DatasetSpec(source=case.forget_path, format="pairs", held_out_fraction=0.1),
            normal=DatasetSpec(source=case.normal_path, format="pairs", held_out_fraction=0.1),
            template=TEMPLATE, max_length=max_length, seed=case.data_seed,
        ),
        objective=ObjectiveConfig(num_random_answers=preset.num_random_answers,
                                  **yaml.safe_load(resolve_path(f"configs/presets/{method}.yaml").read_text())["objective"]),
        train=TrainConfig(
            max_steps=case.steps, forget_batch_size=preset.forget_batch_size // ranks,
            normal_batch_size=preset.normal_batch_size // ranks, lr=1e-5, lr_schedule="constant",
            checkpoint_every=0, keep_checkpoints=1, max_normal_kl=None, max_zero_grad_steps=None, time_phases=True,
        ),
        output=OutputConfig(dir=out_dir, export=False, evaluate=False),
    )


def write_run_yaml(cfg, path: Path) -> Path:
    import yaml

    settings = cfg.to_dict()
    settings["train"]["betas"] = list(settings["train"]["betas"])
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
