# SPDX-License-Identifier: Apache-2.0
"""What SGLang's `torch_native` backend (its CPU reference backend) computes for the rows the plugin handles.

Two kinds of rows of a batch are the plugin's, and SGLang's per-request loops
(`TorchNativeAttnBackend._run_sdpa_forward_extend` / `_run_sdpa_forward_decode`) would spend their work on
them for nothing or for too much:

* **Scoring rows** (KVzip's internal repeat requests, extend only). SGLang computes each request's extend
  chunk as a causal SDPA over its WHOLE sequence (it pads the query to every cached token,
  `per_req_query_redudant`), so a scoring prefill cut into slices (`slicing.py`) would cost a whole prefill
  per slice (`benchmarks/bench_scoring_stall_sglang.py`: an 8-token slice of a ~4,000-token scoring request
  took ~4.5 s). Here they attend as the chunk's queries over the sequence's keys with the causal offset mask
  (query i of a chunk after `prefix_len` cached tokens sees keys `0 .. prefix_len + i`): the same attention,
  `extend_len x seq_len` instead of `seq_len x seq_len`. Their outputs differ from SGLang's by float rounding
  only (other SDPA shapes); they feed the scoring pass, never a client (scores checked against the
  transformers scoring pass, tests/integrations/sglang).
* **Rows on head-page entries** (`pair`, `layer_budget`; extend and decode). Their output is written by
  `attention.PagedAttention` after SGLang's forward (the prefix part from the entry's runs, merged with the
  request's own tokens), so SGLang's attention of these rows over their `req_to_token` row (the entry's slots,
  which hold other heads' pairs, then the own tokens) is thrown away. They are skipped: their output rows are
  left as they are for the plugin to overwrite. On the CPU backend this was a whole per-request gather and
  SDPA per row and layer, ~0.1-0.3 ms at a 135M model's shapes, paid on top of the plugin's attention.

The capture wrapper marks the rows of the layer it runs (`rows`); every other request of the batch goes
through SGLang's own function, in groups of consecutive requests (its loops are per request, so their outputs
are bit-identical). Batches without marked rows call SGLang's function unchanged. The KV cache writes happen
before these functions (`forward_extend` / `forward_decode`), so skipped rows still store their new keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_BACKEND = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
EXTEND_TARGET = f"{_BACKEND}._run_sdpa_forward_extend"
DECODE_TARGET = f"{_BACKEND}._run_sdpa_forward_decode"

_scoring: frozenset[int] = frozenset()
"""`req_to_token` rows of the scoring requests of the layer being run (set by the capture wrapper)."""
_skipped: frozenset[int] = frozenset()
"""`req_to_token` rows whose attention output the plugin writes after the layer (head-page entries)."""

rows_computed = 0
"""Scoring-row chunks computed here, over all layers (the cache's state dump reports it)."""
rows_skipped = 0
"""Head-page rows SGLang's loops did not compute, over all layers and steps (the state dump reports it)."""


@contextlib.contextmanager
def rows(scoring: frozenset[int] = frozenset(), skipped: frozenset[int] = frozenset()) -> Iterator[None]:
    """Mark the scoring rows and the plugin-written rows of the batch whose layer runs inside this block
    (scheduler thread only)."""
    global _scoring, _skipped
    saved = _scoring, _skipped
    _scoring, _skipped = scoring, skipped
    try:
        yield
    finally:
        _scoring, _skipped = saved


def _plain(encoder_lens: Any, is_cross_attn: bool, sliding_window_size: int | None) -> bool:
    """A kind of attention left to SGLang whatever the rows (encoder-decoder, cross attention, sliding window)."""
    return encoder_lens is not None or is_cross_attn or (sliding_window_size is not None and sliding_window_size > -1)


def _groups(pools: list[int], marked: frozenset[int]) -> Iterator[tuple[int, int, bool]]:
    """`(i, j, is_marked)` spans of the batch: each marked request alone, unmarked ones in runs."""
    i = 0
    while i < len(pools):
        if pools[i] in marked:
            yield i, i + 1, True
            i += 1
            continue
        j = i
        while j < len(pools) and pools[j] not in marked:
            j += 1
        yield i, j, False
        i = j


def around_extend(original: Callable, backend: Any, query: torch.Tensor, output: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor,
                  extend_seq_lens: torch.Tensor, encoder_lens: torch.Tensor | None = None,
                  scaling: float | None = None, enable_gqa: bool = False, causal: bool = False,
                  is_cross_attn: bool = False, sliding_window_size: int | None = None):
    """AROUND `_run_sdpa_forward_extend` (same arguments; `query`/`output` `[tokens, heads, head_dim]`)."""
    global rows_computed, rows_skipped
    marked = _scoring | _skipped
    plain = not marked or not causal or _plain(encoder_lens, is_cross_attn, sliding_window_size)
    pools = [] if plain else req_pool_indices.tolist()
    if not any(p in marked for p in pools):
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    q_lens, kv_lens, prefixes = extend_seq_lens.tolist(), seq_lens.tolist(), extend_prefix_lens.tolist()
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    for i, j, is_marked in _groups(pools, marked):
        if is_marked and pools[i] in _scoring:
            rows_computed += 1
            _scoring_row(query[starts[i]:starts[j]], output[starts[i]:starts[j]], k_cache, v_cache,
                         req_to_token[pools[i], :kv_lens[i]], prefixes[i], scaling, enable_gqa)
        elif is_marked:
            rows_skipped += 1
        else:  # a group of other requests: SGLang's own loop
            original(backend, query[starts[i]:starts[j]], output[starts[i]:starts[j]], k_cache, v_cache,
                     req_to_token, req_pool_indices[i:j], seq_lens[i:j], extend_prefix_lens[i:j],
                     extend_seq_lens[i:j], None, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                     is_cross_attn=False, sliding_window_size=sliding_window_size)
    return output


def around_decode(original: Callable, backend: Any, query: torch.Tensor, output: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, encoder_lens: torch.Tensor | None = None,
                  scaling: float | None = None, enable_gqa: bool = False, causal: bool = False,
                  is_cross_attn: bool = False, sliding_window_size: int | None = None):
    """AROUND `_run_sdpa_forward_decode` (same arguments; one query per request)."""
    global rows_skipped
    skipped = _skipped
    pools = [] if not skipped or _plain(encoder_lens, is_cross_attn, sliding_window_size) \
        else req_pool_indices.tolist()
    if not any(p in skipped for p in pools):
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                        is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    for i, j, is_marked in _groups(pools, skipped):
        if is_marked:
            rows_skipped += 1
        else:
            original(backend, query[i:j], output[i:j], k_cache, v_cache, req_to_token, req_pool_indices[i:j],
                     seq_lens[i:j], None, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                     is_cross_attn=False, sliding_window_size=sliding_window_size)
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
