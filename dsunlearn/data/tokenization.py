"""Tokenisation with exact response masks, and padding.

The unlearning objective only ever scores *response* tokens, so the response mask must be exact, and the tokens
must be those the model sees when the answer follows its prompt. :func:`tokenize_pair` therefore tokenises the
joint text (prompt part + response) and cuts it where the prompt's characters end (token offsets): tokenising the
response alone differs on some tokenizers (a legacy SentencePiece normalizer turns " Sure" alone into
['▁', '▁Sure']). With a chat template the response span, and the turn end that closes it, are taken from the
rendered conversation itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dsunlearn.data.pairs import Pair
from dsunlearn.settings.prompt_format import PromptFormat

logger = logging.getLogger(__name__)


@dataclass
class TokenizedSequence:
    """Token ids of prompt + response, and which of them are response tokens."""

    input_ids: list[int]
    response_mask: list[int]
    """1 for response tokens (including the end of the answer: EOS, or the chat template's turn end), 0 for prompt
    tokens."""
    response_capped: bool = False
    """Whether the response lost its tail to fit ``max_length`` (its end-of-answer token with it)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids) - sum(self.response_mask)


class PromptTooLong(ValueError):
    """The prompt part leaves no room for a single response token within ``max_length``."""

    def __init__(self, message: str, num_prompt_tokens: int):
        super().__init__(message)
        self.num_prompt_tokens = num_prompt_tokens


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before the text when encoding (e.g. Llama's BOS; none for GPT-2)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def _without_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    # A chat template usually writes the BOS itself; never add it twice.
    return ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids


def _check_prompt_fits(num_prompt_tokens: int, max_length: int, where: str) -> None:
    if num_prompt_tokens + 1 > max_length:
        raise PromptTooLong(
            f"{where}: the prompt takes {num_prompt_tokens} tokens, so data.max_length={max_length} leaves no room "
            "for the response",
            num_prompt_tokens,
        )


def tokenize_prompt(
    tokenizer: Any,
    prompt: str,
    fmt: PromptFormat,
    max_length: Optional[int] = None,
    prefix_ids: Optional[list[int]] = None,
) -> list[int]:
    """Token ids of the prompt part (special prefix included), for generation. With ``max_length``, raises
    :class:`PromptTooLong` when no response token would fit after it: a prompt is never cut."""
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    ids = list(tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    ids = _without_prefix(ids, prefix)
    if max_length is not None:
        _check_prompt_fits(len(prefix) + len(ids), max_length, f"prompt {prompt[:40]!r}")
    return prefix + ids


def _special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token (EOS, and added ones such as ``<|eot_id|>`` or ``<end_of_turn>``)."""
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return [text for text in dict.fromkeys([*added, *tokenizer.all_special_tokens]) if text]


def _answer_text(tokenizer: Any, fmt: PromptFormat, prompt_text: str, pair: Pair, with_end: bool) -> tuple[str, bool]:
    """The text that follows ``prompt_text`` in the training sequence, and whether EOS is to be appended to its ids.

    With a chat template this is the assistant turn as the template renders it, up to and including the first
    special token after the content (the template's own turn end: ``<|eot_id|>``, ``<end_of_turn>``); EOS only when
    the template ends the turn with no special token. ``with_end`` False leaves the end of the answer out.
    """
    if not fmt.use_chat_template:
        return fmt.response_text(pair.response), with_end and tokenizer.eos_token_id is not None
    conversation = [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.response}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not rendered.startswith(prompt_text):
        raise ValueError(
            f"{pair.origin}: the chat template renders the conversation differently from its prompt with "
            "add_generation_prompt=True, so the answer cannot be located; use data.template instead"
        )
    turn = rendered[len(prompt_text) :]
    content = pair.response if pair.response in turn else pair.response.strip()  # templates may trim the content
    at = turn.find(content)
    if at < 0:
        raise ValueError(f"{pair.origin}: the chat template changes the response text, so it cannot be located")
    content_end = at + len(content)
    if not with_end:
        return turn[:content_end], False
    tail = turn[content_end:]
    ends = [(tail.find(text), -len(text), text) for text in _special_strings(tokenizer) if text in tail]
    if not ends:
        return turn[:content_end], tokenizer.eos_token_id is not None
    position, _, text = min(ends)  # the first special token after the content; the longest one at a tie
    return turn[: content_end + position + len(text)], False


def chat_turn_end_id(tokenizer: Any) -> Optional[int]:
    """The id of the token that ends an assistant turn in the tokenizer's chat template (Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``): the first special token the template renders after the
    assistant's content, as :func:`tokenize_pair` ends a chat-formatted answer. None without a chat template, or when
    the template ends the turn with no special token (or cannot render a user/assistant exchange)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    content = "dsunlearn turn-end probe"
    conversation = [{"role": "user", "content": "question"}, {"role": "assistant", "content": content}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this exchange (e.g. it wants a system turn)
        return None
    at = rendered.rfind(content)
    if at < 0:
        return None
    tail = rendered[at + len(content):]
    ends = [(tail.find(text), -len(text), text) for text in _special_strings(tokenizer) if text in tail]
    if not ends:
        return None
    _, _, text = min(ends)
    token_id = tokenizer.convert_tokens_to_ids(text)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def _tokenize_joint(tokenizer: Any, prompt_text: str, answer_text: str) -> tuple[list[int], int]:
    """Token ids of ``prompt_text + answer_text`` and the index of the first answer token.

    The joint text is tokenised once, so the answer's tokens are those the model sees after its prompt; the cut is
    the first token reaching past the prompt's characters (a token straddling the boundary holds answer text).
    """
    text = prompt_text + answer_text
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        cut = next((i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(prompt_text)), len(ids))
        return ids, cut
    # A Python tokenizer has no offsets: the joint ids must begin with the prompt's own.
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("this (slow) tokenizer merges tokens across the prompt/response boundary; use a fast one")
    return ids, len(prompt_ids)


def tokenize_pair(
    tokenizer: Any,
    pair: Pair,
    fmt: PromptFormat,
    max_length: int,
    prefix_ids: Optional[list[int]] = None,
    *,
    end_of_response: bool = True,
) -> TokenizedSequence:
    """Tokenise one pair as [special prefix] + prompt part + response + [end of answer], with its response mask.

    The end of the answer is EOS, or with a chat template the template's own turn end; ``end_of_response`` False
    leaves it out. The prompt is never cut: the response is capped at ``max_length`` (losing its tail and its end),
    and :class:`PromptTooLong` is raised when not even one response token fits. ``prefix_ids`` (from
    :func:`special_prefix_ids`) may be passed to avoid recomputing it per pair.
    """
    prefix = special_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids
    prompt_text = fmt.prompt_text(tokenizer, pair.prompt)
    answer_text, append_eos = _answer_text(tokenizer, fmt, prompt_text, pair, end_of_response)
    ids, cut = _tokenize_joint(tokenizer, prompt_text, answer_text)
    prompt_ids, response_ids = _without_prefix(ids[:cut], prefix), ids[cut:]
    if append_eos:
        response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        raise ValueError(f"{pair.origin}: the response tokenises to nothing")
    _check_prompt_fits(len(prefix) + len(prompt_ids), max_length, pair.origin)
    room = max_length - len(prefix) - len(prompt_ids)
    input_ids = prefix + prompt_ids + response_ids[:room]
    response_mask = [0] * (len(prefix) + len(prompt_ids)) + [1] * len(response_ids[:room])
    return TokenizedSequence(input_ids, response_mask, response_capped=len(response_ids) > room)


@dataclass
class TokenizedPairs:
    """The pairs that fit ``max_length``, their sequences, and what did not fit."""

    pairs: list[Pair]
    """The pairs kept, in their order."""
    sequences: list[TokenizedSequence]
    """One per kept pair."""
    dropped: list[Pair]
    """Pairs whose prompt leaves no room for a response token."""

    @property
    def num_capped(self) -> int:
        """Kept pairs whose response lost its tail."""
        return sum(sequence.response_capped for sequence in self.sequences)

    def summary(self, max_listed: int = 3) -> str:
        """One line for the log: counts, and the first few dropped pairs by origin."""
        text = f"{len(self.pairs)} pairs kept, {self.num_capped} responses capped, {len(self.dropped)} pairs dropped"
        if self.dropped:
            listed = "; ".join(pair.origin for pair in self.dropped[:max_listed])
            more = f" and {len(self.dropped) - max_listed} more" if len(self.dropped) > max_listed else ""
            text += f" (prompt too long: {listed}{more})"
        return text


def tokenize_pairs(
    tokenizer: Any,
    pairs: list[Pair],
    fmt: PromptFormat,
    max_length: int,
    *,
    end_of_response: bool = True,
    name: str = "data",
) -> TokenizedPairs:
    """:func:`tokenize_pair` for every pair, dropping those whose prompt does not fit; raises ValueError naming
    ``data.max_length`` when none fits. ``name`` says which data set it is in messages."""
    prefix = special_prefix_ids(tokenizer)
    kept, sequences, dropped, shortest_prompt = [], [], [], None
    for pair in pairs:
        try:
            sequence = tokenize_pair(tokenizer, pair, fmt, max_length, prefix, end_of_response=end_of_response)
        except PromptTooLong as error:
            dropped.append(pair)
            shortest_prompt = min(error.num_prompt_tokens, shortest_prompt or error.num_prompt_tokens)
            continue
        kept.append(pair)
        sequences.append(sequence)
    if pairs and not kept:
        raise ValueError(
            f"data.max_length={max_length} is too short for every {name} pair: the shortest prompt takes "
            f"{shortest_prompt} tokens, and a response needs at least one more (a prompt is never cut)"
        )
    return TokenizedPairs(kept, sequences, dropped)


def resolve_pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its EOS id (with a warning), else an error."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        logger.warning(
            "the tokenizer has no pad token; padding with EOS (id %d). This is safe: padded positions are "
            "masked out of attention and of every loss term.",
            tokenizer.eos_token_id,
        )
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token before training")


def pad_batch(sequences: list[TokenizedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``sequences`` into ``input_ids``, ``attention_mask``, ``response_mask``, each [B, L] long."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        n = len(sequence)
        input_ids[i, :n] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, :n] = torch.tensor(sequence.response_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
