# SPDX-License-Identifier: Apache-2.0
"""Repeat-prompt chunking: spans partition the context; chunk inputs follow the documented layout."""

from __future__ import annotations

import pytest

from kvzip_plugin.scoring.reconstruction import RepeatChunk, chunk_spans, repeat_chunks

PROMPT_FIRST = "First:"
PROMPT_NEXT = "Next, starting with"
POSTFIX = (900, 901, 902)


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def context(n: int) -> list[int]:
    # ids disjoint from the ASCII prompt ids and the postfix
    return list(range(1000, 1000 + n))


@pytest.mark.parametrize(
    ("n", "size"),
    [(12, 4), (12, 1), (12, 12), (13, 4), (10, 3), (7, 6), (5, 8), (1, 1), (1, 100)],
)
def test_chunk_spans_partition(n, size):
    spans = chunk_spans(n, size)
    covered = [i for start, end in spans for i in range(start, end)]
    assert covered == list(range(n))  # covers [0, n) in order, no overlap, no gap
    assert all(0 < end - start <= size for start, end in spans)
    assert all(end - start == size for start, end in spans[:-1])  # only the last may be short
    assert len(spans) == -(-n // size)


def test_chunk_spans_examples():
    assert chunk_spans(12, 4) == [(0, 4), (4, 8), (8, 12)]
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_spans(5, 8) == [(0, 5)]
    assert chunk_spans(0, 4) == []


@pytest.mark.parametrize("size", [0, -1])
def test_chunk_spans_rejects_non_positive_size(size):
    with pytest.raises(ValueError):
        chunk_spans(10, size)


def build(n: int, chunk_size: int, carry: int) -> tuple[list[int], list[RepeatChunk]]:
    ctx = context(n)
    chunks = repeat_chunks(ctx, POSTFIX, encode, chunk_size, carry, PROMPT_FIRST, PROMPT_NEXT)
    return ctx, chunks


@pytest.mark.parametrize(("n", "chunk_size", "carry"), [(10, 4, 2), (12, 4, 3), (9, 3, 8), (20, 6, 0), (5, 8, 4)])
def test_repeat_chunks_layout(n, chunk_size, carry):
    ctx, chunks = build(n, chunk_size, carry)
    spans = chunk_spans(n, chunk_size)
    assert [(c.start, c.end) for c in chunks] == spans
    assert [c.index for c in chunks] == list(range(len(spans)))
    for t, chunk in enumerate(chunks):
        assert isinstance(chunk.input_ids, tuple)
        start, end = chunk.start, chunk.end
        if t == 0:
            expected = encode(PROMPT_FIRST) + list(POSTFIX) + ctx[0:end]
        else:
            expected = encode(PROMPT_NEXT) + ctx[max(0, start - carry):start] + list(POSTFIX) + ctx[start:end]
        assert list(chunk.input_ids) == expected


def test_repeat_chunks_explicit_example():
    ctx, chunks = build(7, 3, 2)
    first, nxt = encode(PROMPT_FIRST), encode(PROMPT_NEXT)
    post = list(POSTFIX)
    assert len(chunks) == 3
    assert list(chunks[0].input_ids) == first + post + [1000, 1001, 1002]
    assert list(chunks[1].input_ids) == nxt + [1001, 1002] + post + [1003, 1004, 1005]
    assert list(chunks[2].input_ids) == nxt + [1004, 1005] + post + [1006]
    # the chunk's own context is always the tail of its input
    for chunk in chunks:
        m = chunk.end - chunk.start
        assert list(chunk.input_ids[-m:]) == ctx[chunk.start:chunk.end]


def test_carry_zero_gives_no_carried_ids():
    _, chunks = build(9, 3, 0)
    for chunk in chunks[1:]:
        assert list(chunk.input_ids) == encode(PROMPT_NEXT) + list(POSTFIX) + context(9)[chunk.start:chunk.end]
        assert len(chunk.input_ids) == len(PROMPT_NEXT) + len(POSTFIX) + (chunk.end - chunk.start)


def test_carry_larger_than_previous_chunk_clipped_at_context_start():
    ctx, chunks = build(9, 3, 5)
    nxt, post = encode(PROMPT_NEXT), list(POSTFIX)
    # chunk 1 starts at 3: only 3 ids exist before it
    assert list(chunks[1].input_ids) == nxt + ctx[0:3] + post + ctx[3:6]
    # chunk 2 starts at 6: the carry reaches back into chunk 0 (5 ids)
    assert list(chunks[2].input_ids) == nxt + ctx[1:6] + post + ctx[6:9]


def test_single_chunk_uses_first_prompt_only():
    ctx, chunks = build(5, 100, 8)
    assert len(chunks) == 1
    assert chunks[0].input_ids == tuple(encode(PROMPT_FIRST) + list(POSTFIX) + ctx)


def test_empty_context_gives_no_chunks():
    assert repeat_chunks([], POSTFIX, encode, 4, 2, PROMPT_FIRST, PROMPT_NEXT) == []
