# SPDX-License-Identifier: Apache-2.0
"""Token layout of a compressible context, built from the model's own tokenizer and chat template.

`[prefix][context][question + postfix]`: prefix = the chat template's opening up to the user
content (BOS, system prompt, user header), the protected part; the context fills a user turn left
open; a question is appended as `"\\n\\n" + question` + postfix (close-user/open-assistant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_SENTINEL = "KVZIPCONTEXTSENTINEL"


@dataclass(frozen=True)
class TemplateParts:
    """The chat template split around the user content.

    Attributes:
        prefix_ids: template opening, up to the user content.
        postfix_ids: close-user + open-assistant.
    """

    prefix_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]


@dataclass(frozen=True)
class ContextLayout:
    """Ids of one context to compress.

    Attributes:
        prefix_ids: protected prefix (never evicted, not counted in the ratio).
        context_ids: the compressible context.
        postfix_ids: close-user/open-assistant ids (repeat inputs and questions end with them).
    """

    prefix_ids: tuple[int, ...]
    context_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]

    @property
    def n_prefix(self) -> int:
        return len(self.prefix_ids)

    @property
    def n_context(self) -> int:
        return len(self.context_ids)

    @property
    def input_ids(self) -> list[int]:
        """prefix + context: what is prefilled and compressed."""
        return list(self.prefix_ids) + list(self.context_ids)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Text -> ids without the tokenizer's own special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_parts(tokenizer: Any, system_prompt: str | None = None) -> TemplateParts:
    """Split the tokenizer's chat template around the user content.

    Falls back to `[BOS] ... "\\n\\nAnswer:"` (with a warning) for a tokenizer without a chat template.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer has no chat template; using a plain-text layout")
        return TemplateParts(prefix_ids=tuple(bos), postfix_ids=tuple(encode(tokenizer, "\n\nAnswer:")))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": _SENTINEL})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user content exactly once")
    before, after = text.split(_SENTINEL)
    prefix = encode(tokenizer, before)
    # A template that does not render BOS for a tokenizer that adds one by default: add it.
    adds_bos = bool(bos) and encode(tokenizer, "a") != list(tokenizer("a")["input_ids"])
    if adds_bos and (not prefix or prefix[0] != bos[0]):
        prefix = bos + prefix
    return TemplateParts(prefix_ids=tuple(prefix), postfix_ids=tuple(encode(tokenizer, after)))


def build_layout(tokenizer: Any, context: str, system_prompt: str | None = None,
                 protected_prefix_tokens: int | None = None) -> ContextLayout:
    """Layout of `context` under the chat template (or raw: first N tokens protected).

    Args:
        tokenizer: a Hugging Face tokenizer.
        context: the text to compress.
        system_prompt: rendered into the protected prefix.
        protected_prefix_tokens: if set, no template opening is added; the first N tokens of
            `encode(context)` are the protected prefix and the rest is the context.
    """
    parts = template_parts(tokenizer, system_prompt)
    if protected_prefix_tokens is None:
        return ContextLayout(parts.prefix_ids, tuple(encode(tokenizer, context)), parts.postfix_ids)
    ids = encode(tokenizer, context)
    n = min(protected_prefix_tokens, len(ids))
    return ContextLayout(tuple(ids[:n]), tuple(ids[n:]), parts.postfix_ids)


def question_ids(tokenizer: Any, layout: ContextLayout, question: str) -> list[int]:
    """Ids appended after the context to ask `question`: `"\\n\\n" + question` + postfix."""
    return encode(tokenizer, "\n\n" + question) + list(layout.postfix_ids)
