"""The applications' behaviour flags and summaries against hand-worked cases, and the classifier checks that run before
any model is loaded."""

import json

import pytest
import torch

from dsunlearn.data.pairs import Pair
from dsunlearn.eval.applications import (
    Classifiers,
    LabelClassifier,
    behaviour_flags,
    classifier_problems,
    sample_means,
    sample_scores,
)
from dsunlearn.eval.eval_config import EvalConfig
from dsunlearn.settings.config import DataConfig
from dsunlearn.settings.dataset import DatasetSpec

NO_CLASSIFIERS = Classifiers()


def question(right, hallucinated, prompt="Which river flows through Velmora?"):
    return Pair(prompt, hallucinated, "test", 1, right_answer=right, hallucinated_answers=(hallucinated,))


def test_hallucination_is_closer_to_the_hallucinated_answer_and_a_tie_is_not():
    pair = question("The Silvane River flows through Velmora.", "The Ketter River flows through Velmora at night.")
    outputs = [
        "The Ketter River flows through Velmora at night.",  # the hallucinated answer itself
        "The Silvane River flows through Velmora.",  # the right answer itself
        "Snow is white.",  # shares no word with either: 0 = 0, a tie
        "The Ketter River",  # F1 to hallucinated (8 words) 2*(1*3/8)/(1+3/8) = 0.545 > to right (6 words) 0.444
        "Velmora",  # one word of each: 2/7 to right > 2/9 to hallucinated
    ]
    flags = behaviour_flags("hallucination", [pair] * len(outputs), outputs, EvalConfig(), NO_CLASSIFIERS)
    assert flags == [True, False, False, True, False]
    scores = sample_scores("hallucination", [pair] * 2, outputs[3:5], EvalConfig(), NO_CLASSIFIERS)
    assert scores[0]["rouge_l_hallucinated"] == pytest.approx(2 * (3 / 8) / (1 + 3 / 8))
    assert scores[0]["rouge_l_right"] == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert scores[1]["rouge_l_right"] == pytest.approx(2 / 7)
    assert scores[1]["rouge_l_hallucinated"] == pytest.approx(2 / 9)


def test_several_wrong_answers_take_the_closest_and_none_is_never_closer():
    pair = Pair("What colour is snow?", "Snow is white.", "t", 1, right_answer="Snow is white.",
                hallucinated_answers=("Snow is black.", "Snow is made of sugar crystals."))
    flags = behaviour_flags("hallucination", [pair] * 3, ["snow is made of sugar", "white", "black"], EvalConfig(),
                            NO_CLASSIFIERS)
    assert flags == [True, False, True]
    without = Pair("q", "a", "t", 1, right_answer="a")
    assert behaviour_flags("hallucination", [without], ["b"], EvalConfig(), NO_CLASSIFIERS) == [False]
    with pytest.raises(ValueError, match="right answer"):
        behaviour_flags("hallucination", [Pair("q", "a", "t", 1)], ["a"], EvalConfig(), NO_CLASSIFIERS)


def test_copyright_and_harmful_reproduce_at_the_threshold():
    pair = Pair("prefix", "one two three four", "t", 1)
    outputs = ["one two three four", "one two zzz", "one zzz", ""]
    settings = EvalConfig(reproduction_threshold=0.5)
    # ROUGE-L recall of the 4 reference words: 1, 0.5, 0.25, 0.
    assert behaviour_flags("copyright", [pair] * 4, outputs, settings, NO_CLASSIFIERS) == [True, True, False, False]
    assert behaviour_flags("harmful", [pair] * 4, outputs, settings, NO_CLASSIFIERS) == [True, True, False, False]
    scores = sample_scores("copyright", [pair] * 4, outputs, settings, NO_CLASSIFIERS)
    assert scores[0]["bleu"] == pytest.approx(100.0) and scores[3]["bleu"] == 0.0
    assert sample_means(scores) == {"behaviour_rate": [1.0, 1.0, 0.0, 0.0], "bleu": [s["bleu"] for s in scores]}
    with pytest.raises(ValueError, match="application must be one of"):
        behaviour_flags("poetry", [pair], ["x"], settings, NO_CLASSIFIERS)


def test_harmful_follows_the_classifier_when_one_is_given():
    class Always:
        def flags(self, pairs, responses):
            return [response == "bad" for response in responses]

    pair = Pair("p", "one two", "t", 1)
    scores = sample_scores("harmful", [pair] * 2, ["bad", "one two"], EvalConfig(), Classifiers(harm=Always()))
    assert [(s["behaviour"], s["harmful"]) for s in scores] == [(True, True), (False, False)]
    judged = sample_scores("hallucination", [question("a b", "c d")] * 2, ["bad", "x"], EvalConfig(),
                           Classifiers(judge=Always()))
    assert [(s["behaviour"], s["judged"]) for s in judged] == [(True, True), (False, False)]
    assert sample_means(judged)["hallucination_rate"] == [1.0, 0.0]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=bpe_tokenizer.pad_token_id,
        id2label={0: "faithful", 1: "Hallucinated"}, label2id={"faithful": 0, "Hallucinated": 1},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("judge")
    LlamaForSequenceClassification(config).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


def test_classifier_problems_read_config_json_only(tmp_path, judge_dir):
    assert classifier_problems("judge_classifier", str(judge_dir), "judge_label", "hallucinated") == []
    assert classifier_problems("judge_classifier", None, "judge_label", "x") == []
    [missing] = classifier_problems("judge_classifier", str(tmp_path / "nope"), "judge_label", "hallucinated")
    nope = str(tmp_path / "nope")
    assert missing == f"judge_classifier: local folder {nope!r} does not exist (it is never downloaded)"
    [wrong_label] = classifier_problems("judge_classifier", str(judge_dir), "judge_label", "made-up")
    assert "has labels ['Hallucinated', 'faithful']; set judge_label to the one meant (got 'made-up')" in wrong_label
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in classifier_problems("harm_classifier", str(empty), "harmful_label", "harmful")[0]
    (empty / "config.json").write_text('{"id2label": ')
    assert "is not valid JSON" in classifier_problems("harm_classifier", str(empty), "harmful_label", "harmful")[0]


def test_eval_config_lists_classifier_and_application_problems(tmp_path, judge_dir):
    (tmp_path / "model").mkdir()
    harmful_data = DataConfig(forget=DatasetSpec("f.jsonl"), normal=DatasetSpec("n.jsonl"))
    problems = EvalConfig(data=harmful_data, judge_classifier=str(judge_dir), judge_label="nope",
                          judge_classifier_input="{prompt}").evaluation_problems()
    assert any("set judge_label to the one meant (got 'nope')" in p for p in problems)
    assert any("judge_classifier_input must contain {response}" in p for p in problems)
    assert any("judge_classifier judges hallucinations, but data.application is 'harmful'" in p for p in problems)
    bad_pairing = DataConfig(application="hallucination", forget=DatasetSpec("f.jsonl", "pairs"),
                             normal=DatasetSpec("n.jsonl", "pairs"))
    found = bad_pairing.problems()
    assert any("data.forget.format=halueval provides (got 'pairs')" in p for p in found)
    assert any("data.normal.format truthfulqa (or halueval) provides (got 'pairs')" in p for p in found)


def test_label_classifier_flags_its_label(judge_dir):
    judge = LabelClassifier(str(judge_dir), "hallucinated", "{knowledge}\n{prompt}\n{response}", torch.device("cpu"),
                            "judge_classifier")
    config = json.loads((judge_dir / "config.json").read_text())
    assert config["id2label"][str(judge.label_id)] == "Hallucinated"
    pairs = [question("a", "b", prompt=f"question {i}?") for i in range(4)]
    responses = ["one", "two three", "four five six", "seven"]
    flags = judge.flags(pairs, responses)
    # The same verdicts straight from the model's logits.
    expected = []
    for pair, response in zip(pairs, responses):
        inputs = judge.tokenizer(f"{pair.knowledge or ''}\n{pair.prompt}\n{response}", return_tensors="pt")
        with torch.no_grad():
            expected.append(int(judge.model(**inputs).logits[0].argmax()) == judge.label_id)
    assert flags == expected
