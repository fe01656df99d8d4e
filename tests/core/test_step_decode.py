# SPDX-License-Identifier: Apache-2.0
"""The decode rows of a step on several head-page stores, attended in one pass per layer (`DecodeStep`),
get exactly each request's softmax over its store's kept pairs and its own tokens."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.paged_store import PagedStore, write_store
from kvzip_plugin.step_decode import DecodeStep, PrefixPageCache
from kvzip_plugin.store import place_runs, select_runs
from tests.core.reference import masked_attention

N_LAYERS, H_KV, D, PAGE = 3, 2, 8, 4


def _pool(g: torch.Generator, n_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An engine pool: per layer token-major `[n_blocks, page, H_kv, D]` keys and values of finite noise."""
    return [(torch.randn(n_blocks, PAGE, H_KV, D, generator=g), torch.randn(n_blocks, PAGE, H_KV, D, generator=g))
            for _ in range(N_LAYERS)]


@pytest.mark.parametrize("h_q", [2, 6])
def test_rows_on_several_stores_get_their_masked_attention(h_q):
    g = torch.Generator().manual_seed(h_q)
    n_blocks, L = 96, 24
    pool = _pool(g, n_blocks)
    free = list(range(n_blocks))
    stores, prefixes = [], []
    for structure, budgets in (("pair", [0.01, 1.0, 3.0]), ("layer_budget", [1.0, 0.0, 0.2]), ("pair", [1.0] * 3)):
        scores = torch.rand(N_LAYERS, H_KV, L, generator=g) * torch.tensor(budgets).view(-1, 1, 1)
        keep = select_runs(scores, 0, 0.3, structure, PAGE)
        layout = place_runs(keep.sum(-1), PAGE)
        src = [free.pop(0) for _ in range(L // PAGE)]
        dst = [free.pop(0) for _ in range(layout.n_blocks)]
        write_store(keep, layout, src, dst, lambda i: pool[i])
        stores.append(PagedStore.build(layout, dst))
        prefixes.append((src, keep))
    # rows: 2 on store 0, 1 on store 1, 3 on store 2; own lengths cross page boundaries
    on_store = [0, 2, 1, 0, 2, 2]
    own_lens = torch.tensor([1, 5, 4, 9, 2, 7])
    own_blocks = torch.tensor([[free.pop(0) for _ in range(3)] for _ in on_store])
    n_tokens = 11
    decode_q = torch.tensor([3, 0, 10, 7, 5, 1])  # query token of each row in the step
    q_all = torch.randn(n_tokens, h_q, D, generator=g)
    cache = PrefixPageCache()
    rows_of = [[i for i, s in enumerate(on_store) if s == k] for k in range(3)]
    step = DecodeStep.plan(stores, rows_of, decode_q, own_lens, own_blocks, H_KV, PAGE, cache)

    def pages(buf, blocks, slots):
        return pool[buf][0][blocks, :, slots], pool[buf][1][blocks, :, slots]

    for layer in range(N_LAYERS):
        out_all = torch.full((n_tokens, h_q, D), 7.0)
        step.attend(layer, q_all, out_all, pages, 0.4)
        for i, s in enumerate(on_store):
            src, keep = prefixes[s]
            k, v = pool[layer]
            pre_k = k[src].reshape(-1, H_KV, D).transpose(0, 1)
            pre_v = v[src].reshape(-1, H_KV, D).transpose(0, 1)
            own_k = k[own_blocks[i]].reshape(-1, H_KV, D)[:own_lens[i]].transpose(0, 1)
            own_v = v[own_blocks[i]].reshape(-1, H_KV, D)[:own_lens[i]].transpose(0, 1)
            want = masked_attention(q_all[decode_q[i]], pre_k, pre_v, keep[layer], own_k, own_v, 0.4)
            torch.testing.assert_close(out_all[decode_q[i]].double(), want, rtol=1e-5, atol=1e-5)
        untouched = torch.ones(n_tokens, dtype=torch.bool)
        untouched[decode_q] = False
        assert bool((out_all[untouched] == 7.0).all())  # other rows keep the engine's output
    assert len(cache._entries) == N_LAYERS
    again = DecodeStep.plan(stores, rows_of, decode_q, own_lens, own_blocks, H_KV, PAGE, cache)
    again.attend(0, q_all, torch.zeros(n_tokens, h_q, D), pages, 0.4)
    assert len(cache._entries) == N_LAYERS  # the next step on the same stores reuses the listed pages


def test_cache_never_mistakes_a_new_store_for_a_dropped_one():
    g = torch.Generator().manual_seed(0)
    keep = select_runs(torch.rand(N_LAYERS, H_KV, 8, generator=g), 0, 0.5, "pair", PAGE)
    layout = place_runs(keep.sum(-1), PAGE)
    a = PagedStore.build(layout, list(range(layout.n_blocks)))
    b = PagedStore.build(layout, list(range(10, 10 + layout.n_blocks)))
    cache = PrefixPageCache(size=2)
    first = cache.get((a,), 0, torch.device("cpu"))
    cache._entries[((id(b),), 0, torch.device("cpu"))] = cache._entries.pop(((id(a),), 0, torch.device("cpu")))
    got = cache.get((b,), 0, torch.device("cpu"))  # same key, other store: listed afresh
    assert got is not first and bool((got.reads[0][1] >= 10).all())
    for layer in range(1, N_LAYERS):
        cache.get((a,), layer, torch.device("cpu"))
    assert len(cache._entries) == 2  # bounded
