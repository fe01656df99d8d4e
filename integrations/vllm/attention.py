# SPDX-License-Identifier: Apache-2.0
"""Attention of vLLM requests whose compacted prefix lies in head pages (`pair`, `layer_budget`).

vLLM's kernels read one token count per request over whole blocks, so they cannot read runs of
different lengths per KV head. For those requests the worker's `impl.forward` wrapper runs after
vLLM's own forward (which has written this step's keys and values into the request's own blocks
and computed something for these rows that is discarded: the runner adapter lowered their
`seq_lens` to their own tokens, so that pass is short) and overwrites their output rows with

    softmax over [every KV head's run of the prefix] + [the request's own tokens, causal],

computed as two parts merged by log-sum-exp (`kvzip_plugin.prefix_attention`). The prefix part is
one pass per store and layer for all of the step's requests on it. Other requests keep vLLM's kernel
untouched. Positions are never needed: keys carry their RoPE rotation.

Block table row of such a request: `[store blocks (n_blocks)] + [its own blocks]`; its own tokens
start at slot `n_blocks * block_size` (the slot offset `L - n_blocks * block_size` of `runner.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from kvzip_plugin.integrations.vllm import layout
from kvzip_plugin.integrations.vllm.store import PagedStore, Views

from kvzip_plugin.prefix_attention import causal_attention, merge, run_attention


def attend_paged(layer: int, query: torch.Tensor, output: torch.Tensor, rows: Mapping[str, tuple[int, PagedStore]],
                 views: Views, own_views: tuple[torch.Tensor, torch.Tensor], meta, num_heads: int, head_size: int,
                 scale: float) -> None:
    """Overwrite the output rows of requests on head-page stores, for one layer.

    Args:
        layer: index of the layer (row of each store's layout).
        query: `[num_tokens, H_q, D]` (or flat) post-RoPE queries of the step.
        output: the attention output vLLM's forward filled, `[num_tokens, H_q * D]` (or 3-D); written in place.
        rows: request id -> (row in the batch, its store).
        views: token-major views of every layer's buffer (the store's pages may lie in any of them).
        own_views: this layer's (keys, values) token-major views (the requests' own tokens).
        meta: vLLM's attention metadata (`query_start_loc`, `seq_lens` = own tokens, `block_table`).
    """
    q_all = query.view(query.shape[0], num_heads, head_size)
    out_all = output.view(output.shape[0], num_heads, head_size)
    by_store: dict[int, list[tuple[int, PagedStore]]] = {}
    for row, store in rows.values():
        by_store.setdefault(id(store), []).append((row, store))
    for group in by_store.values():
        store = group[0][1]
        keys, values, lengths = store.read_runs(layer, views)
        spans = [(int(meta.query_start_loc[row]), int(meta.query_start_loc[row + 1])) for row, _ in group]
        q = torch.cat([q_all[qs:qe] for qs, qe in spans])  # every request of the step on this prefix
        out_p, lse_p = run_attention(q, keys, values, lengths, scale)
        start = 0
        for (row, _), (qs, qe) in zip(group, spans, strict=True):
            n = qe - qs
            n_own = int(meta.seq_lens[row])
            first = store.layout.n_blocks
            table = meta.block_table[row][first:]
            own_k = layout.read_tokens(own_views[0], table, n_own)  # [H_kv, n_own, D]
            own_v = layout.read_tokens(own_views[1], table, n_own)
            out_o, lse_o = causal_attention(q_all[qs:qe], own_k, own_v, scale)
            merged = merge(out_p[start:start + n], lse_p[start:start + n], out_o, lse_o)
            out_all[qs:qe] = merged.to(out_all.dtype)
            start += n
