# SPDX-License-Identifier: Apache-2.0
"""The scoring requests of one cached prefix inside a serving engine, the same for vLLM and SGLang.

An engine scores a hot prefix of L tokens by prefilling, on top of its cached KV, one internal request
per repeat chunk: `prefix + repeat input` (`reconstruction.repeat_chunks`), one token generated.
`plan_scoring` splits the prefix into its protected head (the chat template's opening, never evicted)
and its context, and shrinks the chunks so every request fits the engine's longest input (more, shorter
requests; the same score per token). `ScoringTarget` is what the engine's score capture needs to know
about one such request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.scoring.reconstruction import RepeatChunk, repeat_chunks

SCORING_OVERHEAD = 64
"""Repeat prompt + chat postfix tokens of a scoring request, with margin."""
MIN_CHUNK = 32
"""Shortest chunk worth a scoring request (the default of `plan_scoring`'s `min_chunk`)."""


class Unservable(ValueError):
    """The prefix can never be scored by this engine instance: a retry would fail the same way."""


@dataclass(frozen=True)
class ScoringTarget:
    """A scoring request: the repeat input of one chunk, prefilled on top of a cached prefix.

    Attributes:
        job_id: the compression job.
        prefix_len: L, tokens of the prefix (the scoring request's prompt is prefix + repeat input).
        n_protected: leading prefix tokens that are always kept (not scored).
        start, end: the context span `[start, end)` this chunk scores (context coordinates, i.e.
            prefix positions minus `n_protected`).
        softmax: `chunk` (protected + chunk + repeat keys, as the official code) or `full_cache`.
    """

    job_id: int
    prefix_len: int
    n_protected: int
    start: int
    end: int
    softmax: str = "chunk"


@dataclass(frozen=True)
class ScoringPlan:
    """The scoring requests of one prefix.

    Attributes:
        n_protected: leading prefix tokens kept whole (the template opening, or
            `KVzipConfig.protected_prefix_tokens`).
        chunks: one repeat input per scoring request; request i's prompt is `prefix + chunks[i].input_ids`.
    """

    n_protected: int
    chunks: list[RepeatChunk]

    def targets(self, job_id: int, prefix_len: int, softmax: str) -> list[ScoringTarget]:
        """The `ScoringTarget` of each chunk, in order."""
        return [ScoringTarget(job_id, prefix_len, self.n_protected, c.start, c.end, softmax) for c in self.chunks]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def protected_tokens(prefix_ids: Sequence[int], tokenizer: Any, config: KVzipConfig) -> int:
    """How many leading tokens of the cached prefix are never evicted (the chat template's opening, or
    `config.protected_prefix_tokens`). Raises `Unservable` when the rest is shorter than
    `config.min_context_tokens`. (The `kvzip_head` scorer needs only this; `kvzip` plans its scoring pass.)"""
    from kvzip_plugin.hf.template import template_parts

    if config.protected_prefix_tokens is not None:
        n_protected = min(config.protected_prefix_tokens, len(prefix_ids))
    else:
        n_protected = common_prefix_len(template_parts(tokenizer, config.system_prompt).prefix_ids, prefix_ids)
    if len(prefix_ids) - n_protected < config.min_context_tokens:
        raise Unservable(f"context of {len(prefix_ids) - n_protected} tokens < min_context_tokens")
    return n_protected


def plan_scoring(prefix_ids: Sequence[int], tokenizer: Any, config: KVzipConfig, max_input_len: int,
                 min_chunk: int = MIN_CHUNK) -> ScoringPlan:
    """Plan the scoring requests of the cached prefix `prefix_ids` (L tokens) for an engine whose
    requests may hold at most `max_input_len` prompt tokens. Raises `Unservable` when the context is
    shorter than `config.min_context_tokens` or the prefix leaves no room for a `min_chunk`-token chunk."""
    from kvzip_plugin.hf.template import encode, template_parts

    L = len(prefix_ids)
    parts = template_parts(tokenizer, config.system_prompt)
    n_protected = protected_tokens(prefix_ids, tokenizer, config)
    context = list(prefix_ids[n_protected:])
    chunk_size = min(config.chunk_size, max_input_len - L - SCORING_OVERHEAD - config.carry_tokens)
    if chunk_size < min_chunk:
        raise Unservable(f"a {L}-token prefix leaves no room for scoring chunks in inputs of at most "
                         f"{max_input_len} tokens (needs about {L + SCORING_OVERHEAD + min_chunk})")
    chunks = repeat_chunks(context, parts.postfix_ids, lambda s: encode(tokenizer, s), chunk_size,
                           config.carry_tokens, config.repeat_prompt_first, config.repeat_prompt_next)
    for chunk in chunks:
        if L + len(chunk.input_ids) > max_input_len:
            raise Unservable(f"scoring input of {L + len(chunk.input_ids)} tokens exceeds {max_input_len}")
    return ScoringPlan(n_protected, chunks)
