# SPDX-License-Identifier: Apache-2.0
"""The KVzip score of one layer for one reconstruction chunk, in plain torch.

This is the engine-agnostic kernel: the transformers hook (`kvzip_plugin.hf.attention`) calls it
with the post-RoPE queries and keys it sees inside a layer's attention; an engine integration
calls it with the same tensors read from its paged cache.
"""

from __future__ import annotations

import torch


def chunk_scores(
    query: torch.Tensor,
    keys_prefix: torch.Tensor,
    keys_chunk: torch.Tensor,
    keys_self: torch.Tensor,
    scaling: float,
    query_block: int = 512,
    keys_other: torch.Tensor | None = None,
    query_offset: int = 0,
) -> torch.Tensor:
    """Max attention each chunk key receives from the repeat-input queries.

    The softmax spans `[keys_prefix, (keys_other,) keys_chunk, keys_self]`; the repeat queries are
    causal among `keys_self` (query i sees self keys 0..i). Returns, per KV head, the max over the
    G query heads of its group and over all queries of the probability at each chunk key.

    Args:
        query: `[H_q, n_q, D]` post-RoPE queries of the repeat input.
        keys_prefix: `[H_kv, n_p, D]` keys of the protected prefix.
        keys_chunk: `[H_kv, m, D]` keys of the context chunk being scored.
        keys_self: `[H_kv, query_offset + n_q, D]` keys of the repeat input itself, up to the last query.
        scaling: the model's softmax scale (e.g. `head_dim ** -0.5`).
        query_block: queries per block; the largest buffer is
            `[H_q, query_block, n_p + n_o + m + n_q]` float32, never context x context.
        keys_other: optional `[H_kv, n_o, D]` further keys in the softmax (the rest of the cache,
            for the `full_cache` variant); they take probability mass but are not scored.
        query_offset: index in the repeat input of the first query (an engine that prefills the
            repeat input in several steps scores each step's queries; max over steps = one pass).

    Returns:
        `[H_kv, m]` float32 scores in [0, 1].
    """
    n_heads_q, n_q, dim = query.shape
    n_heads_kv, m, _ = keys_chunk.shape
    if n_heads_q % n_heads_kv:
        raise ValueError(f"{n_heads_q} query heads are not a multiple of {n_heads_kv} KV heads")
    for name, t in (("keys_prefix", keys_prefix), ("keys_self", keys_self), ("keys_other", keys_other)):
        if t is not None and t.shape[0] != n_heads_kv:
            raise ValueError(f"{name} has {t.shape[0]} heads, keys_chunk has {n_heads_kv}")
    if query_offset < 0 or keys_self.shape[1] != query_offset + n_q:
        raise ValueError(f"keys_self has {keys_self.shape[1]} tokens for {n_q} queries at offset {query_offset}")
    group = n_heads_q // n_heads_kv
    parts = [keys_prefix] + ([keys_other] if keys_other is not None else []) + [keys_chunk, keys_self]
    keys = torch.cat(parts, dim=1).float()  # [H_kv, K, D]
    n_before_chunk = keys_prefix.shape[1] + (keys_other.shape[1] if keys_other is not None else 0)
    n_before_self = n_before_chunk + m
    q = query.float().view(n_heads_kv, group, n_q, dim)  # [H_kv, G, n_q, D]
    scores = torch.zeros((n_heads_kv, m), dtype=torch.float32, device=query.device)
    self_pos = torch.arange(query_offset + n_q, device=query.device)  # key index in the repeat input
    query_pos = self_pos[query_offset:]
    for start in range(0, n_q, query_block):
        stop = min(n_q, start + query_block)
        logits = torch.einsum("hgqd,hkd->hgqk", q[:, :, start:stop], keys) * scaling  # [H_kv, G, b, K]
        # causal among the repeat input's own keys: query i (absolute) sees self keys j <= i
        future = self_pos[None, :] > query_pos[start:stop, None]  # [b, query_offset + n_q]
        logits[..., n_before_self:].masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., n_before_chunk:n_before_self]  # [H_kv, G, b, m]
        scores = torch.maximum(scores, probs.amax(dim=(1, 2)))
    return scores
