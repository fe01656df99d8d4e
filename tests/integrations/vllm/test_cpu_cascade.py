# SPDX-License-Identifier: Apache-2.0
"""The cascade on vLLM's CPU backend (`cpu_cascade.py`): a store's many decode rows read each run once, every
other row keeps vLLM's kernel, and every row gets exactly the softmax over its prefix's kept pairs and its
own tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.integrations.vllm import attention, cpu_cascade  # noqa: E402
from kvzip_plugin.integrations.vllm.cpu_cascade import CASCADE_MIN_ROWS, CASCADE_MIN_RUN, takes_cascade  # noqa: E402
from kvzip_plugin.integrations.vllm.cpu_kernel import FlatPages  # noqa: E402

from tests.integrations.vllm.test_cpu_kernel import BS, LAYERS, D, G, H, _pool, _reference, _store  # noqa: E402

NB = 96


@pytest.mark.parametrize("structure,interleaved", [("pair", False), ("layer_budget", False), ("pair", True)])
def test_decode_rows_of_a_store_with_many_of_them_take_the_cascade(structure, interleaved, monkeypatch):
    """The decode rows of a store with enough of them take the cascade, every other row (the store's prefill row,
    another store's lone decode row) vLLM's kernel; the rows of the step in any order. (The test's runs are
    short: the run-length bound is lowered to let them take it.)"""
    caches, views, g = _pool(3 if structure == "pair" else 4, NB)
    flat = FlatPages.of(caches, H, BS, D)
    store_a, keep_a = _store(views, g, list(range(0, 6)), list(range(20, 30)), structure)
    store_b, keep_b = _store(views, g, list(range(6, 10)), list(range(30, 40)), structure)
    n_many = -(-CASCADE_MIN_ROWS // G)  # decode rows on store A: enough for the cascade
    assert takes_cascade(n_many, G, CASCADE_MIN_RUN) and not takes_cascade(n_many - 1, G, CASCADE_MIN_RUN)
    assert not takes_cascade(n_many, G, CASCADE_MIN_RUN - 1)  # short runs: the kernel reads them from cache
    free = iter(range(40, NB))
    rows = []  # (store, keep, src, own blocks, own tokens, queries this step)
    for i in range(n_many):
        n_own = [1, 33, 70, 5][i % 4]  # own tokens crossing block boundaries, padded to the longest
        rows.append((store_a, keep_a, list(range(0, 6)), [next(free) for _ in range(-(-n_own // BS))], n_own, 1))
    rows.append((store_a, keep_a, list(range(0, 6)), [next(free), next(free)], 50, 7))  # prefill: the kernel
    lone = (store_b, keep_b, list(range(6, 10)), [next(free)], 5, 1)  # a lone decode row: the kernel
    rows.insert(2, lone) if interleaved else rows.append(lone)
    spans, at = [], 3  # the step's first 3 tokens belong to a request not on a store
    for *_, n_q in rows:
        spans.append((at, at + n_q))
        at += n_q
    block_table = torch.full((len(rows) + 1, 16), 10_000, dtype=torch.int32)
    paged_rows, seq_lens = {}, [3]
    for i, (store, _, _, own, n_own, _) in enumerate(rows):
        first = store.layout.n_blocks
        block_table[i + 1, :first + len(own)] = torch.tensor([0] * first + own)
        paged_rows[f"r{i}"] = (i + 1, store)
        seq_lens.append(n_own)
    meta = SimpleNamespace(query_start_loc=torch.tensor([0, 3] + [qe for _, qe in spans], dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=block_table)
    assert not attention.plan_step(paged_rows, meta, None, H * G, flat).cascade  # short runs: all in the kernel
    monkeypatch.setattr(cpu_cascade, "CASCADE_MIN_RUN", 0)
    plan = attention.plan_step(paged_rows, meta, None, H * G, flat)
    assert len(plan.cascade) == 1 and plan.kernel is not None and not plan.groups
    casc = plan.cascade[0]
    a_decode = [qs for (store, *_, n_q), (qs, _) in zip(rows, spans, strict=True) if store is store_a and n_q == 1]
    if interleaved:
        assert casc.tokens.tolist() == a_decode
    else:
        assert casc.tokens == slice(a_decode[0], a_decode[-1] + 1)
    q_all = torch.randn(at, H * G, D, generator=g)
    for layer in range(LAYERS):
        out_all = torch.full((at, H * G, D), 7.0)
        attention.attend_paged(layer, q_all.view(at, -1), out_all.view(at, -1), plan, None, None, None, meta, H * G,
                               D, D ** -0.5, flat)
        assert bool((out_all[:3] == 7.0).all())  # the request not on a store keeps the engine's output
        for (_, keep, src, own, n_own, _), (qs, qe) in zip(rows, spans, strict=True):
            want = _reference(q_all[qs:qe], views, layer, keep, src, own, n_own)
            torch.testing.assert_close(out_all[qs:qe].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,want", [("always", [True, True, True]), ("never", [False, False, False]),
                                       ("auto", [False, True, False])])
def test_kvzip_cpu_cascade_forces_either_path(mode, want, monkeypatch):
    monkeypatch.setenv("KVZIP_CPU_CASCADE", mode)
    cells = [(1, G, 100.0), (CASCADE_MIN_ROWS, 1, CASCADE_MIN_RUN), (CASCADE_MIN_ROWS, 1, CASCADE_MIN_RUN - 1)]
    assert [takes_cascade(*c) for c in cells] == want
    assert not takes_cascade(0, G, CASCADE_MIN_RUN)  # no decode row: nothing to take
    monkeypatch.setenv("KVZIP_CPU_CASCADE", "sometimes")
    with pytest.raises(ValueError, match="KVZIP_CPU_CASCADE"):
        takes_cascade(1, G, 100.0)
