"""A user's mistake in the model folder, the tokenizer or the rank count reads like a settings error: one message,
printed once, exit EXIT_USAGE, no traceback, and nothing left in the output folder."""

import json
import shutil

import pytest
from launching import launch

from dsunlearn.runtime.distributed import EXIT_USAGE

pytestmark = pytest.mark.distributed


def run_args(model_dir, out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--output.dir", str(out_dir),
            "--train.max_steps", "1", "--output.evaluate", "false", "--output.export", "false", *extra]


def assert_one_usage_message(code, output, out_dir, expected):
    assert code == EXIT_USAGE, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    messages = [line for line in output.splitlines() if line.startswith("dsunlearn:")]
    assert len(messages) == 1 and expected in messages[0], output[-4000:]
    assert not (out_dir / "config.yaml").exists()


def test_corrupt_model_config(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    text = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(text[: len(text) // 2])  # cut mid-file, as an interrupted copy leaves it
    code, output = launch(run_args(model_dir, tmp_path / "run"), timeout=240)
    assert_one_usage_message(code, output, tmp_path / "run", f"{model_dir / 'config.json'}' is not a valid JSON file")


def test_model_folder_without_tokenizer(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    code, output = launch(run_args(model_dir, tmp_path / "run"), timeout=240)
    assert_one_usage_message(code, output, tmp_path / "run", "cannot load the tokenizer")


def test_more_ranks_than_forget_examples(tiny_model_dir, tmp_path):
    forget = tmp_path / "two.jsonl"
    forget.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(2)))
    args = run_args(tiny_model_dir, tmp_path / "run", "--data.forget.source", str(forget), "--data.forget.format",
                    "pairs", "--data.forget.prompt_field", "prompt", "--data.forget.response_field", "response",
                    "--data.forget.held_out_fraction", "0")
    code, output = launch(args, nproc=3, timeout=240)
    assert_one_usage_message(code, output, tmp_path / "run", "every rank needs at least one")


def test_halueval_row_missing_a_field(tiny_model_dir, tmp_path):
    forget = tmp_path / "qa.jsonl"
    rows = [{"knowledge": "k", "question": f"Who founded land {i}?", "right_answer": f"R{i}.",
             "hallucinated_answer": f"H{i}."} for i in range(4)]
    del rows[2]["hallucinated_answer"]
    forget.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = run_args(tiny_model_dir, tmp_path / "run", "--data.application", "hallucination",
                    "--data.forget.source", str(forget), "--data.forget.format", "halueval")
    code, output = launch(args, timeout=240)
    assert_one_usage_message(code, output, tmp_path / "run", f"{forget}, row 3, field 'hallucinated_answer': missing")


def test_book_shorter_than_a_window(tiny_model_dir, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Only a few words of a book.")
    args = run_args(tiny_model_dir, tmp_path / "run", "--data.application", "copyright", "--data.forget.source",
                    str(book), "--data.forget.format", "book", "--data.forget.prefix_words", "4",
                    "--data.forget.continuation_words", "4")
    code, output = launch(args, timeout=240)
    # A settings problem: "dsunlearn: invalid settings:" and one line per problem, before any model loads.
    assert code == EXIT_USAGE and "Traceback" not in output, output[-4000:]
    assert f"data.forget: book '{book}' has 7 words, fewer than one window of 8" in output
    assert not (tmp_path / "run" / "config.yaml").exists()
