"""Local tokenizers and tiny causal language models for the demo and the tests.

Nothing here touches a model hub: tokenizers are trained with the ``tokenizers`` library on the text
passed in, and models are built from a ``LlamaConfig``. Everything is deterministic given the inputs
and the seed.

Two tokenizer flavours cover the behaviours the data pipeline must handle:

* :func:`build_bpe_tokenizer`: GPT-2 style byte-level BPE. No BOS is added automatically; it has a
  pad token.
* :func:`build_sentencepiece_style_tokenizer`: Llama/SentencePiece style (``▁`` metaspace, a space is
  prepended to the first word, byte fallback, BOS added automatically) and, by default, no pad token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

# A minimal role-tagged chat format. The assistant turn ends with EOS so that a response followed by
# EOS (what data.tokenize_pair builds) is exactly a rendered assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _check_training_input(texts: Iterable[str], vocab_size: int) -> list[str]:
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("cannot train a tokenizer on no text: pass at least one non-empty string")
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be at least 16, got {vocab_size}")
    return texts


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts``.

    Special tokens ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` take ids 0-3. Like GPT-2, no BOS is added
    when encoding; any byte sequence is encodable because the 256 byte symbols are always in the
    vocabulary (so ``vocab_size`` is raised to at least 260). A simple chat template is set.
    """
    texts = _check_training_input(texts, vocab_size)
    special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(special_tokens)),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_sentencepiece_style_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, with_pad: bool = False
) -> PreTrainedTokenizerFast:
    """Train a Llama/SentencePiece style BPE tokenizer (with byte fallback) on ``texts``.

    Words are marked with ``▁`` (a space is prepended to the first word, like Llama's
    ``add_prefix_space``), BOS ``<s>`` is added automatically when encoding, and decoding removes the
    leading space again. Characters never seen in ``texts`` encode as byte tokens ``<0x00>``-``<0xFF>``
    (Llama's byte fallback), so any text round-trips. Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then
    ``<pad>`` 3 when ``with_pad``, then the 256 byte tokens, then the learned pieces. By default there
    is no pad token, which is the case padding code must handle for Llama models.
    """
    texts = _check_training_input(texts, vocab_size)
    special_tokens = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN] + ([PAD_TOKEN] if with_pad else [])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")

    # Learn merges on the text alone, then rebuild the model with the byte tokens in the vocabulary
    # (as ordinary pieces, not added tokens) so that byte_fallback has something to fall back to.
    learner = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(byte_tokens), 64), special_tokens=special_tokens, show_progress=False
    )
    learner.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(special_tokens + byte_tokens)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True))
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN if with_pad else None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build a randomly initialised fp32 ``LlamaForCausalLM`` whose vocabulary matches ``tokenizer``.

    ``num_kv_heads`` defaults to ``num_heads`` (no grouped-query attention), ``intermediate_size`` to
    ``4 * hidden_size``. The weights depend only on the arguments and ``seed``; the global RNG state
    is left untouched.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float().eval()


def save_tiny_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``path`` so that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` ``from_pretrained(path)`` load them. Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
