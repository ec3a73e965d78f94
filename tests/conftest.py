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

from dsunlearn.data.tiny import (  # noqa: E402
    build_bpe_tokenizer,
    build_sentencepiece_style_tokenizer,
    build_tiny_causal_lm,
    save_tiny_model,
)
from dsunlearn.tools.demo import demo_texts  # noqa: E402


@pytest.fixture(autouse=True)
def environment_kept_per_test():
    """What a test, or a library it runs in this process, sets in ``os.environ`` ends with the test: torch's compiler
    leaves _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR behind, and every process a later test launched from this pytest
    process then inherited it, and started cold (tests/warm_start.py takes only the server's environment)."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


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


@pytest.fixture(scope="session")
def straight_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 6-step run of the demo config on 2 ranks, a checkpoint every step, exported, not evaluated:
    what interrupted runs must reproduce (test_failures, test_checkpoints)."""
    from launching import launch

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir", str(run_dir),
            "--train.max_steps", "6", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "0",
            "--output.evaluate", "false"]
    code, output = launch(args)  # a run stopped from outside is finished as a user would (launching.OUTSIDE_STOP)
    assert code == 0, output[-4000:]
    return run_dir
