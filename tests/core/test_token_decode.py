# SPDX-License-Identifier: Apache-2.0
"""Decode rows on stores of one-token head pages (SGLang's token pool), every row of a step in one padded
attention per layer (`TokenDecode`), or one store's few rows in one masked call (`EntryDecode`): exactly each
request's softmax over its store's kept pairs and its own tokens, whatever the stores, the buffers their runs
spill into, and the padding."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.paged_store import PagedStore, write_store
from kvzip_plugin.store import place_runs, select_runs
from kvzip_plugin.token_decode import EntryDecode, RunIndexCache, TokenDecode
from tests.core.reference import masked_attention

N_LAYERS, H_KV, D = 3, 2, 8


def _pool_and_stores(g: torch.Generator):
    """SGLang-like per-layer `[slots, H_kv, D]` buffers, three stores in them (`pair` and `layer_budget` with very
    uneven budgets: layers spill into other layers' buffers), and the free slots left."""
    n_slots, L = 400, 24
    pool = [(torch.randn(n_slots, H_KV, D, generator=g), torch.randn(n_slots, H_KV, D, generator=g))
            for _ in range(N_LAYERS)]  # SGLang's per-layer `[slots, H_kv, D]` buffers
    free = list(range(n_slots))
    stores, prefixes = [], []
    # very uneven budgets: a layer keeping more than its share spills into other layers' buffers
    for structure, budgets in (("pair", [0.01, 1.0, 3.0]), ("layer_budget", [1.0, 0.0, 0.2]), ("pair", [1.0] * 3)):
        scores = torch.rand(N_LAYERS, H_KV, L, generator=g) * torch.tensor(budgets).view(-1, 1, 1)
        keep = select_runs(scores, 0, 0.3, structure, 1)
        layout = place_runs(keep.sum(-1), 1)
        src = [free.pop(0) for _ in range(L)]
        dst = [free.pop(0) for _ in range(layout.n_blocks)]
        write_store(keep, layout, src, dst, lambda i: (pool[i][0].unsqueeze(1), pool[i][1].unsqueeze(1)))
        stores.append(PagedStore.build(layout, dst))
        prefixes.append((src, keep))
    assert any(len({gt.buffer for gt in s.layers[layer].gathers}) > 1 for s in stores for layer in range(N_LAYERS))
    return pool, stores, prefixes, free


def _check_rows(step, pool, prefixes, on_store, own, decode_q, q_all, n_tokens, h_q):
    """Every layer: each row's output is its masked attention (float64 reference); other rows are untouched."""

    def flat(buf):
        return pool[buf][0].view(-1, D), pool[buf][1].view(-1, D)

    for layer in range(N_LAYERS):
        out_all = torch.full((n_tokens, h_q, D), 7.0)
        step.attend(layer, q_all, out_all, flat, layer, 0.4)
        k, v = pool[layer]
        for i, s in enumerate(on_store):
            src, keep = prefixes[s]
            want = masked_attention(q_all[decode_q[i]], k[src].transpose(0, 1), v[src].transpose(0, 1), keep[layer],
                                    k[own[i]].transpose(0, 1), v[own[i]].transpose(0, 1), 0.4)
            torch.testing.assert_close(out_all[decode_q[i]].double(), want, rtol=1e-5, atol=1e-5)
        untouched = torch.ones(n_tokens, dtype=torch.bool)
        untouched[decode_q] = False
        assert torch.equal(out_all[untouched], torch.full_like(out_all[untouched], 7.0))
    return flat


@pytest.mark.parametrize("h_q", [2, 6])
def test_rows_on_several_stores_get_their_masked_attention(h_q):
    g = torch.Generator().manual_seed(h_q)
    pool, stores, prefixes, free = _pool_and_stores(g)
    on_store = [0, 2, 1, 0, 2, 2]  # rows: 2 on store 0, 1 on store 1, 3 on store 2
    own_lens = torch.tensor([1, 5, 4, 9, 2, 7])
    own = [[free.pop(0) for _ in range(int(n))] for n in own_lens]
    own_slots = torch.tensor([s + [s[-1]] * (9 - len(s)) for s in own])  # padded with the last
    n_tokens = 11
    decode_q = torch.tensor([3, 0, 10, 7, 5, 1])  # query token of each row in the step
    q_all = torch.randn(n_tokens, h_q, D, generator=g)
    cache = RunIndexCache(H_KV)
    step = TokenDecode.plan([stores[s] for s in on_store], decode_q, own_slots, own_lens, H_KV, cache)
    flat = _check_rows(step, pool, prefixes, on_store, own, decode_q, q_all, n_tokens, h_q)
    # the next step (same rows, one more own token each) reuses every layer's run index
    assert len(cache._entries) == N_LAYERS
    TokenDecode.plan([stores[s] for s in on_store], decode_q, own_slots, own_lens, H_KV, cache).attend(
        0, q_all, torch.zeros(n_tokens, h_q, D), flat, 0, 0.4)
    assert len(cache._entries) == N_LAYERS


@pytest.mark.parametrize("h_q", [2, 6])
@pytest.mark.parametrize("store", [0, 1, 2])
def test_one_stores_few_rows_get_their_masked_attention_in_one_call(store, h_q):
    """`EntryDecode`: the store's runs once (every head, every buffer they spill into) + the rows' own tokens of
    unequal counts, one block-masked call: each row sees only its KV head's run and its own tokens."""
    g = torch.Generator().manual_seed(10 * store + h_q)
    pool, stores, prefixes, free = _pool_and_stores(g)
    own_lens = torch.tensor([1, 6, 3])
    own = [[free.pop(0) for _ in range(int(n))] for n in own_lens]
    own_slots = torch.tensor([s + [s[-1]] * (6 - len(s)) for s in own])
    n_tokens = 5
    decode_q = torch.tensor([4, 0, 2])
    q_all = torch.randn(n_tokens, h_q, D, generator=g)
    for r in (1, 3):  # one row, and three rows of unequal own counts
        step = EntryDecode.plan(stores[store], decode_q[:r], own_slots[:r], own_lens[:r], H_KV, h_q)
        _check_rows(step, pool, prefixes, [store] * r, own[:r], decode_q[:r], q_all, n_tokens, h_q)


def test_pages_of_several_tokens_are_refused():
    keep = torch.ones(1, H_KV, 8, dtype=torch.bool)
    store = PagedStore.build(place_runs(keep.sum(-1), 4), [0, 1, 2, 3][:place_runs(keep.sum(-1), 4).n_blocks])
    with pytest.raises(ValueError, match="one-token pages"):
        TokenDecode.plan([store], torch.tensor([0]), torch.tensor([[9]]), torch.tensor([1]), H_KV,
                         RunIndexCache(H_KV)).attend(0, torch.zeros(1, 2, D), torch.zeros(1, 2, D),
                                                 lambda b: (torch.zeros(99, D), torch.zeros(99, D)), 0, 1.0)
    with pytest.raises(ValueError, match="one-token pages"):
        EntryDecode.plan(store, torch.tensor([0]), torch.tensor([[9]]), torch.tensor([1]), H_KV, 2).attend(
            0, torch.zeros(1, 2, D), torch.zeros(1, 2, D), lambda b: (torch.zeros(99, D), torch.zeros(99, D)), 0, 1.0)
