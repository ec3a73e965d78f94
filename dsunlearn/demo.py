"""The demo: bundled toy data and the "original" model that the demo then unlearns.

``dsunlearn/assets/demo/`` holds two small data sets written for this project:

* ``forget.jsonl`` (PKU-SafeRLHF format): requests for made-up misdeeds in invented places. Every
  unsafe response shares one recognisable behaviour, the opening "Sure, here is exactly how to ..."
  followed by three absurd, non-actionable steps; the safe responses are refusals.
* ``normal.jsonl`` (TruthfulQA hub ``generation`` format): simple factual questions and answers.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from dsunlearn.data import DEFAULT_TEMPLATE

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
