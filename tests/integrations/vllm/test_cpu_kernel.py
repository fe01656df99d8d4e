# SPDX-License-Identifier: Apache-2.0
"""Head-page stores read in place by vLLM's own CPU attention kernel (`cpu_kernel.py`): every row on a
compacted prefix (decode and prefill, several stores in one call) gets exactly the softmax over its
prefix's kept pairs and its own tokens, causal; the pool must be one allocation a constant stride apart."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.integrations.vllm import layout  # noqa: E402
from kvzip_plugin.integrations.vllm.cpu_kernel import FlatPages, KernelStep, row_tables  # noqa: E402

from kvzip_plugin.paged_store import PagedStore, write_store  # noqa: E402
from kvzip_plugin.store import place_runs, select_runs  # noqa: E402

LAYERS, NB, H, BS, D, G = 4, 48, 2, 32, 64, 3


def _pool(seed: int, nb: int = NB):
    g = torch.Generator().manual_seed(seed)
    raw = torch.zeros(LAYERS, nb, H, BS, 2 * D)  # one allocation, layer after layer (vLLM CPU)
    caches = [raw[i] for i in range(LAYERS)]
    spec = layout.LayoutSpec("cpu_vec", BS, H, D)
    views = [layout.token_major(c, spec) for c in caches]
    for k, v in views:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return caches, views, g


def _store(views, g, src: list[int], dst: list[int], structure: str):
    L = len(src) * BS
    uneven = torch.tensor([0.02, 1.0, 0.1, 4.0]).view(-1, 1, 1)  # budgets very uneven by layer: pages overflow
    keep = select_runs(torch.rand(LAYERS, H, L - 2, generator=g) * uneven, 2, 0.3, structure, BS)  # 2 protected
    lay = place_runs(keep.sum(-1), BS)
    write_store(keep, lay, src, dst[:lay.n_blocks], lambda i: views[i])
    return PagedStore.build(lay, dst[:lay.n_blocks]), keep


def _reference(q, views, layer, keep, src, own_blocks, n_own):
    """q `[n, H*G, D]` (the last n of the row's own tokens) over kept prefix pairs + own tokens, float64."""
    k_view, v_view = views[layer]
    n = q.shape[0]
    out = torch.zeros(n, H * G, D, dtype=torch.float64)
    for h in range(H):
        pk = k_view[src].reshape(-1, H, D)[:, h][keep[layer, h]]
        pv = v_view[src].reshape(-1, H, D)[:, h][keep[layer, h]]
        ok = k_view[own_blocks].reshape(-1, H, D)[:n_own, h]
        ov = v_view[own_blocks].reshape(-1, H, D)[:n_own, h]
        keys, values = torch.cat([pk, ok]).double(), torch.cat([pv, ov]).double()
        for i in range(n):
            visible = pk.shape[0] + n_own - n + i + 1  # causal among the own tokens
            s = q[i, h * G:(h + 1) * G].double() @ keys[:visible].T * D ** -0.5
            out[i, h * G:(h + 1) * G] = torch.softmax(s, -1) @ values[:visible]
    return out


@pytest.mark.parametrize("structure", ["pair", "layer_budget"])
def test_rows_on_two_stores_attend_exactly_through_vllms_cpu_kernel(structure):
    caches, views, g = _pool(1 if structure == "pair" else 2)
    flat = FlatPages.of(caches, H, BS, D)
    assert flat is not None and flat.pages_per_layer == NB * H
    store_a, keep_a = _store(views, g, list(range(0, 6)), list(range(20, 30)), structure)
    store_b, keep_b = _store(views, g, list(range(6, 10)), list(range(30, 40)), structure)
    assert any(len(lr.gathers) > 1 for lr in store_a.layers)  # some layer's run pages lie in other layers' buffers
    # rows: (store, keep, src, own blocks, own tokens, queries this step): decode rows and one prefill row
    rows = [(store_a, keep_a, list(range(0, 6)), [40, 41], 37, 1),
            (store_b, keep_b, list(range(6, 10)), [42], 5, 1),
            (store_a, keep_a, list(range(0, 6)), [43, 44], 50, 7),
            (store_b, keep_b, list(range(6, 10)), [45], 1, 1)]
    _check_step(rows, flat, views, g)


def _check_step(rows, flat, views, g):
    """Plan one step of `rows` (`(store, keep, src, own blocks, own tokens, queries)`) and check every layer's
    output rows against the reference."""
    spans, at = [], 3  # the step's first 3 tokens belong to requests not on a store
    for *_, n_q in rows:
        spans.append((at, at + n_q))
        at += n_q
    # the step's block table: a row not on a store first, then each row's store blocks, its own blocks and
    # unused columns (never read)
    block_table = torch.full((len(rows) + 1, 12), 10_000, dtype=torch.int32)
    groups = {}
    for i, ((store, _, _, own, n_own, _), (qs, qe)) in enumerate(zip(rows, spans, strict=True)):
        first = store.layout.n_blocks
        block_table[i + 1, :first + len(own)] = torch.tensor([0] * first + own)
        groups.setdefault(id(store), (store, []))[1].append((qs, qe, n_own, i + 1))
    step = KernelStep.plan(list(groups.values()), block_table, flat, torch.device("cpu"))
    assert step is not None
    q_all = torch.randn(at, H * G, D, generator=g)
    for layer in range(LAYERS):
        out_all = torch.full((at, H * G, D), 7.0)
        step.attend(layer, q_all, out_all, flat, D ** -0.5)
        assert bool((out_all[:3] == 7.0).all())  # rows not on a store keep the engine's output
        for (_, keep, src, own, n_own, _), (qs, qe) in zip(rows, spans, strict=True):
            want = _reference(q_all[qs:qe], views, layer, keep, src, own, n_own)
            torch.testing.assert_close(out_all[qs:qe].double(), want, rtol=1e-4, atol=1e-4)


def test_a_stores_kept_tables_serve_later_steps_with_more_rows_fewer_rows_and_more_own_blocks():
    """The run part of the tables is kept on the store between steps (`RowTables`) and only the own pages are
    written per step: steps that grow it (more rows, more own blocks) and shrink back (fewer rows, own pages of
    an earlier step left past a row's end) stay exact, and the kept buffer is reused once large enough."""
    caches, views, g = _pool(5)
    flat = FlatPages.of(caches, H, BS, D)
    store, keep = _store(views, g, list(range(0, 6)), list(range(20, 30)), "pair")
    src = list(range(0, 6))
    steps = [[(store, keep, src, [40], 3, 1), (store, keep, src, [41], 9, 1)],
             [(store, keep, src, [30 + 2 * i, 31 + 2 * i], 33 + i, 1) for i in range(5)],  # grows
             [(store, keep, src, [44], 1, 1)],  # one row, fewer own blocks: stale columns are past its end
             [(store, keep, src, [45, 46], 40, 1), (store, keep, src, [47], 5, 2)]]
    buffers = []
    for rows in steps:
        _check_step(rows, flat, views, g)
        buffers.append(row_tables(store, flat, torch.device("cpu")).table)
    assert buffers[1] is not buffers[0] and buffers[2] is buffers[1] and buffers[3] is buffers[1]


def test_pools_that_are_not_one_allocation_keep_the_torch_path():
    separate = [torch.zeros(NB, H, BS, 2 * D) for _ in range(LAYERS)]
    assert FlatPages.of(separate, H, BS, D) is None
    raw = torch.zeros(LAYERS, NB, H, BS, 2 * D)
    assert FlatPages.of([raw[0], raw[2], raw[1], raw[3]], H, BS, D) is None  # not a constant stride
    assert FlatPages.of([raw[i] for i in range(LAYERS)], H, BS, D) is not None
