# SPDX-License-Identifier: Apache-2.0
"""KVzip's hook into transformers' attention interface (no forked model code).

`install(model)` registers `kvzip_<base>` (base = the model's `sdpa` or `eager` attention) in
`AttentionInterface` and `AttentionMaskInterface` and switches the model to it. The wrapped
function runs the base attention unchanged except in two situations:

1. The layer's cache is a compacted `KVzipLayer` (physical slots != logical positions, or per-head
   holes): the mask transformers built from logical positions is replaced by the right physical
   one (all past slots visible where valid for that KV head, causal among the new tokens).
2. A `ScoringSession` is active: after attending normally, the layer's post-RoPE queries and keys
   are handed to `kvzip_plugin.scoring.chunk_scores`.

The cache layer tells the attention function about itself through a thread-local slot filled in
`KVzipLayer.update()`, which every attention module calls immediately before attention.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvzip_plugin.scoring.kvzip import chunk_scores

_SUPPORTED_BASES = ("sdpa", "eager")
_local = threading.local()


@dataclass(frozen=True)
class LayerCall:
    """What a `KVzipLayer` publishes for the attention call that follows its `update()`.

    Attributes:
        valid: `[H_kv, n_base]` bool over the compacted base slots (False = hole), or None.
        n_base: slots of the compacted base; slots after it (appended tokens) are all valid.
        exact: True when every physical slot index equals its logical position (nothing
            evicted): transformers' own mask is then right and is used unchanged.
    """

    valid: torch.Tensor | None
    n_base: int
    exact: bool


def publish_layer_call(call: LayerCall) -> None:
    """Called by `KVzipLayer.update()`; consumed by the next attention call on this thread."""
    stale = getattr(_local, "pending", None)
    if stale is not None and not stale.exact:
        _local.pending = None
        raise RuntimeError(
            "a compacted KVzip cache was read by an attention function that is not KVzip's; "
            "call kvzip_plugin.hf.install(model) before using a compressed cache"
        )
    _local.pending = call


def _take_layer_call() -> LayerCall | None:
    call = getattr(_local, "pending", None)
    _local.pending = None
    return call


@dataclass
class ScoringSession:
    """Collects one reconstruction chunk's KVzip scores, layer by layer.

    Cache index space: the scored cache holds `n_cache` tokens `[prefix | context | ...]`; the
    chunk's context span is `[span_start, span_end)` in that space.

    Attributes:
        n_prefix: protected-prefix tokens at the head of the cache.
        span_start, span_end: the chunk's span, cache indices.
        scored_layers: layers to score (full-attention layers).
        softmax: `chunk` (official) or `full_cache`.
        query_block: see `chunk_scores`.
        scores: filled per layer, `[H_kv, span_end - span_start]` float32.
    """

    n_prefix: int
    span_start: int
    span_end: int
    scored_layers: frozenset[int]
    softmax: str = "chunk"
    query_block: int = 512
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Score the chunk from one layer's post-RoPE `query` `[1, H_q, n_q, D]` and `key`
        `[1, H_kv, n_cache + n_q, D]` (cache slots then the repeat input's own keys)."""
        if layer_idx not in self.scored_layers:
            return
        if query.shape[0] != 1:
            raise ValueError("KVzip scoring runs one context at a time (batch size 1)")
        n_q = query.shape[2]
        k = key[0]
        n_cache = k.shape[1] - n_q
        other = None
        if self.softmax == "full_cache":
            other = torch.cat([k[:, self.n_prefix:self.span_start], k[:, self.span_end:n_cache]], dim=1)
        self.scores[layer_idx] = chunk_scores(
            query=query[0],
            keys_prefix=k[:, : self.n_prefix],
            keys_chunk=k[:, self.span_start:self.span_end],
            keys_self=k[:, n_cache:],
            scaling=scaling,
            query_block=self.query_block,
            keys_other=other,
        )


@contextmanager
def scoring_session(session: ScoringSession) -> Iterator[ScoringSession]:
    """Activate `session` for the forward passes run inside the block (this thread only)."""
    if getattr(_local, "session", None) is not None:
        raise RuntimeError("a KVzip scoring session is already active on this thread")
    _local.session = session
    try:
        yield session
    finally:
        _local.session = None


def _physical_mask(call: LayerCall, n_heads_q: int, q_len: int, kv_len: int,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask `[1, H_q or 1, q_len, kv_len]`: past slots visible (where valid for the
    query head's KV head), causal among the `q_len` new tokens at the end."""
    n_past = kv_len - q_len
    causal = torch.ones((q_len, q_len), dtype=torch.bool, device=device).tril()
    if call.valid is None:
        past = torch.ones((q_len, n_past), dtype=torch.bool, device=device)
        return torch.cat([past, causal], dim=-1)[None, None]
    n_heads_kv = call.valid.shape[0]
    tail = torch.ones((n_heads_kv, n_past - call.n_base), dtype=torch.bool, device=device)
    past_kv = torch.cat([call.valid.to(device), tail], dim=-1)  # [H_kv, n_past]
    past_q = past_kv.repeat_interleave(n_heads_q // n_heads_kv, dim=0)  # [H_q, n_past]
    mask = torch.cat([past_q[:, None, :].expand(n_heads_q, q_len, n_past),
                      causal[None].expand(n_heads_q, q_len, q_len)], dim=-1)
    return mask[None]


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base == "eager":
        # the model's own eager function, defined in its modeling file
        return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]
    return ALL_ATTENTION_FUNCTIONS[base]  # type: ignore[no-any-return]


def _make_attention(base: str) -> Callable[..., Any]:
    def kvzip_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        call = _take_layer_call()
        if call is not None and not call.exact:
            if query.shape[0] != 1:
                raise ValueError("a compacted KVzip cache serves one sequence per forward (batch size 1)")
            mask = _physical_mask(call, query.shape[1], query.shape[2], key.shape[2], query.device)
            if base == "eager":
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
            elif call.valid is None and query.shape[2] == 1:
                mask = None  # one query over all-valid slots: no mask, as transformers does
            attention_mask = mask
        out = _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        session: ScoringSession | None = getattr(_local, "session", None)
        if session is not None:
            scaling = kwargs.get("scaling") or module.head_dim ** -0.5  # type: ignore[operator]
            session.record(int(module.layer_idx), query, key, float(scaling))  # type: ignore[arg-type]
        return out  # type: ignore[no-any-return]

    kvzip_attention.__name__ = f"kvzip_{base}_attention"
    return kvzip_attention


def attention_name(base: str) -> str:
    return f"kvzip_{base}"


def install(model: Any) -> str:
    """Route `model`'s attention through KVzip's wrapper; idempotent. Returns the implementation name.

    Raises:
        ValueError: if the model's attention is not `sdpa` or `eager` (the CPU reference path).
    """
    current = model.config._attn_implementation
    if current.startswith("kvzip_"):
        return str(current)
    if current not in _SUPPORTED_BASES:
        raise ValueError(
            f"KVzip's transformers path wraps 'sdpa' or 'eager' attention, the model uses {current!r}; "
            "load it with attn_implementation='sdpa'"
        )
    name = attention_name(current)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return name
