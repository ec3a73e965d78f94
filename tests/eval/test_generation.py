"""Greedy generation ends where the model's turn ends: at EOS, at the generation config's EOS ids, and at the chat
template's end of turn (a Gemma-style ``<end_of_turn>`` that the generation config does not list)."""

from torch import nn

from dsunlearn.data.tiny import build_bpe_tokenizer, build_tiny_causal_lm
from dsunlearn.data import tokenization
from dsunlearn.data.tokenization import tokenize_prompt
from dsunlearn.eval.eval_config import EvalConfig, EvalContext
from dsunlearn.eval.generation import generate, stop_token_ids
from dsunlearn.settings.prompt_format import PromptFormat
from dsunlearn.tools.demo import demo_texts

# Gemma's template, in short: every turn ends with <end_of_turn>, never with EOS.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _gemma_style_tokenizer():
    tokenizer = build_bpe_tokenizer(demo_texts(), vocab_size=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    return tokenizer


class _AlwaysSays(nn.Module):
    """An output head whose greedy choice is always ``token``."""

    def __init__(self, token: int, vocab_size: int):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size

    def forward(self, hidden):
        logits = hidden.new_zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


def test_generation_stops_at_the_chat_templates_end_of_turn():
    tokenizer = _gemma_style_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = build_tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # the config lacks <end_of_turn>

    # The model answers <end_of_turn> and would go on saying it: the generation is that one token.
    model.lm_head = _AlwaysSays(end_of_turn, len(tokenizer))
    cfg = EvalConfig(max_new_tokens=5, batch_size=2)
    cfg.data.use_chat_template = True
    context = EvalContext(tokenizer, cfg, world_size=1)
    prompts = [tokenize_prompt(tokenizer, text, PromptFormat(use_chat_template=True), 64) for text in ("hi", "who?")]
    assert generate(model, prompts, context) == [[end_of_turn], [end_of_turn]]
    assert stop_token_ids(model, tokenizer) == {tokenizer.eos_token_id, end_of_turn}
    assert tokenization.chat_turn_end_id(tokenizer) == end_of_turn


def test_a_template_that_ends_turns_with_eos_adds_nothing(bpe_tokenizer):
    # The tiny tokenizers' template closes an assistant turn with EOS, and a tokenizer without a template has none.
    assert tokenization.chat_turn_end_id(bpe_tokenizer) == bpe_tokenizer.eos_token_id
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    assert stop_token_ids(model, bpe_tokenizer) == {bpe_tokenizer.eos_token_id}
    plain = build_bpe_tokenizer(demo_texts(), vocab_size=512)
    plain.chat_template = None
    assert tokenization.chat_turn_end_id(plain) is None
