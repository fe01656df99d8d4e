# SPDX-License-Identifier: Apache-2.0
"""A store written into an engine-like pool (`write_store`) and read back each step (`PagedStore.read_runs`)
gives every layer the attention of the full prefix masked to the kept pairs, for pages of several tokens
(vLLM's blocks, read page by page or as copied runs) and of one token (SGLang's slots)."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.paged_store import PagedStore, page_rows, write_store
from kvzip_plugin.prefix_attention import PageRuns, SegmentRuns
from kvzip_plugin.store import place_runs, select_runs


def _reference(q, keys, values, keep, scale):
    """q `[n, H_q, D]` over keys/values `[H_kv, L, D]` masked to keep `[H_kv, L]`: out, lse (float64)."""
    n, h_q, _ = q.shape
    g = h_q // keys.shape[0]
    out = torch.zeros(n, h_q, keys.shape[-1], dtype=torch.float64)
    lse = torch.full((n, h_q), float("-inf"), dtype=torch.float64)
    for j in range(h_q):
        k, v = keys[j // g][keep[j // g]].double(), values[j // g][keep[j // g]].double()
        if k.shape[0]:
            s = q[:, j].double() @ k.T * scale
            out[:, j], lse[:, j] = torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    return out, lse


@pytest.mark.parametrize("page_size,structure", [(4, "pair"), (4, "layer_budget"), (1, "pair")])
@pytest.mark.parametrize("n", [1, 9])
def test_written_store_reads_back_the_masked_prefix(page_size, structure, n):
    g = torch.Generator().manual_seed(page_size * 100 + n)
    n_layers, h_kv, h_q, d, L, n_blocks = 4, 2, 4, 8, 32, 64
    scale_by_layer = torch.tensor([0.01, 1.0, 0.05, 3.0]).view(-1, 1, 1)  # very uneven budgets
    scores = torch.rand(n_layers, h_kv, L, generator=g) * scale_by_layer
    keep = select_runs(scores, 0, 0.3, structure, page_size)
    layout = place_runs(keep.sum(-1), page_size)
    # an engine pool: per layer token-major [n_blocks, page, H_kv, D] keys and values, filled with finite noise
    pool = [(torch.randn(n_blocks, page_size, h_kv, d, generator=g), torch.randn(n_blocks, page_size, h_kv, d,
                                                                                 generator=g))
            for _ in range(n_layers)]
    prefix_blocks = list(range(L // page_size))
    prefix = [(k[prefix_blocks].reshape(L, h_kv, d).transpose(0, 1).clone(),
               v[prefix_blocks].reshape(L, h_kv, d).transpose(0, 1).clone()) for k, v in pool]  # [H_kv, L, D]
    dst = list(range(n_blocks - layout.n_blocks, n_blocks))
    write_store(keep, layout, prefix_blocks, dst, lambda i: pool[i])
    store = PagedStore.build(layout, dst)
    assert any(len(lr.gathers) > 1 for lr in store.layers) or page_size == 1  # some layer spans buffers
    q = torch.randn(n, h_q, d, generator=g)
    for layer in range(n_layers):
        runs = store.read_runs(layer, lambda i: pool[i])
        assert isinstance(runs, PageRuns if page_size > 1 or not store.layers[layer].gathers else SegmentRuns)
        if page_size > 1:  # a layer whose pages lie in several buffers is attended as one chunk (one set of ops)
            assert len(runs.chunks) == min(1, len(store.layers[layer].gathers))
        out, lse = runs.attention(q, 0.5)
        want_out, want_lse = _reference(q, *prefix[layer], keep[layer], 0.5)
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_read_runs_uses_the_engines_page_reader():
    """An engine's own page read (vLLM CPU: one row gather per head page) replaces the views' indexing."""
    g = torch.Generator().manual_seed(0)
    keep = select_runs(torch.rand(2, 2, 16, generator=g), 0, 0.5, "pair", 4)
    layout = place_runs(keep.sum(-1), 4)
    pool = [(torch.randn(8, 4, 2, 8, generator=g), torch.randn(8, 4, 2, 8, generator=g)) for _ in range(2)]
    store = PagedStore.build(layout, list(range(8 - layout.n_blocks, 8)))
    calls = []

    def reader(buf, blocks, slots):
        calls.append(buf)
        return pool[buf][0][blocks, :, slots], pool[buf][1][blocks, :, slots]

    q = torch.randn(1, 4, 8, generator=g)
    a = store.read_runs(0, lambda i: pool[i], reader).attention(q, 0.3)
    b = store.read_runs(0, lambda i: pool[i]).attention(q, 0.3)
    assert calls
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("page_size,contiguous", [(1, True), (1, False), (4, True)])
def test_page_rows_reads_the_same_pages_as_indexing(page_size, contiguous):
    """The fast read (one index_select of the flat buffer, pages of one token) and the general one give the
    same `[P, page_size, D]` pages, in the order asked, repeats included."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(50, page_size, 3, 8, generator=g)
    if not contiguous:  # e.g. keys and values interleaved in one allocation
        buf = torch.randn(50, page_size, 3, 16, generator=g)[..., ::2]
    blocks = torch.tensor([7, 0, 49, 7, 12])
    slots = torch.tensor([2, 0, 1, 2, 1])
    got = page_rows(buf, blocks, slots)
    assert got.shape == (5, page_size, 8)
    for i in range(5):
        assert torch.equal(got[i], buf[blocks[i], :, slots[i]])
