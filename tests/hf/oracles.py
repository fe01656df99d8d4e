# SPDX-License-Identifier: Apache-2.0
"""Slow, obviously-correct references used by the hf tests (independent of the code under test).

- `masked_oracle`: attention over the FULL cache with evicted (layer, KV head, position) pairs
  masked out, computed with explicit float64 math.
- `reference_scores`: KVzip scores straight from the formula, explicit loops over chunks, layers
  and KV heads, from queries/keys captured by a pass-through attention function.
"""

from __future__ import annotations

import copy
import math
import threading

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_state = threading.local()


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Explicit attention; `_state.keep[layer]` = `[H_kv, n_past]` bool of visible past slots."""
    if module.layer_idx not in getattr(_state, "keep", {}):  # uncompressed (e.g. sliding) layer
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    b, hq, q_len, d = query.shape
    hkv, n_kv = key.shape[1], key.shape[2]
    g = hq // hkv
    n_past = n_kv - q_len
    # the prefill that builds the cache is an ordinary causal pass; masks apply to what follows
    keep = getattr(_state, "keep", {}).get(module.layer_idx) if n_past else None
    if keep is not None:
        assert keep.shape == (hkv, n_past), (keep.shape, hkv, n_past)
    scale = scaling if scaling is not None else d ** -0.5
    out = torch.zeros((b, hq, q_len, d), dtype=torch.float64)
    for h in range(hq):
        kh = key[0, h // g].double()
        vh = value[0, h // g].double()
        for i in range(q_len):
            visible = torch.zeros(n_kv, dtype=torch.bool)
            visible[:n_past] = True if keep is None else keep[h // g]
            visible[n_past:n_past + i + 1] = True
            logits = (kh[visible] @ query[0, h, i].double()) * scale
            out[0, h, i] = torch.softmax(logits, dim=0) @ vh[visible]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    if getattr(_state, "capture", None) is not None:
        _state.capture[module.layer_idx] = (query.detach().clone(), key.detach().clone(), kwargs.get("scaling"))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    if "test_oracle" not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register("test_oracle", _oracle_attention)
        AttentionMaskInterface.register("test_oracle", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        AttentionInterface.register("test_capture", _capture_attention)
        AttentionMaskInterface.register("test_capture", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_oracle(model, keep_by_layer: dict[int, torch.Tensor]) -> None:
    """Switch `model` to the oracle with per-layer visible-past masks."""
    _register()
    model.set_attn_implementation("test_oracle")
    _state.keep = keep_by_layer


def full_keep_masks(plan, n_prefix: int, n_total: int) -> dict[int, torch.Tensor]:
    """Per compressible layer, `[H_kv, n_total]` bool: prefix, kept context and later tokens."""
    masks = {}
    for layer in plan.compressible_layers:
        heads = plan.keep.shape[1]
        m = torch.ones((heads, n_total), dtype=torch.bool)
        m[:, n_prefix:n_prefix + plan.n_context] = plan.keep[layer]
        masks[layer] = m
    return masks


def reference_scores(model, prefix_ids, context_ids, postfix_ids, encode, chunk_size, carry,
                     prompt_first, prompt_next, scored_layers) -> torch.Tensor:
    """KVzip scores `[layers, H_kv, n_c]`, written from the formula."""
    _register()
    model.set_attn_implementation("test_capture")
    n_p, n_c = len(prefix_ids), len(context_ids)
    cfg = model.config
    scores = torch.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads, n_c), dtype=torch.float64)
    full = DynamicCache(config=cfg)
    with torch.inference_mode():
        model.model(input_ids=torch.tensor([list(prefix_ids) + list(context_ids)]), past_key_values=full,
                    use_cache=True)
    start = 0
    t = 0
    while start < n_c:                                        # loop over chunks
        end = min(n_c, start + chunk_size)
        if t == 0:
            ids = encode(prompt_first) + list(postfix_ids) + list(context_ids[start:end])
        else:
            ids = (encode(prompt_next) + list(context_ids[max(0, start - carry):start]) + list(postfix_ids)
                   + list(context_ids[start:end]))
        _state.capture = {}
        with torch.inference_mode():
            model.model(input_ids=torch.tensor([ids]), past_key_values=copy.deepcopy(full), use_cache=True)
        captured, _state.capture = _state.capture, None
        n_in = len(ids)
        for layer in scored_layers:                           # loop over layers
            q, k, scaling = captured[layer]
            q, k = q[0].double(), k[0].double()               # [Hq, n_in, D], [Hkv, n_p+n_c+n_in, D]
            hq, hkv = q.shape[0], k.shape[0]
            g = hq // hkv
            scale = scaling if scaling is not None else 1 / math.sqrt(q.shape[-1])
            for h in range(hkv):                              # loop over KV heads
                k_pre = k[h, :n_p]
                k_chunk = k[h, n_p + start:n_p + end]
                k_self = k[h, n_p + n_c:]
                best = torch.zeros(end - start, dtype=torch.float64)
                for member in range(g):                       # the G query heads of this KV head
                    for j in range(n_in):                     # every repeat-input query
                        keys = torch.cat([k_pre, k_chunk, k_self[: j + 1]])
                        p = torch.softmax((keys @ q[h * g + member, j]) * scale, dim=0)
                        best = torch.maximum(best, p[n_p:n_p + end - start])
                scores[layer, h, start:end] = best
        start = end
        t += 1
    model.set_attn_implementation("sdpa")
    return scores
