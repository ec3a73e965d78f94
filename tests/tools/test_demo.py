"""The demo's original model: a shortened build gives a loadable, deterministic model and a report."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsunlearn.data.load import load_pairs
from dsunlearn.data.pairs import Pair
from dsunlearn.data.tokenization import TokenizedSequence, tokenize_prompt
from dsunlearn.settings.config import parse_run_config
from dsunlearn.settings.prompt_format import PromptFormat
from dsunlearn.tools.demo import (
    REPORT_FILE,
    DemoBuild,
    _length_groups,
    build_demo_model,
    demo_specs,
    greedy_generate,
    main,
    measure_reproduction,
)

SHORT = dict(steps=6, warmup_steps=1, batch_size=16, hidden_size=32, num_layers=1, vocab_size=400, max_new_tokens=4)


def test_short_build_loads_with_auto_classes_and_reports(tmp_path):
    out = build_demo_model(tmp_path / "demo", progress=False, **SHORT)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tokenizer) == 400 and model.config.hidden_size == 32
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["steps"] == 6
    assert report["num_forget_pairs"] == report["forget"]["num_prompts"] == 76
    assert report["num_normal_pairs"] == report["normal"]["num_prompts"] == 154
    assert report["num_taught_pairs"] == 76 + 154
    assert report["final_loss"] < report["first_loss"]
    for side in ("forget", "normal"):
        assert 0.0 <= report[side]["behaviour_rate"] <= 1.0 and 0.0 <= report[side]["mean_similarity"] <= 1.0
        assert len(report[side]["examples"]) == 3


def test_build_is_deterministic_given_the_seed(tmp_path):
    first = load_file(build_demo_model(tmp_path / "a", progress=False, **SHORT) / "model.safetensors")
    second = load_file(build_demo_model(tmp_path / "b", progress=False, **SHORT) / "model.safetensors")
    other = load_file(build_demo_model(tmp_path / "c", progress=False, seed=1, **SHORT) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_build_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    build_demo_model(tmp_path / "demo", progress=False, num_threads=1, **dict(SHORT, steps=1))
    assert torch.get_num_threads() == before


def test_cli_writes_the_model(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--steps", "1", "--quiet"])
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / REPORT_FILE).is_file()
    assert "demo model saved to" in capsys.readouterr().out


def test_never_taught_build_is_taught_only_the_normal_pairs(tmp_path):
    main(["--out", str(tmp_path / "never"), "--steps", "1", "--quiet", "--without-forget"])
    report = json.loads((tmp_path / "never" / REPORT_FILE).read_text())
    assert report["taught_forget"] is False
    assert report["num_taught_pairs"] == report["num_normal_pairs"] == 154
    assert report["forget"]["num_prompts"] == 76  # the forget prompts are still measured


@pytest.mark.parametrize("application", ["copyright", "hallucination"])
def test_demo_model_is_taught_the_windows_its_config_unlearns(application, tmp_path):
    """make-demo teaches the pairs of demo_specs; the demo's config must read the very same pairs (a copyright
    window cut differently would be text the original model was never taught)."""
    cfg, _ = parse_run_config(["--config", f"configs/demo-{application}.yaml", "--model.name_or_path", str(tmp_path)])
    forget_spec, normal_spec, template = demo_specs(application)

    def taught(spec):  # the pairs' text; their source paths differ (relative vs the package's folder)
        return [(pair.prompt, pair.response, pair.right_answer) for pair in load_pairs(spec)]

    assert taught(cfg.data.forget) == taught(forget_spec)
    assert taught(cfg.data.normal) == taught(normal_spec)
    assert cfg.data.template == template


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        DemoBuild(steps=0)
    with pytest.raises(TypeError):
        DemoBuild(stepz=3)


def test_length_groups_cover_the_batch_and_pad_less():
    sequences = [TokenizedSequence([0] * n, [1] * n) for n in (100, 30, 95, 25, 32, 110)]
    groups = _length_groups(sequences, [0, 1, 2, 3, 4, 5])
    assert sorted(i for group in groups for i in group) == [0, 1, 2, 3, 4, 5]
    assert [sorted(group) for group in groups] == [[1, 3, 4], [0, 2, 5]]
    assert _length_groups(sequences, [1]) == [[1]]
    assert _length_groups([TokenizedSequence([0] * 5, [1] * 5)] * 3, [0, 1, 2]) == [[0, 1, 2]]


def test_left_padded_greedy_generation_matches_one_prompt_at_a_time(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fmt = PromptFormat()
    prompts = [tokenize_prompt(tokenizer, p, fmt) for p in ("Hi?", "What colour is a clear daytime sky today?")]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    alone = [greedy_generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone


def test_measure_reproduction_scores_exact_copies(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fmt = PromptFormat()
    build = DemoBuild(max_new_tokens=5)
    prompt = tokenize_prompt(tokenizer, "Hi?", fmt)
    generated = greedy_generate(model, tokenizer, [prompt], 5, 1)[0]
    taught_what_it_says = measure_reproduction(model, tokenizer, [Pair("Hi?", generated, "m", 1)], fmt, build)
    assert taught_what_it_says["exact_match_rate"] == 1.0 and taught_what_it_says["mean_similarity"] == 1.0
    unrelated_pair = Pair("Hi?", "Sure, here is exactly how to x", "m", 1)
    unrelated = measure_reproduction(model, tokenizer, [unrelated_pair], fmt, build)
    assert unrelated["exact_match_rate"] == 0.0 and unrelated["close_match_rate"] == 0.0
