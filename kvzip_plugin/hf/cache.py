# SPDX-License-Identifier: Apache-2.0
"""A transformers `Cache` holding kept KV pairs per layer and KV head, read by many queries.

Storage per full-attention layer: keys/values `[1, H_kv, T, D]` where slot t of head h holds the
pair of logical position `positions[h, t]`; slots are ordered `[protected prefix | kept context
(ascending) | tokens after the context]`. With the `head` or `layer` structure every head keeps
the same count, so `T` is exact and the layer lays out in fixed-size pages (`kvzip_plugin.paging`).
With `pair` each head keeps its own count; heads are right-padded to the layer's longest and
`valid [H_kv, T]` marks real slots (padding is reported separately from kept bytes).

RoPE is applied before caching, so kept keys carry their original rotation; `get_seq_length()`
returns the *logical* length, so tokens appended later get the original positions
(`prefix + n_context + i`) from the model's own position logic.

A `KVzipCache` is never mutated in place: `update()` rebinds new tensors, so `view()` (a new cache
object sharing the base tensors) gives each query its own append-only cache over one compressed
context.
"""

from __future__ import annotations

import copy

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from kvzip_plugin.hf.attention import LayerCall, publish_layer_call
from kvzip_plugin.types import EvictionPlan


class KVzipLayer(DynamicLayer):
    """One full-attention layer: a (possibly compacted) base plus this view's appended tokens.

    Args:
        keys, values: `[B, H_kv, T, D]` base slots (shared, never written).
        positions: `[H_kv, T]` int64 logical position of every base slot (-1 for padding).
        logical_length: logical tokens represented by the base (its last position + 1).
        valid: `[H_kv, T]` bool, False at padding slots; None if every slot is real.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 logical_length: int, valid: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.positions = positions
        self.valid = valid
        self.n_base = int(keys.shape[-2])
        self.logical_length = int(logical_length)
        self.exact = valid is None and self.n_base == self.logical_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        publish_layer_call(LayerCall(valid=self.valid, n_base=self.n_base, exact=self.exact))
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.logical_length += int(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a KVzip cache cannot be cropped; take a new view() instead")

    def reset(self) -> None:
        raise NotImplementedError("a KVzip cache cannot be reset; take a new view() instead")

    @property
    def n_physical(self) -> int:
        return int(self.keys.shape[-2])


def _is_full_attention(layer: object) -> bool:
    return isinstance(layer, DynamicLayer) and not getattr(layer, "is_sliding", False)


class KVzipCache(Cache):
    """Cache of `KVzipLayer`s (full attention) and unchanged transformers layers (sliding window)."""

    def __init__(self, layers: list) -> None:  # type: ignore[type-arg]
        super().__init__(layers=layers)

    @classmethod
    def from_dynamic(cls, cache: DynamicCache) -> KVzipCache:
        """Wrap a prefilled `DynamicCache` without copying its tensors (nothing evicted)."""
        layers = []
        for layer in cache.layers:
            if _is_full_attention(layer):
                if not layer.is_initialized:
                    raise ValueError("the cache to wrap is not prefilled")
                n = int(layer.keys.shape[-2])
                heads = int(layer.keys.shape[1])
                pos = torch.arange(n).expand(heads, n)
                layers.append(KVzipLayer(layer.keys, layer.values, pos, n))
            else:
                layers.append(copy.copy(layer))
        return cls(layers)

    def view(self) -> KVzipCache:
        """A new cache over the same base tensors; what it appends is its own."""
        return KVzipCache([copy.copy(layer) for layer in self.layers])

    @property
    def kvzip_layers(self) -> dict[int, KVzipLayer]:
        return {i: layer for i, layer in enumerate(self.layers) if isinstance(layer, KVzipLayer)}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].get_seq_length())


def compact(full: KVzipCache, plan: EvictionPlan, n_prefix: int) -> KVzipCache:
    """Gather the kept pairs of `full` into a new compacted cache (`full` is untouched).

    Args:
        full: the uncompressed cache `[prefix | context | later]` (e.g. `KVzipCache.from_dynamic`).
        plan: kept context pairs, `keep [layers, H_kv, n_context]`.
        n_prefix: protected-prefix tokens at the head of the cache.

    Returns:
        A cache whose compressible layers hold `[prefix | kept context | later]` per KV head.
    """
    layers = []
    n_ctx = plan.n_context
    for idx, layer in enumerate(full.layers):
        if not isinstance(layer, KVzipLayer) or idx not in plan.compressible_layers or plan.keep[idx].all():
            layers.append(copy.copy(layer))
            continue
        if not layer.exact:
            raise ValueError(f"layer {idx} is already compacted")
        n_total = layer.n_physical
        if n_total < n_prefix + n_ctx:
            raise ValueError(f"layer {idx} holds {n_total} tokens, fewer than prefix + context")
        prefix = torch.arange(n_prefix)
        later = torch.arange(n_prefix + n_ctx, n_total)
        kept = [torch.cat([prefix, n_prefix + idx_h, later]) for idx_h in plan.kept_indices(idx)]
        width = max(int(k.numel()) for k in kept)
        index = torch.zeros((len(kept), width), dtype=torch.long)
        valid = torch.zeros((len(kept), width), dtype=torch.bool)
        for h, k in enumerate(kept):
            index[h, : k.numel()] = k
            valid[h, : k.numel()] = True
        b, heads, _, dim = layer.keys.shape
        gather = index.to(layer.keys.device)[None, :, :, None].expand(b, heads, width, dim)
        keys = torch.gather(layer.keys, 2, gather)  # [B, H_kv, width, D]
        values = torch.gather(layer.values, 2, gather)
        positions = torch.where(valid, layer.positions.gather(1, index), torch.full_like(index, -1))
        layers.append(KVzipLayer(keys, values, positions, layer.logical_length,
                                 None if bool(valid.all()) else valid))
    return KVzipCache(layers)


def kv_bytes(cache: Cache) -> tuple[int, int]:
    """(kept, stored) bytes of keys + values in `cache`: kept counts real pairs only, stored also
    counts padding slots of `pair`-structured layers."""
    kept = stored = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        size = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        stored += size
        valid = getattr(layer, "valid", None)
        if valid is not None:
            n_real = int(valid.sum()) + valid.shape[0] * (layer.keys.shape[-2] - valid.shape[1])
            size = size * n_real // (valid.shape[0] * layer.keys.shape[-2])
        kept += size
    return kept, stored
