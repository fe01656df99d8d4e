# SPDX-License-Identifier: Apache-2.0
"""Which path a decode batch on head-page entries takes (`PagedAttention._token_step`): one entry's few decode rows
with few keys to score take `EntryDecode`; a longer entry, many rows, a prefill row or several entries of long runs
take the per-entry pass; several entries of short runs with few rows each take `TokenDecode`. (Each path's
attention is checked against a reference in `tests/core/test_token_decode.py` and through the server in
`test_e2e_kvzip.py`.)"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.integrations.sglang import harness

harness.require_sglang()

from kvzip_plugin.integrations.sglang.attention import (  # noqa: E402
    ENTRY_DECODE_MAX_COLUMNS,
    PagedAttention,
    PagedRow,
)

from kvzip_plugin.paged_store import PagedStore  # noqa: E402
from kvzip_plugin.store import place_runs  # noqa: E402
from kvzip_plugin.token_decode import EntryDecode, TokenDecode  # noqa: E402

H_Q, H_KV, D, N_LAYERS = 9, 3, 8, 2


def _store(run: int, first: int) -> PagedStore:
    layout = place_runs(torch.full((N_LAYERS, H_KV), run), 1)
    return PagedStore.build(layout, list(range(first, first + layout.n_blocks)))


def _plan(groups: list[list[tuple[PagedStore, int, int]]]):
    """`_token_step` of a batch: per entry, its rows as (store, queries, own tokens)."""
    n_slots = 1 + max(s.n_slots + own for g in groups for s, _, own in g)
    req_to_token = torch.arange(len([r for g in groups for r in g]) * n_slots).view(-1, n_slots) % 50_000
    paged = PagedAttention([SimpleNamespace(layer_id=i) for i in range(N_LAYERS)], None, req_to_token, 1)
    rows, at, q = [], 0, 0
    for g in groups:
        rows.append([])
        for store, n_q, own in g:
            rows[-1].append(PagedRow(store, at, q, n_q, store.n_slots + own))
            at, q = at + 1, q + n_q
    paged._step = False
    buf = torch.zeros(50_000, H_KV, D)
    return paged._token_step(rows, buf, buf, H_Q)


def test_one_entrys_few_decode_rows_take_the_masked_call_while_their_keys_are_few():
    short = _store(600, 0)  # 1,800 kept pairs per layer: 1,800 + 3 x 3 x 20 keys per row
    assert isinstance(_plan([[(short, 1, 20)] * 3]), EntryDecode)
    assert isinstance(_plan([[(short, 1, 20)] * 5]), EntryDecode)
    assert _plan([[(short, 1, 20)] * 6]) is None  # 6 x 3 = 18 query rows per KV head > 16: per-entry pass
    assert _plan([[(short, 1, 20), (short, 4, 20)]]) is None  # a prefill row shares the pass
    own = (ENTRY_DECODE_MAX_COLUMNS - 3 * 600) // H_KV  # one row's own tokens up to the bound
    assert isinstance(_plan([[(short, 1, own)]]), EntryDecode)
    assert _plan([[(short, 1, own + 1)]]) is None
    long = _store(1100, 0)  # 3,300 kept pairs per layer: over the bound with any row
    assert _plan([[(long, 1, 1)]]) is None


def test_several_entries_take_the_padded_one_pass_only_with_short_runs():
    a, b = _store(300, 0), _store(300, 1000)
    assert isinstance(_plan([[(a, 1, 5)], [(b, 1, 7)]]), TokenDecode)
    c, d = _store(1100, 0), _store(1100, 2000)  # runs over ONE_PASS_MAX_RUN
    assert _plan([[(c, 1, 5)], [(d, 1, 7)]]) is None
