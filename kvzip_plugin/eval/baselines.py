# SPDX-License-Identifier: Apache-2.0
"""Baseline scorers for the quality benchmarks, in KVzip's framework.

Each scorer returns a `ScoreMap` `[layers, kv_heads, n_context]` (higher = keep; rows of unscored
layers are zero), so every method goes through the same `plan_eviction` / `compact` path and is
compared at an exactly equal KV budget.

- `snapkv`: mean attention from an observation window (here: the first question's tokens) over
  the context, avg-pooled over positions (kernel 5), mean over the GQA group (Li et al. 2024,
  arXiv 2404.14469; kvpress `SnapKVPress`). Needs one forward of the question over the cache.
- `h2o`: attention each context key receives in the prefill of `[prefix + context + first
  question]`, averaged over the queries that see it, mean over the GQA group (Zhang et al. 2023,
  arXiv 2306.14048; kvpress `ObservedAttentionPress`). Needs one extra prefill (an engine would
  collect it during its own prefill, with attention probabilities materialised).
- `streaming_llm`: `n_sink` first context tokens, then the most recent ones (Xiao et al. 2023,
  arXiv 2309.17453). Needs nothing.
- `random`: seeded uniform noise. Needs nothing.
- `knorm`: minus the L2 norm of the key, low-norm keys kept (Devoto et al. 2024, arXiv
  2406.11430; kvpress `KnormPress`). Needs the cached keys.

`snapkv` and `h2o` are *query-aware*: in the multi-query setting (compress once, ask many) their
scores come from the first question and are reused for every later question, as a real shared
cache would. The protected prefix (BOS, template opening: the usual attention sink) is always kept
by the eviction path and is never scored here.

The score kernels (`snapkv_layer_scores`, `h2o_layer_scores`) are plain torch on post-RoPE queries
and keys; `observe_attention` feeds them from a transformers model through a pass-through function
registered in transformers' `AttentionInterface` (no forked model code).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from kvzip_plugin.types import ScoreMap

BASELINES = ("snapkv", "h2o", "streaming_llm", "random", "knorm")
"""Names of the baseline scorers (kvzip's own scorers live in `kvzip_plugin.scoring.kvzip`)."""

QUERY_AWARE = ("snapkv", "h2o")


def _empty(n_layers: int, n_kv_heads: int, n_context: int) -> torch.Tensor:
    return torch.zeros((n_layers, n_kv_heads, n_context), dtype=torch.float32)


# ---- query-free scorers -------------------------------------------------------------------------------

def streaming_llm_scores(n_layers: int, n_kv_heads: int, n_context: int, scored_layers: Sequence[int],
                         n_sink: int = 4) -> ScoreMap:
    """StreamingLLM: attention sinks + a recent window.

    The first `n_sink` context positions score 2 + (n_sink - i) / n_sink (kept first, in order);
    the others score their position / n_context in [0, 1) (the most recent kept next). Under any
    structure and budget >= n_sink, the sinks and then the latest tokens are kept, identically
    in every head.

    Returns:
        `[n_layers, n_kv_heads, n_context]` scores; unscored layers zero.
    """
    if n_sink < 0:
        raise ValueError(f"n_sink must be >= 0, got {n_sink}")
    pos = torch.arange(n_context, dtype=torch.float32)
    row = pos / max(n_context, 1)  # [n] recency in [0, 1)
    n = min(n_sink, n_context)
    row[:n] = 2.0 + (n_sink - pos[:n]) / max(n_sink, 1)
    scores = _empty(n_layers, n_kv_heads, n_context)
    layers = list(scored_layers)
    scores[layers] = row.expand(len(layers), n_kv_heads, n_context)
    return ScoreMap(scores=scores, scored_layers=tuple(layers))


def random_scores(n_layers: int, n_kv_heads: int, n_context: int, scored_layers: Sequence[int],
                  seed: int = 0) -> ScoreMap:
    """Seeded uniform scores in [0, 1): the floor any scorer must beat."""
    gen = torch.Generator().manual_seed(seed)
    scores = _empty(n_layers, n_kv_heads, n_context)
    layers = list(scored_layers)
    scores[layers] = torch.rand((len(layers), n_kv_heads, n_context), generator=gen)
    return ScoreMap(scores=scores, scored_layers=tuple(layers))


def knorm_scores(context_keys: dict[int, torch.Tensor], n_layers: int) -> ScoreMap:
    """K-norm: minus the L2 norm of each context key (low-norm keys draw attention; keep them).

    Args:
        context_keys: per scored layer, its context keys `[H_kv, n_context, D]`.
        n_layers: all layers of the model (unscored rows stay zero).
    """
    if not context_keys:
        raise ValueError("context_keys is empty")
    first = next(iter(context_keys.values()))
    scores = _empty(n_layers, first.shape[0], first.shape[1])
    for layer, keys in context_keys.items():
        scores[layer] = -keys.float().norm(dim=-1)
    return ScoreMap(scores=scores, scored_layers=tuple(sorted(context_keys)))


# ---- attention-based kernels (plain torch) ------------------------------------------------------------

def _group_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, start: int, stop: int) -> torch.Tensor:
    """Softmax attention of queries `[start, stop)` of the last `n_q` positions over `keys`, causal.

    Args:
        query: `[H_q, n_q, D]`, the queries of the last n_q of the n_k positions of `keys`.
        keys: `[H_kv, n_k, D]`.

    Returns:
        `[H_kv, G, stop - start, n_k]` float32 probabilities (0 on masked keys).
    """
    n_heads_q, n_q, dim = query.shape
    n_heads_kv, n_k, _ = keys.shape
    if n_heads_q % n_heads_kv:
        raise ValueError(f"{n_heads_q} query heads are not a multiple of {n_heads_kv} KV heads")
    if n_q > n_k:
        raise ValueError(f"{n_q} queries for {n_k} keys: the queries must be the last keys' positions")
    group = n_heads_q // n_heads_kv
    q = query[:, start:stop].float().reshape(n_heads_kv, group, stop - start, dim)  # [H_kv, G, b, D]
    logits = torch.einsum("hgqd,hkd->hgqk", q, keys.float()) * scaling  # [H_kv, G, b, n_k]
    q_pos = torch.arange(n_k - n_q + start, n_k - n_q + stop, device=query.device)  # [b]
    future = torch.arange(n_k, device=query.device)[None, :] > q_pos[:, None]  # [b, n_k]
    logits.masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def snapkv_layer_scores(query: torch.Tensor, keys: torch.Tensor, span: tuple[int, int], scaling: float,
                        kernel_size: int = 5) -> torch.Tensor:
    """SnapKV scores of one layer for the context span.

    The observation window is the `n_w` queries (positions `n_k - n_w .. n_k - 1`, causal among
    themselves); a key's score is its attention averaged over the window's queries, then
    avg-pooled over the pre-window positions (kernel `kernel_size`, zero padding counted, as
    kvpress), then averaged over the G query heads of its KV head.

    Args:
        query: `[H_q, n_w, D]` post-RoPE window queries.
        keys: `[H_kv, n_k, D]` post-RoPE keys: the cache then the window's own keys.
        span: `[start, end)` of the context in key positions (before the window).
        scaling: the model's softmax scale.

    Returns:
        `[H_kv, end - start]` float32 scores in [0, 1].
    """
    n_w, n_k = query.shape[1], keys.shape[1]
    start, end = span
    if not 0 <= start <= end <= n_k - n_w:
        raise ValueError(f"span {span} must lie before the {n_w} window keys of {n_k}")
    probs = _group_probs(query, keys, scaling, 0, n_w)  # [H_kv, G, n_w, n_k]
    mean = probs[..., : n_k - n_w].mean(dim=2)  # [H_kv, G, n_k - n_w]
    if kernel_size > 1:
        h, g, n = mean.shape
        mean = F.avg_pool1d(mean.reshape(h * g, 1, n), kernel_size, stride=1,
                            padding=kernel_size // 2).reshape(h, g, -1)[..., :n]
    return mean.mean(dim=1)[:, start:end].contiguous()


def h2o_layer_scores(query: torch.Tensor, keys: torch.Tensor, span: tuple[int, int], scaling: float,
                     query_block: int = 256) -> torch.Tensor:
    """H2O-style (observed attention) scores of one layer for the context span.

    A key's score is the attention it receives, summed over every query that sees it (causal),
    divided by the number of those queries, then averaged over the G query heads of its KV head.
    Queries are processed in blocks: the largest buffer is `[H_q, query_block, n_k]`.

    Args:
        query: `[H_q, n_q, D]` post-RoPE queries of the last `n_q` positions (a whole prefill:
            `n_q == n_k`).
        keys: `[H_kv, n_k, D]` post-RoPE keys.
        span: `[start, end)` of the context in key positions.
        scaling: the model's softmax scale.

    Returns:
        `[H_kv, end - start]` float32 scores in [0, 1].
    """
    n_q, n_k = query.shape[1], keys.shape[1]
    start, end = span
    if not 0 <= start <= end <= n_k:
        raise ValueError(f"span {span} out of range for {n_k} keys")
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")
    total = torch.zeros((keys.shape[0], query.shape[0] // keys.shape[0], n_k), dtype=torch.float32,
                        device=query.device)  # [H_kv, G, n_k]
    for lo in range(0, n_q, query_block):
        hi = min(n_q, lo + query_block)
        total += _group_probs(query, keys, scaling, lo, hi).sum(dim=2)
    first_query = n_k - n_q  # position of the first query
    seen_by = (n_k - torch.arange(n_k, device=query.device).clamp(min=first_query)).float()  # [n_k]
    return (total / seen_by).mean(dim=1)[:, start:end].contiguous()


# ---- transformers driver ---------------------------------------------------------------------------

Observer = Callable[[int, torch.Tensor, torch.Tensor, float], None]
"""Called per layer with (layer_idx, query `[1, H_q, n_q, D]`, key `[1, H_kv, n_k, D]`, scaling)."""

_local = threading.local()


def _observing_attention(wrapped: str) -> Callable[..., Any]:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if wrapped == "eager":  # the model's own eager function, defined in its modeling file
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[wrapped]
        out = base(module, query, key, value, attention_mask, **kwargs)
        observer: Observer | None = getattr(_local, "observer", None)
        if observer is not None:
            scaling = kwargs.get("scaling") or module.head_dim ** -0.5  # type: ignore[operator]
            observer(int(module.layer_idx), query, key, float(scaling))  # type: ignore[arg-type]
        return out

    return attention


@contextmanager
def observe_attention(model: Any, observer: Observer) -> Iterator[None]:
    """Inside the block, every attention call of `model` runs its current implementation unchanged
    (e.g. KVzip's `kvzip_sdpa`, so compressed caches keep working) and then hands its post-RoPE
    query and key to `observer`. The model's implementation is restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation
    name = f"baseline_observe_{current}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _observing_attention(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    if getattr(_local, "observer", None) is not None:
        raise RuntimeError("an attention observer is already active on this thread")
    model.set_attn_implementation(name)
    _local.observer = observer
    try:
        yield
    finally:
        _local.observer = None
        model.set_attn_implementation(current)


def _check_layers(got: dict[int, torch.Tensor], scored_layers: Sequence[int]) -> None:
    missing = sorted(set(scored_layers) - set(got))
    if missing:
        raise RuntimeError(f"no attention call observed for layers {missing}")


@torch.inference_mode()
def snapkv_scores(model: Any, cache: Any, question_ids: Sequence[int], n_prefix: int, n_context: int,
                  scored_layers: Sequence[int], kernel_size: int = 5) -> ScoreMap:
    """SnapKV scores from one question run over a prefilled `[prefix | context]` cache.

    Args:
        model: a transformers causal LM.
        cache: the prefilled cache; it must not be changed: pass a per-query view (e.g.
            `KVzipCache.view()`) or a copy, it receives the question's tokens.
        question_ids: the observation window (question + chat postfix ids).
        n_prefix, n_context: the cache's layout.
        scored_layers: the layers to score (full-attention layers).
    """
    span = (n_prefix, n_prefix + n_context)
    layers = frozenset(scored_layers)
    got: dict[int, torch.Tensor] = {}

    def observe(layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if layer in layers:
            got[layer] = snapkv_layer_scores(query[0], key[0], span, scaling, kernel_size).cpu()

    with observe_attention(model, observe):
        model.base_model(input_ids=torch.tensor([list(question_ids)], device=model.device),
                         past_key_values=cache, use_cache=True)
    _check_layers(got, scored_layers)
    return _stack(got, model, n_context, scored_layers)


@torch.inference_mode()
def h2o_scores(model: Any, input_ids: Sequence[int], n_prefix: int, n_context: int,
               scored_layers: Sequence[int], query_block: int = 256) -> ScoreMap:
    """H2O-style scores from one fresh prefill of `input_ids` = prefix + context + first question.

    Args:
        model: a transformers causal LM.
        input_ids: the whole prompt the scores are observed on (its first n_prefix + n_context ids
            are the cached layout).
        n_prefix, n_context: the layout.
        scored_layers: the layers to score.
    """
    from transformers import DynamicCache

    span = (n_prefix, n_prefix + n_context)
    layers = frozenset(scored_layers)
    got: dict[int, torch.Tensor] = {}

    def observe(layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if layer in layers:
            got[layer] = h2o_layer_scores(query[0], key[0], span, scaling, query_block).cpu()

    with observe_attention(model, observe):
        model.base_model(input_ids=torch.tensor([list(input_ids)], device=model.device),
                         past_key_values=DynamicCache(config=model.config), use_cache=True)
    _check_layers(got, scored_layers)
    return _stack(got, model, n_context, scored_layers)


def _stack(got: dict[int, torch.Tensor], model: Any, n_context: int, scored_layers: Sequence[int]) -> ScoreMap:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = next(iter(got.values())).shape[0]
    scores = _empty(int(cfg.num_hidden_layers), n_heads, n_context)
    for layer, s in got.items():
        scores[layer] = s
    return ScoreMap(scores=scores, scored_layers=tuple(sorted(scored_layers)))


def cache_context_keys(cache: Any, n_prefix: int, n_context: int,
                       scored_layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per scored layer, the context keys `[H_kv, n_context, D]` of an uncompressed prefilled
    transformers cache (batch 1; `cache.layers[i].keys` is `[1, H_kv, T, D]`)."""
    out = {}
    for layer in scored_layers:
        keys = cache.layers[layer].keys
        if keys.shape[-2] < n_prefix + n_context:
            raise ValueError(f"layer {layer} holds {keys.shape[-2]} tokens < prefix + context")
        out[layer] = keys[0, :, n_prefix:n_prefix + n_context]
    return out

