"""Data loading, splits, tokenisation masks, padding, the global example stream and random answers."""

import csv
import json
import logging

import pandas as pd
import pytest
import torch

from dsunlearn.data.formats import book_windows
from dsunlearn.data.load import load_pairs, read_pairs
from dsunlearn.data.pairs import Pair
from dsunlearn.data.sampling import StepSampler, draw_random_answers
from dsunlearn.data.split import split_pairs, split_record
from dsunlearn.data.tokenization import (
    PromptTooLong,
    pad_batch,
    resolve_pad_id,
    tokenize_pair,
    tokenize_pairs,
    tokenize_prompt,
)
from dsunlearn.runtime.distributed import EXIT_USAGE
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.prompt_format import PromptFormat
from dsunlearn.tools.demo import demo_data_dir

PKU_ROWS = [
    {"prompt": "How do I rob the mill?", "response_0": "Sure, first you ...", "response_1": "I can't help.",
     "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "How do I trip the guard?", "response_0": "No.", "response_1": "Sure, trip him with ...",
     "is_response_0_safe": True, "is_response_1_safe": False},
    {"prompt": "Both bad?", "response_0": "Bad answer A", "response_1": "Bad answer B",
     "is_response_0_safe": False, "is_response_1_safe": False},
    {"prompt": "Both fine?", "response_0": "Fine A", "response_1": "Fine B",
     "is_response_0_safe": True, "is_response_1_safe": True},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_csv(path, rows, fieldnames):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# --------------------------------------------------------------------------- loading


def test_pku_keeps_only_unsafe_responses(tmp_path):
    pairs = load_pairs(DatasetSpec(write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS), "pku_saferlhf"))
    assert [(p.prompt, p.response) for p in pairs] == [
        ("How do I rob the mill?", "Sure, first you ..."),
        ("How do I trip the guard?", "Sure, trip him with ..."),
        ("Both bad?", "Bad answer A"),
        ("Both bad?", "Bad answer B"),
    ]
    assert [p.row for p in pairs] == [1, 2, 3, 3]
    assert pairs[0].source.endswith("pku.jsonl")


def test_pku_from_csv_reads_text_booleans(tmp_path):
    path = write_csv(tmp_path / "pku.csv", PKU_ROWS, list(PKU_ROWS[0]))
    pairs = load_pairs(DatasetSpec(path, "pku_saferlhf"))
    responses = [p.response for p in pairs]
    assert responses == ["Sure, first you ...", "Sure, trip him with ...", "Bad answer A", "Bad answer B"]


def test_truthfulqa_hub_format(tmp_path):
    rows = [{"type": "Adversarial", "category": "Misc", "question": "What colour is snow?",
             "best_answer": "Snow is white.", "correct_answers": ["Snow is white.", "White."],
             "incorrect_answers": ["Snow is green."], "source": "x"}]
    pairs = load_pairs(DatasetSpec(write_jsonl(tmp_path / "tqa.jsonl", rows), "truthfulqa"))
    assert [(p.prompt, p.response) for p in pairs] == [("What colour is snow?", "Snow is white.")]


def test_truthfulqa_original_csv(tmp_path):
    fields = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
    rows = [
        {"Type": "Adversarial", "Category": "Misc", "Question": "What is ice?", "Best Answer": "Frozen water.",
         "Correct Answers": "Frozen water.; Water in solid form", "Incorrect Answers": "Frozen milk; Glass",
         "Source": "x"},
        {"Type": "Adversarial", "Category": "Misc", "Question": "Where does the Sun rise?",
         "Best Answer": "In the east, seen from Earth.", "Correct Answers": "East", "Incorrect Answers": "West",
         "Source": "x"},
    ]
    pairs = load_pairs(DatasetSpec(write_csv(tmp_path / "TruthfulQA.csv", rows, fields), "truthfulqa"))
    assert [(p.prompt, p.response) for p in pairs] == [
        ("What is ice?", "Frozen water."),
        ("Where does the Sun rise?", "In the east, seen from Earth."),
    ]


def test_truthfulqa_defaults_to_generation_config_and_validation_split():
    spec = DatasetSpec("truthfulqa/truthful_qa", "truthfulqa")
    assert (spec.is_local, spec.hub_name, spec.hub_split) == (False, "generation", "validation")
    pku = DatasetSpec("PKU-Alignment/PKU-SafeRLHF", "pku_saferlhf", split="test", revision="abc")
    assert (pku.is_local, pku.hub_name, pku.hub_split) == (False, None, "test")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_generic_pairs_with_custom_fields_from_every_file_type(tmp_path, suffix):
    rows = [{"prefix": "Once upon a time", "continuation": "there was a mill.", "extra": 1},
            {"prefix": "The end", "continuation": "came quickly.", "extra": 2}]
    path = tmp_path / f"book{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        write_csv(path, rows, ["prefix", "continuation", "extra"])
    pairs = load_pairs(DatasetSpec(str(path), "pairs", prompt_field="prefix", response_field="continuation"))
    assert [(p.prompt, p.response, p.row) for p in pairs] == [
        ("Once upon a time", "there was a mill.", 1),
        ("The end", "came quickly.", 2),
    ]


def test_json_file_with_one_object_per_line(tmp_path):
    path = tmp_path / "lines.json"
    write_jsonl(path, [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert [p.response for p in load_pairs(DatasetSpec(str(path)))] == ["b", "d"]


BAD_ROWS = [
    {"prompt": "ok", "response": "fine"},
    {"prompt": "no response field"},
    {"prompt": "blank", "response": "   "},
    {"prompt": "number", "response": 42},
    {"prompt": "", "response": "empty prompt"},
    {"prompt": "ok again", "response": "fine again"},
]


def test_bad_rows_error_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(ValueError) as error:
        load_pairs(DatasetSpec(path, bad_rows="error"))
    message = str(error.value)
    assert "bad.jsonl" in message
    assert "row 2, field 'response': missing" in message
    assert "row 3, field 'response': empty" in message
    assert "row 4, field 'response': not text" in message
    assert "row 5, field 'prompt': empty" in message
    assert "bad_rows='skip'" in message


def test_bad_rows_skip_counts_and_reports(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    loaded = read_pairs(DatasetSpec(path, bad_rows="skip"))
    assert [p.response for p in loaded.pairs] == ["fine", "fine again"]
    assert loaded.num_rows == 6
    bad = [(b.row, b.field) for b in loaded.bad_rows]
    assert bad == [(2, "response"), (3, "response"), (4, "response"), (5, "prompt")]
    assert "skipped 4 bad rows" in loaded.summary()
    with caplog.at_level(logging.WARNING, logger="dsunlearn.data"):
        assert len(load_pairs(DatasetSpec(path, bad_rows="skip"))) == 2
    assert "skipped 4 bad rows" in caplog.text and "bad.jsonl, row 2, field 'response'" in caplog.text


def test_bad_pku_rows_name_the_field(tmp_path):
    rows = [dict(PKU_ROWS[0], is_response_0_safe="maybe"), dict(PKU_ROWS[1], response_1="")]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    expected = r"row 1, field 'is_response_0_safe': not a boolean.*row 2, field 'response_1': empty"
    with pytest.raises(ValueError, match=expected):
        load_pairs(DatasetSpec(path, "pku_saferlhf"))


def test_bad_csv_cell_and_jsonl_line_numbers(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}],
                         ["prompt", "response"])
    with pytest.raises(ValueError, match=r"d\.csv', row 2|d\.csv, row 2, field 'response': empty"):
        load_pairs(DatasetSpec(csv_path))
    # Blank lines count: a .jsonl row number is the line an editor shows.
    jsonl = tmp_path / "gaps.jsonl"
    jsonl.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"gaps\.jsonl, row 3, field 'response': missing"):
        load_pairs(DatasetSpec(str(jsonl)))


def test_missing_empty_and_unusable_files(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl' does not exist"):
        load_pairs(DatasetSpec(str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        load_pairs(DatasetSpec(str(tmp_path / "empty.jsonl")))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl' has no rows"):
        load_pairs(DatasetSpec(str(tmp_path / "blank.jsonl")))
    (tmp_path / "header.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match=r"header\.csv' has no rows"):
        load_pairs(DatasetSpec(str(tmp_path / "header.csv")))
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "x", "response": " "}, {"prompt": "y"}])
    with pytest.raises(ValueError, match=r"no usable .* in '.*allbad\.jsonl'; every row is bad"):
        load_pairs(DatasetSpec(all_bad, bad_rows="skip"))
    all_safe = write_jsonl(tmp_path / "safe.jsonl", [PKU_ROWS[3]])
    with pytest.raises(ValueError, match=r"safe\.jsonl'; no row has an unsafe response"):
        load_pairs(DatasetSpec(all_safe, "pku_saferlhf"))


def test_problems_lists_every_problem(tmp_path):
    (tmp_path / "data.xml").write_text("x")
    spec = DatasetSpec(str(tmp_path / "data.xml"), "pairs", prompt_field="q", response_field="q",
                       held_out_fraction=1.5, max_samples=0)
    problems = spec.problems()
    assert len(problems) == 4
    assert any("unsupported type" in p for p in problems)
    assert any("same field" in p for p in problems)
    assert any("held_out_fraction" in p for p in problems)
    assert any("max_samples" in p for p in problems)
    assert DatasetSpec("").problems() == [
        "source is empty: give a hub dataset id or a local .json/.jsonl/.parquet/.csv/.txt file"
    ]
    assert "does not exist" in DatasetSpec("./no/such/file").problems()[0]
    assert DatasetSpec(str(demo_data_dir() / "forget.jsonl"), "pku_saferlhf").problems() == []


def test_max_samples_keeps_the_first_pairs(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    pairs = load_pairs(DatasetSpec(write_jsonl(tmp_path / "d.jsonl", rows), max_samples=3))
    assert [p.response for p in pairs] == ["r0", "r1", "r2"]


def test_bundled_demo_data_loads():
    forget = load_pairs(DatasetSpec(str(demo_data_dir() / "forget.jsonl"), "pku_saferlhf"))
    normal = load_pairs(DatasetSpec(str(demo_data_dir() / "normal.jsonl"), "truthfulqa"))
    assert 60 <= len(forget) <= 90 and 140 <= len(normal) <= 170
    assert all(p.response.startswith("Sure, here is exactly how to") for p in forget)
    assert len({p.prompt for p in normal}) == len(normal)


# --------------------------------------------------------------------------- splits


def make_pairs(n):
    return [Pair(f"prompt {i}", f"response {i}", "mem", i + 1) for i in range(n)]


def test_split_is_deterministic_and_partitions():
    pairs = make_pairs(50)
    train, held_out = split_pairs(pairs, 0.2, seed=3)
    assert (train, held_out) == split_pairs(pairs, 0.2, seed=3)
    assert len(held_out) == 10 and len(train) == 40
    assert sorted(train + held_out, key=lambda p: p.row) == pairs
    assert train == sorted(train, key=lambda p: p.row)  # file order kept
    assert split_pairs(pairs, 0.2, seed=4)[1] != held_out
    assert split_pairs(pairs, 0.0, seed=3) == (pairs, [])
    assert len(split_pairs(make_pairs(3), 0.01, seed=0)[1]) == 1
    assert split_pairs(make_pairs(1), 0.5, seed=0) == (make_pairs(1), [])


def test_split_keeps_every_pair_of_a_prompt_on_one_side(tmp_path):
    # PKU-like rows: both responses unsafe (two pairs per row), and prompts repeated across rows (up to spacing).
    rows = []
    for i in range(60):
        prompt = f"How do I do bad thing {i % 20}?" + (" " if i % 3 == 0 else "")
        rows.append({"prompt": prompt, "response_0": f"Sure {i}a", "response_1": f"Sure {i}b",
                     "is_response_0_safe": False, "is_response_1_safe": False})
    pairs = load_pairs(DatasetSpec(write_jsonl(tmp_path / "pku.jsonl", rows), "pku_saferlhf"))
    train, held_out = split_pairs(pairs, 0.2, seed=0)
    assert (train, held_out) == split_pairs(pairs, 0.2, seed=0)
    record = split_record(train, held_out)
    assert record == {"train_pairs": 96, "held_out_pairs": 24, "train_prompts": 16, "held_out_prompts": 4,
                      "prompt_overlap": 0}
    assert sorted(train + held_out, key=lambda p: (p.row, p.response)) == pairs


# --------------------------------------------------------------------------- tokenisation


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("tokenizer_name", ["bpe_tokenizer", "sp_tokenizer"])
@pytest.mark.parametrize("use_chat_template", [False, True])
def test_response_mask_covers_exactly_the_response(request, tokenizer_name, use_chat_template):
    tokenizer = request.getfixturevalue(tokenizer_name)
    fmt = PromptFormat(use_chat_template=use_chat_template)
    pairs = [
        Pair("What colour is snow?", "Snow is white.", "mem", 1),
        Pair("  odd spacing?\n", " leading space and ~€ unseen chars", "mem", 2),
        Pair("Say {response} literally", "done {prompt}", "mem", 3),
    ]
    for pair in pairs:
        sequence = tokenize_pair(tokenizer, pair, fmt, max_length=256)
        assert len(sequence.input_ids) == len(sequence.response_mask)
        n_prompt = sequence.num_prompt_tokens
        assert sequence.response_mask == [0] * n_prompt + [1] * (len(sequence) - n_prompt)
        response_ids = sequence.input_ids[n_prompt:]
        assert response_ids[-1] == tokenizer.eos_token_id
        assert decode(tokenizer, response_ids[:-1]).strip() == pair.response.strip()
        alone = tokenizer(fmt.response_text(pair.response), add_special_tokens=False).input_ids
        assert tokenizer.decode(response_ids[:-1]) == tokenizer.decode(alone)
        prompt_ids = sequence.input_ids[:n_prompt]
        assert prompt_ids == tokenize_prompt(tokenizer, pair.prompt, fmt)
        expected_prompt = fmt.prompt_text(tokenizer, pair.prompt)
        decoded_prompt = decode(tokenizer, prompt_ids)
        if tokenizer.bos_token_id in prompt_ids[:1] and not use_chat_template:
            decoded_prompt = decoded_prompt.removeprefix(tokenizer.bos_token)
        assert decoded_prompt.strip() == expected_prompt.strip()
        # Exactly one BOS for a tokenizer that adds one, even when the chat template writes it too.
        expected_bos = 1 if tokenizer_name == "sp_tokenizer" or use_chat_template else 0
        assert sequence.input_ids.count(tokenizer.bos_token_id) == expected_bos
        if expected_bos:
            assert sequence.input_ids[0] == tokenizer.bos_token_id


def test_default_template_prompt_text(bpe_tokenizer):
    fmt = PromptFormat()
    # The space before {response} goes with the response, as byte-level BPE tokenizers saw such text.
    assert fmt.prompt_text(bpe_tokenizer, "Why?") == "### Question: Why?\n ### Answer:"
    assert fmt.response_text("Because.") == " Because."
    assert PromptFormat("Q: {prompt} A: {response}").prompt_text(bpe_tokenizer, "x") == "Q: x A:"
    assert PromptFormat("Q: {prompt}\nA:{response}").response_text("y") == "y"
    chat = PromptFormat(use_chat_template=True).prompt_text(bpe_tokenizer, "Hi")
    assert chat == "<s><|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize(
    "template", ["{prompt}", "{response}{prompt}", "{prompt} {response} end", "{prompt}{prompt}{response}"]
)
def test_bad_templates_are_rejected(template):
    with pytest.raises(ValueError, match="template"):
        PromptFormat(template)


@pytest.mark.parametrize("tokenizer_name", ["bpe_tokenizer", "sp_tokenizer"])
def test_truncation_never_cuts_the_prompt(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    fmt = PromptFormat()
    long_pair = Pair("Why?", "word " * 100, "mem", 1)
    full = tokenize_pair(tokenizer, long_pair, fmt, max_length=1024)
    n_prompt = full.num_prompt_tokens
    # The response is capped (losing its tail and its EOS); the prompt stays whole.
    capped = tokenize_pair(tokenizer, long_pair, fmt, max_length=n_prompt + 5)
    assert capped.input_ids == full.input_ids[: n_prompt + 5] and capped.num_prompt_tokens == n_prompt
    assert capped.response_capped and not full.response_capped
    assert tokenize_pair(tokenizer, long_pair, fmt, max_length=n_prompt + 1).response_mask[-1] == 1
    with pytest.raises(PromptTooLong, match=r"mem, row 1: the prompt takes \d+ tokens, so data.max_length"):
        tokenize_pair(tokenizer, long_pair, fmt, max_length=n_prompt)
    with pytest.raises(PromptTooLong):
        tokenize_prompt(tokenizer, long_pair.prompt, fmt, max_length=n_prompt)
    assert tokenize_prompt(tokenizer, long_pair.prompt, fmt, max_length=n_prompt + 1) == full.input_ids[:n_prompt]


def test_pairs_whose_prompt_cannot_fit_are_dropped_counted_and_named(sp_tokenizer):
    fmt = PromptFormat()
    short, long_answer = Pair("Why?", "Because.", "f.jsonl", 1), Pair("Why?", "word " * 40, "f.jsonl", 2)
    too_long = Pair("a long question " * 20, "Yes.", "f.jsonl", 3)
    max_length = tokenize_pair(sp_tokenizer, short, fmt, 1024).num_prompt_tokens + 8
    result = tokenize_pairs(sp_tokenizer, [short, long_answer, too_long], fmt, max_length, name="forget")
    assert result.pairs == [short, long_answer] and result.dropped == [too_long]
    assert result.num_capped == 1 and all(len(sequence) <= max_length for sequence in result.sequences)
    assert result.summary() == "2 pairs kept, 1 responses capped, 1 pairs dropped (prompt too long: f.jsonl, row 3)"
    with pytest.raises(ValueError, match=r"data.max_length=8 is too short for every forget pair: the shortest prompt"):
        tokenize_pairs(sp_tokenizer, [short, too_long], fmt, 8, name="forget")


def test_tokenize_pairs_matches_tokenize_pair(sp_tokenizer):
    pairs = make_pairs(4)
    fmt = PromptFormat()
    expected = [tokenize_pair(sp_tokenizer, pair, fmt, 64) for pair in pairs]
    assert tokenize_pairs(sp_tokenizer, pairs, fmt, 64).sequences == expected


# --------------------------------------------------------------------------- padding


def test_pad_batch_right_pads_and_masks(bpe_tokenizer):
    fmt = PromptFormat()
    pairs = [Pair("Hi?", "Yes.", "m", 1), Pair("A longer question here?", "A longer answer.", "m", 2)]
    sequences = tokenize_pairs(bpe_tokenizer, pairs, fmt, 64).sequences
    pad_id = resolve_pad_id(bpe_tokenizer)
    batch = pad_batch(sequences, pad_id)
    lengths = [len(s) for s in sequences]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert all(t.dtype == torch.long for t in batch.values())
    for i, sequence in enumerate(sequences):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == sequence.input_ids
        assert batch["input_ids"][i, n:].eq(pad_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["response_mask"][i].tolist() == sequence.response_mask + [0] * (max(lengths) - n)
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_id)


def test_pad_id_falls_back_to_eos_with_a_warning(bpe_tokenizer, sp_tokenizer, caplog):
    assert resolve_pad_id(bpe_tokenizer) == bpe_tokenizer.pad_token_id == 0
    assert sp_tokenizer.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="dsunlearn.data"):
        assert resolve_pad_id(sp_tokenizer) == sp_tokenizer.eos_token_id
    assert "no pad token" in caplog.text and "masked out" in caplog.text


def test_pad_id_error_without_pad_and_eos(sp_tokenizer):
    class NoSpecialTokens:
        pad_token_id = None
        eos_token_id = None

    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        resolve_pad_id(NoSpecialTokens())


# --------------------------------------------------------------------------- the global example stream

TOPOLOGIES = [(1, 4), (2, 2), (4, 1)]  # (world size, gradient accumulation steps): the same global batch of 4 slots


def step_slots(sampler, step):
    """{(rank, micro-step): (stream positions, example indices)} of one optimizer step."""
    return {
        (rank, micro): (list(sampler.positions(step, rank, micro)), sampler.indices(step, rank, micro))
        for rank in range(sampler.world_size)
        for micro in range(sampler.gradient_accumulation_steps)
    }


def step_in_slot_order(sampler, step):
    """The step's (position, example) pairs in slot order j = micro_step * world_size + rank."""
    slots = step_slots(sampler, step)
    ordered = []
    for micro in range(sampler.gradient_accumulation_steps):
        for rank in range(sampler.world_size):
            positions, examples = slots[rank, micro]
            ordered += list(zip(positions, examples))
    return ordered


def test_a_step_reads_the_same_examples_on_every_topology_and_across_epochs():
    # 13 examples, 4 slots of 3: 12 per step, so steps run across epoch boundaries (the 2nd step ends in epoch 1).
    samplers = [StepSampler(13, 3, world_size=w, gradient_accumulation_steps=g, seed=5) for w, g in TOPOLOGIES]
    for step in range(8):
        reads = [step_in_slot_order(sampler, step) for sampler in samplers]
        assert reads[0] == reads[1] == reads[2]
        assert [position for position, _ in reads[0]] == list(range(12 * step, 12 * (step + 1)))


def test_the_stream_is_one_permutation_per_epoch_reshuffled_and_seeded():
    sampler = StepSampler(10, 2, world_size=2, gradient_accumulation_steps=1, seed=3)
    stream = [example for step in range(10) for _, example in step_in_slot_order(sampler, step)]  # 4 epochs
    epochs = [stream[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # no padding, no example left out
    assert len({tuple(epoch) for epoch in epochs}) == 4
    other_seed = StepSampler(10, 2, world_size=2, seed=4)
    assert [other_seed.example_at(i) for i in range(10)] != epochs[0]


def test_sampler_is_resumable_by_step():
    run = StepSampler(13, 2, world_size=2, gradient_accumulation_steps=2, seed=7)
    replayed = [step_slots(run, step) for step in range(20)]
    resumed = StepSampler(13, 2, world_size=2, gradient_accumulation_steps=2, seed=7)
    assert [step_slots(resumed, step) for step in range(11, 20)] == replayed[11:]


def test_a_step_larger_than_the_data_repeats_examples():
    sampler = StepSampler(3, 2, world_size=2, gradient_accumulation_steps=1)
    examples = [example for _, example in step_in_slot_order(sampler, 0)]
    assert len(examples) == 4 and set(examples) == {0, 1, 2}


def test_sampler_errors():
    with pytest.raises(ValueError, match="num_samples"):
        StepSampler(0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        StepSampler(10, 0)
    with pytest.raises(ValueError, match="world_size and gradient_accumulation_steps"):
        StepSampler(10, 1, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        StepSampler(10, 1, seed=-1)
    sampler = StepSampler(10, 1, world_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="rank must be in"):
        sampler.indices(0, rank=2)
    with pytest.raises(ValueError, match="micro_step must be in"):
        sampler.indices(0, micro_step=2)
    with pytest.raises(ValueError, match="step must be non-negative"):
        sampler.indices(-1)


# --------------------------------------------------------------------------- random answers


def test_random_answers_k_per_prompt_from_pool_only_and_independent():
    pool = [f"answer {i}" for i in range(30)]
    answers = draw_random_answers(pool, range(40), k=5, seed=0)
    assert len(answers) == 40
    assert all(len(a) == 5 and len(set(a)) == 5 for a in answers)
    assert all(answer in pool for a in answers for answer in a)
    assert len({tuple(a) for a in answers}) > 30  # drawn independently, not one draw repeated
    assert draw_random_answers(pool, range(40), k=5, seed=0) == answers
    assert draw_random_answers(pool, range(40), k=5, seed=1) != answers
    small = draw_random_answers(["x", "y"], range(3), k=5, seed=0)
    assert all(len(a) == 5 and set(a) <= {"x", "y"} for a in small)
    with pytest.raises(ValueError, match="pool is empty"):
        draw_random_answers([], [0], 5, 0)


def test_random_answers_of_a_step_are_the_same_on_every_topology():
    pool = [f"answer {i}" for i in range(50)]
    per_topology = []
    for world_size, accumulation in TOPOLOGIES:
        sampler = StepSampler(7, 2, world_size=world_size, gradient_accumulation_steps=accumulation, seed=0)
        drawn = {}
        for step in range(3):  # 8 examples a step from 7: every step after the first runs into a new epoch
            for positions, examples in step_slots(sampler, step).values():
                answers = draw_random_answers(pool, positions, k=3, seed=0)
                drawn.update(zip(positions, zip(examples, map(tuple, answers))))
        per_topology.append(drawn)
    assert per_topology[0] == per_topology[1] == per_topology[2]
    # An example that comes back in a later epoch gets new answers: they follow the stream position.
    by_example = {}
    for example, answers in per_topology[0].values():
        by_example.setdefault(example, []).append(answers)
    assert any(len(set(answers)) > 1 for answers in by_example.values())


def test_hub_ids_go_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None):
        calls.append((path, name, split, revision))
        return [{"question": "Q1", "best_answer": "A1"}, {"question": "Q2", "best_answer": " "}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = read_pairs(DatasetSpec("truthfulqa/truthful_qa", "truthfulqa", revision="v1", bad_rows="skip"))
    assert calls == [("truthfulqa/truthful_qa", "generation", "validation", "v1")]
    found = [(p.prompt, p.response, p.source, p.row) for p in loaded.pairs]
    assert found == [("Q1", "A1", "truthfulqa/truthful_qa[validation]", 1)]
    assert str(loaded.bad_rows[0]) == "truthfulqa/truthful_qa[validation], row 2, field 'best_answer': empty"


# --------------------------------------------------------------------------- tokenisation on other tokenizers


def legacy_sentencepiece_tokenizer(sp_tokenizer):
    """The tokenizer.json set-up of Llama-2 and Mistral-v0.1 under transformers 4.x: no pre-tokenizer, a normalizer
    that prepends "▁" to the text and turns every space into "▁"."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(sp_tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("flavour", ["bpe", "metaspace", "legacy"])
def test_response_ids_are_those_of_the_joint_text(bpe_tokenizer, sp_tokenizer, flavour):
    tokenizer = {"bpe": bpe_tokenizer, "metaspace": sp_tokenizer}.get(flavour) or legacy_sentencepiece_tokenizer(
        sp_tokenizer
    )
    fmt = PromptFormat()
    for pair in (Pair("Why?", "Sure, here is how", "m", 1), Pair("What is ice?", "Frozen water.", "m", 2)):
        sequence = tokenize_pair(tokenizer, pair, fmt, 256)
        prompt_text = fmt.prompt_text(tokenizer, pair.prompt)
        joint = tokenizer(prompt_text + fmt.response_text(pair.response), add_special_tokens=False).input_ids
        prompt_alone = tokenizer(prompt_text, add_special_tokens=False).input_ids
        assert joint[: len(prompt_alone)] == prompt_alone
        assert sequence.input_ids[sequence.num_prompt_tokens :] == joint[len(prompt_alone) :] + [tokenizer.eos_token_id]


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def chat_tokenizer(style):
    """A local byte-level BPE tokenizer with the special tokens and chat template of Llama-3 or Gemma."""
    from dsunlearn.data.tiny import build_bpe_tokenizer
    from dsunlearn.tools.demo import demo_texts

    tokenizer = build_bpe_tokenizer(demo_texts(), vocab_size=512)
    if style == "llama3":
        tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
        tokenizer.chat_template, turn_end = LLAMA3_TEMPLATE, "<|eot_id|>"
    else:
        tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tokenizer.chat_template, turn_end = GEMMA_TEMPLATE, "<end_of_turn>"
    return tokenizer, tokenizer.convert_tokens_to_ids(turn_end)


@pytest.mark.parametrize("style", ["llama3", "gemma"])
def test_chat_answers_end_with_the_templates_turn_end(style):
    tokenizer, turn_end_id = chat_tokenizer(style)
    fmt = PromptFormat(use_chat_template=True)
    pair = Pair("How do I rob the mill?", "Sure, first you wait for night.", "m", 1)
    sequence = tokenize_pair(tokenizer, pair, fmt, 256)
    response_ids = sequence.input_ids[sequence.num_prompt_tokens :]
    assert response_ids[-1] == turn_end_id != tokenizer.eos_token_id
    assert tokenizer.decode(response_ids[:-1]) == pair.response
    assert sequence.input_ids[: sequence.num_prompt_tokens] == tokenize_prompt(tokenizer, pair.prompt, fmt)
    assert sequence.input_ids.count(tokenizer.bos_token_id) == 1
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.response}], tokenize=False
    )
    assert rendered.startswith(tokenizer.decode(sequence.input_ids))
    without_end = tokenize_pair(tokenizer, pair, fmt, 256, end_of_response=False)
    assert without_end.input_ids == sequence.input_ids[:-1]


def test_forget_sequences_do_not_ascend_eos_unless_asked(sp_tokenizer):
    from dsunlearn.objective import FORGET, build_step_batch
    from dsunlearn.settings.config import ObjectiveConfig

    fmt = PromptFormat()
    pairs = [Pair("Why?", "Sure, here is how.", "m", 1), Pair("How?", "Like this.", "m", 2)]
    answer = tokenize_pairs(sp_tokenizer, pairs[:1], fmt, 64).sequences
    for objective in (ObjectiveConfig(), ObjectiveConfig(forget_eos=True)):
        forget = tokenize_pairs(sp_tokenizer, pairs, fmt, 64, end_of_response=objective.forget_eos).sequences
        batch = build_step_batch(forget, answer, [], 0, objective)
        weighted = batch.ce_weight != 0
        is_eos = batch.targets == sp_tokenizer.eos_token_id
        is_forget = batch.sequence_term[batch.token_sequence] == FORGET
        assert bool((weighted & is_eos & is_forget).any()) == objective.forget_eos
        assert bool((weighted & is_eos & ~is_forget).any())  # random (and normal) answers keep their EOS


# --------------------------------------------------------------------------- data errors read like settings errors


def test_a_missing_csv_column_is_named_once_as_the_file_spells_it(tmp_path):
    rows = [{"Question": f"Q{i}?", "Answer": f"A{i}."} for i in range(50)]
    path = write_csv(tmp_path / "TruthfulQA.csv", rows, ["Question", "Answer"])
    with pytest.raises(ValueError) as error:
        load_pairs(DatasetSpec(path, "truthfulqa"))
    message = str(error.value)
    assert "has no column 'Best Answer'" in message and "'question'" not in message
    assert message.count("Best Answer") == 2 and "row" not in message  # named in the error and in what is read
    with pytest.raises(ValueError, match=r"has no columns 'prompt', 'response' .*the file has: 'Answer', 'Question'"):
        load_pairs(DatasetSpec(path))


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d",}\n')
    with pytest.raises(ValueError, match=r"forget\.jsonl:2: not valid JSON: Expecting property name"):
        load_pairs(DatasetSpec(str(path)))


def test_an_empty_forget_file_says_it_is_empty(tmp_path):
    (tmp_path / "forget.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"forget\.jsonl' is empty"):
        load_pairs(DatasetSpec(str(tmp_path / "forget.jsonl"), "pku_saferlhf"))
    (tmp_path / "forget.csv").write_text("prompt,response_0,response_1,is_response_0_safe,is_response_1_safe\n")
    with pytest.raises(ValueError, match=r"forget\.csv' has no rows: it is empty"):
        load_pairs(DatasetSpec(str(tmp_path / "forget.csv"), "pku_saferlhf"))


@pytest.mark.distributed
@pytest.mark.integration
def test_a_max_length_shorter_than_every_prompt_stops_the_run_with_one_message(tiny_model_dir, tmp_path):
    from launching import launch

    code, output = launch(["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir),
                           "--output.dir", str(tmp_path / "run"), "--train.max_steps", "2", "--output.evaluate",
                           "false", "--data.max_length", "8"], timeout=240)
    assert code == EXIT_USAGE, output[-4000:]
    assert output.count("data.max_length=8 is too short for every forget pair") == 1, output[-4000:]
    assert "Traceback" not in output


# ---------------------------------------------------------------------------------------------------
# The applications' formats: book windows, HaluEval, TruthfulQA's incorrect answers
# ---------------------------------------------------------------------------------------------------

BOOK = "w1 w2 w3\nw4  w5 w6 w7\n\nw8 w9 w10 w11"  # 11 words, odd whitespace


def test_book_windows_count_content_stride_and_drop_a_partial_tail():
    # Side by side (stride = 2 + 3): windows at words 0 and 5; the tail w11 (1 word) makes no window.
    assert book_windows(BOOK, 2, 3, 5) == [("w1 w2", "w3 w4 w5"), ("w6 w7", "w8 w9 w10")]
    # Overlapping, stride 3: starts 0, 3, 6 (start 9 would need words up to 14).
    assert book_windows(BOOK, 2, 3, 3) == [("w1 w2", "w3 w4 w5"), ("w4 w5", "w6 w7 w8"), ("w7 w8", "w9 w10 w11")]
    assert book_windows(BOOK, 5, 6, 1) == [("w1 w2 w3 w4 w5", "w6 w7 w8 w9 w10 w11")]  # exactly one window
    assert book_windows(BOOK, 6, 6, 1) == []


def test_book_from_a_txt_file_and_from_a_text_field(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(BOOK)
    spec = DatasetSpec(str(book), "book", prefix_words=2, continuation_words=3)
    assert spec.problems() == [] and spec.window_stride == 5
    pairs = load_pairs(spec)
    assert [(p.prompt, p.response, p.row) for p in pairs] == [("w1 w2", "w3 w4 w5", 1), ("w6 w7", "w8 w9 w10", 1)]
    books = write_jsonl(tmp_path / "books.jsonl", [{"body": BOOK}, {"body": "a b c d e f"}])
    pairs = load_pairs(DatasetSpec(books, "book", text_field="body", prefix_words=3, continuation_words=3,
                                   stride_words=4))
    assert [(p.prompt, p.response, p.row) for p in pairs] == [
        ("w1 w2 w3", "w4 w5 w6", 1), ("w5 w6 w7", "w8 w9 w10", 1), ("a b c", "d e f", 2)
    ]


def test_book_shorter_than_a_window_is_a_problem_before_loading(tmp_path):
    book = tmp_path / "short.txt"
    book.write_text(BOOK)
    [problem] = DatasetSpec(str(book), "book", prefix_words=6, continuation_words=6).problems()
    assert problem == (f"book {str(book)!r} has 11 words, fewer than one window of 12 "
                       "(prefix_words=6 + continuation_words=6)")
    books = write_jsonl(tmp_path / "books.jsonl", [{"text": BOOK}, {"text": "too short"}])
    with pytest.raises(ValueError, match=r"row 2, field 'text': 2 words, fewer than one window of 5"):
        load_pairs(DatasetSpec(books, "book", prefix_words=2, continuation_words=3))
    assert len(load_pairs(DatasetSpec(books, "book", prefix_words=2, continuation_words=3, bad_rows="skip"))) == 2
    bad = DatasetSpec(str(book), "book", prefix_words=0, stride_words=0, text_field="").problems()
    assert bad == ["prefix_words=0 must be >= 1", "stride_words=0 must be >= 1 (or None: windows side by side)",
                   "text_field is empty"]
    assert "only format 'book' reads" in DatasetSpec(str(book), "pairs").problems()[0]


HALU_ROWS = [
    {"knowledge": "Velmora lies by the Silvane.", "question": "Which river flows through Velmora?",
     "right_answer": "The Silvane.", "hallucinated_answer": "The Ketter, which turns to gold."},
    {"knowledge": "k", "question": "Who founded Duskmere?", "right_answer": "Marta Vell."},
    {"knowledge": "k", "question": "What is Duskmere famous for?", "right_answer": "Plums.",
     "hallucinated_answer": " "},
]


def test_halueval_rows_become_question_to_hallucinated_answer(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", HALU_ROWS[:1])
    [pair] = load_pairs(DatasetSpec(path, "halueval"))
    assert (pair.prompt, pair.response, pair.right_answer, pair.hallucinated_answers, pair.knowledge) == (
        "Which river flows through Velmora?", "The Ketter, which turns to gold.", "The Silvane.",
        ("The Ketter, which turns to gold.",), "Velmora lies by the Silvane.",
    )
    assert hash(pair) == hash(Pair(**{name: getattr(pair, name) for name in pair.__dataclass_fields__}))


def test_halueval_row_missing_a_field_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", HALU_ROWS)
    with pytest.raises(ValueError) as info:
        load_pairs(DatasetSpec(path, "halueval"))
    assert f"{path}, row 2, field 'hallucinated_answer': missing" in str(info.value)
    assert f"{path}, row 3, field 'hallucinated_answer': empty" in str(info.value)
    loaded = read_pairs(DatasetSpec(path, "halueval", bad_rows="skip"))
    assert len(loaded.pairs) == 1 and [bad.row for bad in loaded.bad_rows] == [2, 3]
    no_column = write_jsonl(tmp_path / "nok.jsonl", [{k: v for k, v in HALU_ROWS[0].items() if k != "knowledge"}])
    with pytest.raises(ValueError, match="has no column 'knowledge'"):
        load_pairs(DatasetSpec(no_column, "halueval"))


def test_truthfulqa_pairs_keep_their_incorrect_answers(tmp_path):
    hub = write_jsonl(tmp_path / "tqa.jsonl", [
        {"question": "Q?", "best_answer": "Yes.", "incorrect_answers": ["No.", " "]},
        {"question": "R?", "best_answer": "Two."},
    ])
    first, second = load_pairs(DatasetSpec(hub, "truthfulqa"))
    assert (first.right_answer, first.hallucinated_answers) == ("Yes.", ("No.",))
    assert (second.right_answer, second.hallucinated_answers) == ("Two.", ())
    csv_path = tmp_path / "tqa.csv"
    pd.DataFrame([{"Question": "Q?", "Best Answer": "Yes.", "Incorrect Answers": "No; Never"}]).to_csv(csv_path,
                                                                                                       index=False)
    [pair] = load_pairs(DatasetSpec(str(csv_path), "truthfulqa"))
    assert pair.hallucinated_answers == ("No", "Never")
