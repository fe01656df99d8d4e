# SPDX-License-Identifier: Apache-2.0
"""The "repeat the previous context" inputs that KVzip runs teacher-forced over the cache.

Chunk t covers context positions `[start, end)`. Its input ids are (no re-tokenisation of the
carried or chunk part):

- t = 0: `encode(repeat_prompt_first) + postfix + context[start:end]`
- t > 0: `encode(repeat_prompt_next) + context[start - carry:start] + postfix + context[start:end]`

where postfix is the chat template's close-user/open-assistant ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RepeatChunk:
    """One reconstruction step.

    Attributes:
        index: chunk number t.
        start, end: the context span `[start, end)` scored by this chunk (context positions).
        input_ids: the repeat input, `n_in` ids.
    """

    index: int
    start: int
    end: int
    input_ids: tuple[int, ...]


def chunk_spans(n_context: int, chunk_size: int) -> list[tuple[int, int]]:
    """Non-overlapping `[start, end)` spans of at most `chunk_size` covering `n_context` tokens."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n_context)) for s in range(0, n_context, chunk_size)]


def repeat_chunks(
    context_ids: Sequence[int],
    postfix_ids: Sequence[int],
    encode: Callable[[str], list[int]],
    chunk_size: int,
    carry_tokens: int,
    prompt_first: str,
    prompt_next: str,
) -> list[RepeatChunk]:
    """Build every chunk's repeat input.

    Args:
        context_ids: the context's token ids (`n_c`).
        postfix_ids: the chat template's close-user/open-assistant ids.
        encode: text -> ids without special tokens.
        chunk_size, carry_tokens, prompt_first, prompt_next: see `KVzipConfig`.
    """
    first = encode(prompt_first)
    nxt = encode(prompt_next)
    chunks = []
    for t, (start, end) in enumerate(chunk_spans(len(context_ids), chunk_size)):
        if t == 0:
            head = list(first)
        else:
            head = list(nxt) + list(context_ids[max(0, start - carry_tokens):start])
        ids = head + list(postfix_ids) + list(context_ids[start:end])
        chunks.append(RepeatChunk(index=t, start=start, end=end, input_ids=tuple(ids)))
    return chunks
