# SPDX-License-Identifier: Apache-2.0
"""The extend attention of KVzip's scoring rows on SGLang's `torch_native` backend, over their new rows only.

`TorchNativeAttnBackend._run_sdpa_forward_extend` (SGLang's CPU reference backend) computes each request's
extend chunk as a causal SDPA over its WHOLE sequence: it pads the query to every cached token
(`per_req_query_redudant`) and keeps the chunk's rows. So a chunk of a long request costs what prefilling all
of it costs, and a scoring prefill cut into slices (`slicing.py`) costs a whole prefill per slice
(`benchmarks/bench_scoring_stall_sglang.py`: an 8-token slice of a ~4,000-token scoring request took ~4.5 s).

While the capture wrapper runs a layer of a batch with scoring rows (`scoring_rows`), this AROUND hook computes
those rows' attention as the chunk's queries over the sequence's keys with the causal offset mask (query i of a
chunk after `prefix_len` cached tokens sees keys `0 .. prefix_len + i`): the same attention, `extend_len x
seq_len` instead of `seq_len x seq_len`. Every other request of the batch goes through SGLang's own function,
in groups of consecutive requests (its loop is per request, so their outputs are bit-identical); batches
without scoring rows call it unchanged. Only the scoring rows' outputs differ from SGLang's by float rounding
(different SDPA shapes): they feed the scoring pass, never a client (scores checked against the transformers
scoring pass, tests/integrations/sglang).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"

_rows: frozenset[int] | None = None
"""`req_to_token` rows of the scoring requests of the layer being run (set by the capture wrapper)."""

rows_computed = 0
"""Scoring-row chunks computed here, over all layers (the cache's state dump reports it)."""


@contextlib.contextmanager
def scoring_rows(rows: frozenset[int]) -> Iterator[None]:
    """Mark the scoring rows of the batch whose layer runs inside this block (scheduler thread only)."""
    global _rows
    saved, _rows = _rows, rows
    try:
        yield
    finally:
        _rows = saved


def around_extend(original, backend: Any, query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                  seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor, extend_seq_lens: torch.Tensor,
                  encoder_lens: torch.Tensor | None = None, scaling: float | None = None, enable_gqa: bool = False,
                  causal: bool = False, is_cross_attn: bool = False, sliding_window_size: int | None = None):
    """AROUND `_run_sdpa_forward_extend` (same arguments; `query`/`output` `[tokens, heads, head_dim]`)."""
    global rows_computed
    rows = _rows
    plain = (not rows or encoder_lens is not None or not causal or is_cross_attn
             or (sliding_window_size is not None and sliding_window_size > -1))
    pools = [] if plain else req_pool_indices.tolist()
    if not any(p in rows for p in pools):  # no scoring row here (or a kind of attention left to SGLang)
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    q_lens, kv_lens, prefixes = extend_seq_lens.tolist(), seq_lens.tolist(), extend_prefix_lens.tolist()
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    i = 0
    while i < len(pools):
        if pools[i] in rows:
            rows_computed += 1
            _scoring_row(query[starts[i]:starts[i + 1]], output[starts[i]:starts[i + 1]], k_cache, v_cache,
                         req_to_token[pools[i], :kv_lens[i]], prefixes[i], scaling, enable_gqa)
            i += 1
            continue
        j = i
        while j < len(pools) and pools[j] not in rows:  # a group of other requests: SGLang's own loop
            j += 1
        original(backend, query[starts[i]:starts[j]], output[starts[i]:starts[j]], k_cache, v_cache, req_to_token,
                 req_pool_indices[i:j], seq_lens[i:j], extend_prefix_lens[i:j], extend_seq_lens[i:j], None,
                 scaling=scaling, enable_gqa=enable_gqa, causal=causal, is_cross_attn=False,
                 sliding_window_size=sliding_window_size)
        i = j
    return output


def _scoring_row(query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor, prefix_len: int, scaling: float | None, enable_gqa: bool) -> None:
    """One scoring request's chunk: `query`/`output` `[n, Hq, D]` (its extend rows), `slots` `[seq_len]` its KV
    slots; query i sees keys `0 .. prefix_len + i`."""
    n, kv_len = query.shape[0], slots.shape[0]
    key = k_cache[slots].movedim(0, 1)  # [H_kv, kv_len, D]
    value = v_cache[slots].movedim(0, 1)
    q = query.movedim(0, 1)  # [Hq, n, D]
    if not (q.dtype == key.dtype == value.dtype):
        key, value = key.to(q.dtype), value.to(q.dtype)
    allowed = (torch.arange(kv_len, device=q.device).view(1, kv_len)
               <= (prefix_len + torch.arange(n, device=q.device)).view(n, 1))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=allowed, scale=scaling,
        enable_gqa=enable_gqa)
    output.copy_(out.squeeze(0).movedim(1, 0))
