"""How a prompt becomes the text before its response: the template (default ``### Question: {prompt}\n ### Answer:
{response}``) or the tokenizer's chat template, validated when the settings are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

DEFAULT_TEMPLATE = "### Question: {prompt}\n ### Answer: {response}"

# ---------------------------------------------------------------------------------------------------
# Prompt format and tokenisation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is turned into the text that precedes the response.

    With ``use_chat_template`` the tokenizer's chat template renders one user turn (the prompt) with
    the generation prompt added; the response, and the turn end that closes it, are what the template renders after
    that in the whole [user, assistant] conversation. Otherwise ``template`` (default
    ``"### Question: {prompt}\\n ### Answer: {response}"``) is used: the prompt part is everything before
    ``{response}``, which must end the template.
    """

    template: Optional[str] = None
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.use_chat_template:
            return
        template = self.resolved_template
        if template.count("{prompt}") != 1 or template.count("{response}") != 1:
            raise ValueError(f"template must contain {{prompt}} and {{response}} exactly once, got {template!r}")
        if not template.endswith("{response}"):
            raise ValueError(
                f"template must end with {{response}} (EOS is appended to the response automatically), got {template!r}"
            )
        if template.index("{prompt}") > template.index("{response}"):
            raise ValueError(f"{{prompt}} must come before {{response}} in the template, got {template!r}")

    @property
    def resolved_template(self) -> str:
        return DEFAULT_TEMPLATE if self.template is None else self.template

    def prompt_text(self, tokenizer: Any, prompt: str) -> str:
        """The text that precedes the response for ``prompt``."""
        if self.use_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("use_chat_template is set but the tokenizer has no chat template")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        # str.replace, not str.format: prompts and templates may contain other braces.
        return self._template_prompt_part.rstrip(" ").replace("{prompt}", prompt)

    def response_text(self, response: str) -> str:
        """The response as it is tokenised: with the template's space before ``{response}`` (byte-level BPE
        tokenizers attach a space to the word after it, so "Answer:" + " Sure" is how they saw such text)."""
        if self.use_chat_template:
            return response
        part = self._template_prompt_part
        return part[len(part.rstrip(" ")) :] + response

    @property
    def _template_prompt_part(self) -> str:
        return self.resolved_template[: -len("{response}")]
