# SPDX-License-Identifier: Apache-2.0
"""SGLang's decode rows on one-token head pages: `token_decode`'s one pass for every row of a step against the
per-entry pass (`prefix_attention.attend_rows` over copied runs), and for one entry its masked call
(`EntryDecode`), one layer, torch on CPU, SmolLM2 shapes (9 query / 3 KV heads, head_dim 64), `pair` 0.3 over
synthetic uneven scores, 48 own tokens per request. All give the same attention (checked); prints ms per layer
(median of 10).

    PYTHONPATH=. python benchmarks/bench_token_decode.py
"""

from __future__ import annotations

import time

import torch

from kvzip_plugin.paged_store import PagedStore
from kvzip_plugin.prefix_attention import OwnTokens, attend_rows
from kvzip_plugin.store import place_runs, select_runs
from kvzip_plugin.token_decode import EntryDecode, RunIndexCache, TokenDecode

H_Q, H_KV, D, OWN = 9, 3, 64, 48


def _ms(fn, n: int = 10) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[n // 2]


def cell(length: int, n_entries: int, per_entry: int) -> tuple[float, float, float | None]:
    """(per-entry ms, one-pass ms, masked-call ms or None for several entries) for `n_entries` entries of `length`
    tokens with `per_entry` requests each."""
    stores, at = [], 0
    for _ in range(n_entries):
        spread = torch.logspace(-2, 1, H_KV).view(H_KV, 1)[torch.randperm(H_KV)]
        keep = select_runs((torch.rand(1, H_KV, length) * spread).float(), 0, 0.3, "pair", 1)[0]
        layout = place_runs(keep.sum(-1).view(1, H_KV), 1)
        stores.append(PagedStore.build(layout, list(range(at, at + layout.n_blocks))))
        at += layout.n_blocks
    r = n_entries * per_entry
    buf_k, buf_v = torch.randn(at + r * OWN, 1, H_KV, D), torch.randn(at + r * OWN, 1, H_KV, D)
    q = torch.randn(r, H_Q, D)
    own_slots = at + torch.arange(r * OWN).view(r, OWN)
    own_lens = torch.full((r,), OWN)
    scale = D ** -0.5

    def per_entry_pass() -> torch.Tensor:
        out = torch.empty_like(q)
        for s, store in enumerate(stores):
            rows = torch.arange(s * per_entry, (s + 1) * per_entry)
            slots = own_slots[rows]
            own = OwnTokens.of(buf_k.view(-1, H_KV, D)[slots].transpose(1, 2),
                               buf_v.view(-1, H_KV, D)[slots].transpose(1, 2), own_lens[rows])
            attend_rows(q, out, store.read_runs(0, lambda _: (buf_k, buf_v)), scale, rows, own, [])
        return out

    step = TokenDecode.plan([stores[i // per_entry] for i in range(r)], torch.arange(r), own_slots, own_lens, H_KV,
                            RunIndexCache(H_KV))

    def one_pass() -> torch.Tensor:
        out = torch.empty_like(q)
        step.attend(0, q, out, lambda _: (buf_k.view(-1, D), buf_v.view(-1, D)), 0, scale)
        return out

    torch.testing.assert_close(one_pass(), per_entry_pass(), rtol=1e-4, atol=1e-4)
    masked = None
    if n_entries == 1:
        entry = EntryDecode.plan(stores[0], torch.arange(r), own_slots, own_lens, H_KV, H_Q)

        def masked_call() -> torch.Tensor:
            out = torch.empty_like(q)
            entry.attend(0, q, out, lambda _: (buf_k.view(-1, D), buf_v.view(-1, D)), 0, scale)
            return out

        torch.testing.assert_close(masked_call(), per_entry_pass(), rtol=1e-4, atol=1e-4)
        masked = _ms(masked_call)
    return _ms(per_entry_pass), _ms(one_pass), masked


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per layer")
    for length in (512, 2048, 8192):
        for n_entries, per_entry in ((1, 1), (1, 2), (1, 5), (1, 8), (1, 32), (4, 1), (4, 2), (2, 4)):
            a, b, c = cell(length, n_entries, per_entry)
            print(f"L={length} {n_entries} entries x {per_entry} requests: per-entry {a:.3f}, one pass {b:.3f}"
                  + ("" if c is None else f", masked call {c:.3f}"), flush=True)


if __name__ == "__main__":
    main()
