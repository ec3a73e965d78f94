"""Shared fixtures: local tokenizers and a saved tiny Llama, all built from the bundled demo text.

Tests never reach a hub: the offline switches below are set before anything imports
transformers or datasets.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

from dsunlearn.demo import demo_texts  # noqa: E402
from dsunlearn.tiny import (  # noqa: E402
    build_bpe_tokenizer,
    build_sentencepiece_style_tokenizer,
    build_tiny_causal_lm,
    save_tiny_model,
)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """GPT-2 style byte-level BPE tokenizer (pad token, no automatic BOS), vocabulary 512."""
    return build_bpe_tokenizer(demo_texts(), vocab_size=512)


@pytest.fixture(scope="session")
def sp_tokenizer():
    """Llama/SentencePiece style tokenizer (automatic BOS, byte fallback, no pad token), vocabulary 512."""
    return build_sentencepiece_style_tokenizer(demo_texts(), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A folder with a saved tiny random Llama (hidden 32, 2 layers, untied head) and the BPE tokenizer."""
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("tiny_model"))
