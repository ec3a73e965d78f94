"""TOFU's and MUSE's file shapes (formats tofu, muse_verbmem, muse_knowmem): what a row becomes, and the error that
names the file, row and field of a bad one."""

import json

import pandas as pd
import pytest

from dsunlearn.data.load import load_pairs, read_pairs
from dsunlearn.settings.dataset import DatasetSpec
from dsunlearn.settings.paths import resolve_path

TOFU_ROW = {
    "question": "Where was Ada Quill born?",
    "answer": "Ada Quill was born in Fenmouth.",
    "paraphrased_answer": "Fenmouth is where Ada Quill was born.",
    "perturbed_answer": ["Ada Quill was born in Harwick.", "Ada Quill was born in Lowdell."],
    "paraphrased_question": "What is Ada Quill's birthplace?",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_tofu_row_keeps_its_answers_on_the_pair(tmp_path):
    bare = {"question": "Who wrote Tide?", "answer": "Ada Quill."}
    pairs = load_pairs(DatasetSpec(write_jsonl(tmp_path / "t.jsonl", [TOFU_ROW, bare]), format="tofu"))
    full, plain = pairs
    assert (full.prompt, full.response) == (TOFU_ROW["question"], TOFU_ROW["answer"])
    assert full.paraphrased_answer == TOFU_ROW["paraphrased_answer"]
    assert full.perturbed_answers == tuple(TOFU_ROW["perturbed_answer"])
    assert full.paraphrased_question == TOFU_ROW["paraphrased_question"]
    # The optional fields may be absent (or null): the row is a plain (question, answer) pair.
    assert (plain.paraphrased_answer, plain.perturbed_answers, plain.paraphrased_question) == (None, (), None)


def test_tofu_perturbed_answers_from_parquet(tmp_path):
    """Parquet holds the list as an array; it arrives as the same tuple of texts."""
    path = tmp_path / "t.parquet"
    pd.DataFrame([TOFU_ROW]).to_parquet(path)
    (pair,) = load_pairs(DatasetSpec(str(path), format="tofu"))
    assert pair.perturbed_answers == tuple(TOFU_ROW["perturbed_answer"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"perturbed_answer": "Ada Quill was born in Harwick."}, "field 'perturbed_answer': not a list of texts"),
        ({"perturbed_answer": []}, "field 'perturbed_answer': an empty list"),
        ({"perturbed_answer": ["fine", "  "]}, "field 'perturbed_answer': item 2 is empty"),
        ({"perturbed_answer": ["fine", 7]}, "field 'perturbed_answer': item 2 is not text"),
        ({"perturbed_answer": None}, "field 'perturbed_answer': missing, but 'paraphrased_answer' is given"),
        ({"paraphrased_answer": None}, "field 'paraphrased_answer': missing, but 'perturbed_answer' is given"),
        ({"paraphrased_answer": ""}, "field 'paraphrased_answer': empty"),
        ({"paraphrased_question": 3}, "field 'paraphrased_question': not text"),
        ({"answer": " "}, "field 'answer': empty"),
    ],
)
def test_bad_tofu_rows_name_file_row_and_field(tmp_path, change, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [TOFU_ROW, {**TOFU_ROW, **change}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2, " + message):
        load_pairs(DatasetSpec(path, format="tofu"))
    loaded = read_pairs(DatasetSpec(path, format="tofu", bad_rows="skip"))
    assert [pair.row for pair in loaded.pairs] == [1] and len(loaded.bad_rows) == 1


@pytest.mark.parametrize(
    ("fmt", "row", "missing"),
    [
        ("tofu", {"question": "q"}, "'answer'"),
        ("muse_verbmem", {"prompt": "p", "text": "t"}, "'gt'"),
        ("muse_knowmem", {"question": "q", "gt": "a"}, "'answer'"),
    ],
)
def test_a_file_without_the_format_s_columns_is_named_once(tmp_path, fmt, row, missing):
    path = write_jsonl(tmp_path / "wrong.jsonl", [row, row])
    with pytest.raises(ValueError, match=rf"wrong\.jsonl' has no column {missing} \(format '{fmt}' reads"):
        load_pairs(DatasetSpec(path, format=fmt))


def test_muse_rows_are_prompt_and_ground_truth(tmp_path):
    verbmem = load_pairs(
        DatasetSpec(
            write_jsonl(tmp_path / "v.jsonl", [{"prompt": "It was", "gt": "a dark night."}]), format="muse_verbmem"
        )
    )
    knowmem = load_pairs(
        DatasetSpec(write_jsonl(tmp_path / "k.jsonl", [{"question": "Who?", "answer": "Pell."}]), format="muse_knowmem")
    )
    assert [(p.prompt, p.response) for p in verbmem + knowmem] == [("It was", "a dark night."), ("Who?", "Pell.")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "It was", "gt": ["a list"]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 1, field 'gt': not text"):
        load_pairs(DatasetSpec(bad, format="muse_verbmem"))


def test_bundled_files_of_each_shape_load():
    def loaded(name, fmt):
        return read_pairs(DatasetSpec(str(resolve_path(f"dsunlearn/assets/{name}")), format=fmt))

    forget, retain = loaded("tofu_shaped/forget.jsonl", "tofu"), loaded("tofu_shaped/retain.jsonl", "tofu")
    assert (len(forget.pairs), len(retain.pairs)) == (8, 16)
    assert all(pair.paraphrased_answer and len(pair.perturbed_answers) == 3 for pair in forget.pairs + retain.pairs)
    assert not {pair.prompt for pair in forget.pairs} & {pair.prompt for pair in retain.pairs}
    assert len(loaded("muse_shaped/verbmem.jsonl", "muse_verbmem").pairs) == 8
    assert len(loaded("muse_shaped/knowmem.jsonl", "muse_knowmem").pairs) == 8
