"""Local tokenizers and tiny models: the properties the data pipeline and the demo rely on."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsunlearn.data.tiny import (
    build_bpe_tokenizer,
    build_sentencepiece_style_tokenizer,
    build_tiny_causal_lm,
    save_tiny_model,
)
from dsunlearn.tools.demo import demo_texts


def test_bpe_tokenizer_is_gpt2_like(bpe_tokenizer):
    assert len(bpe_tokenizer) == 512
    special_ids = [bpe_tokenizer.pad_token_id, bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id]
    assert special_ids + [bpe_tokenizer.unk_token_id] == [0, 1, 2, 3]
    ids = bpe_tokenizer("Snow is white.")["input_ids"]
    assert ids == bpe_tokenizer("Snow is white.", add_special_tokens=False)["input_ids"]  # no automatic BOS
    text = "Unseen: ~€ and ✓ round-trip through bytes."
    assert bpe_tokenizer.decode(bpe_tokenizer(text)["input_ids"]) == text
    assert bpe_tokenizer.unk_token_id not in bpe_tokenizer(text)["input_ids"]


def test_sentencepiece_style_tokenizer_is_llama_like(sp_tokenizer):
    assert len(sp_tokenizer) == 512
    assert sp_tokenizer.pad_token_id is None
    assert [sp_tokenizer.unk_token_id, sp_tokenizer.bos_token_id, sp_tokenizer.eos_token_id] == [0, 1, 2]
    ids = sp_tokenizer("Snow is white.")["input_ids"]
    assert ids[0] == sp_tokenizer.bos_token_id
    assert ids[1:] == sp_tokenizer("Snow is white.", add_special_tokens=False)["input_ids"]
    assert sp_tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")  # prefix space on the first word
    text = "Unseen: ~€ and ✓ round-trip\nthrough byte fallback."
    encoded = sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sp_tokenizer.unk_token_id not in encoded
    assert sp_tokenizer.decode(encoded) == text
    assert "<0xE2>" in sp_tokenizer.convert_ids_to_tokens(encoded)  # first byte of the unseen "€"
    with_pad = build_sentencepiece_style_tokenizer(demo_texts()[:50], vocab_size=400, with_pad=True)
    assert with_pad.pad_token == "<pad>" and with_pad.pad_token_id == 3


def test_tokenizers_are_deterministic_and_have_a_chat_template():
    texts = demo_texts()[:80]
    for build in (build_bpe_tokenizer, build_sentencepiece_style_tokenizer):
        first, second = build(texts, 400), build(texts, 400)
        assert first.get_vocab() == second.get_vocab()
        rendered = first.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
        )
        assert rendered == "<s><|user|>\nHi\n<|assistant|>\nHello</s>\n"


def test_tokenizer_rejects_no_text():
    with pytest.raises(ValueError, match="no text"):
        build_bpe_tokenizer(["", ""], 300)


def test_tiny_model_is_sized_to_the_tokenizer_and_seeded(sp_tokenizer):
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    model = build_tiny_causal_lm(sp_tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # global RNG untouched
    assert model.config.vocab_size == len(sp_tokenizer)
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == 128
    assert model.generation_config.pad_token_id == sp_tokenizer.eos_token_id  # no pad token: EOS
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    same = build_tiny_causal_lm(sp_tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=5)
    other = build_tiny_causal_lm(sp_tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    tied = build_tiny_causal_lm(sp_tokenizer, hidden_size=32, num_heads=4, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_causal_lm(sp_tokenizer, hidden_size=30, num_heads=4)


def test_saved_tiny_model_loads_with_auto_classes(tiny_model_dir, bpe_tokenizer):
    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = "### Question: What colour is snow?\n ### Answer: "
    assert tokenizer(text)["input_ids"] == bpe_tokenizer(text)["input_ids"]
    assert tokenizer.pad_token_id == bpe_tokenizer.pad_token_id
    assert tokenizer.chat_template == bpe_tokenizer.chat_template
    rebuilt = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, rebuilt(ids).logits)


def test_save_tiny_model_creates_the_folder(tmp_path, sp_tokenizer):
    model = build_tiny_causal_lm(sp_tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    path = save_tiny_model(model, sp_tokenizer, tmp_path / "nested" / "model")
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.pad_token_id is None
    assert loaded("Snow")["input_ids"][0] == loaded.bos_token_id
