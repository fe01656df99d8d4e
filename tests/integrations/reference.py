# SPDX-License-Identifier: Apache-2.0
"""The transformers reference both engines' end-to-end tests compare a compacted prefix against: the
same kept KV pairs at their original positions, through the core's compressed cache."""

from __future__ import annotations

import torch

from kvzip_plugin.hf.cache import KVzipCache, compact
from kvzip_plugin.types import EvictionPlan


def reference_logprobs(model, prefix: list[int], n_protected: int, kept: torch.Tensor | None, rest: list[int],
                       generated: list[int]) -> tuple[list[float], list[int]]:
    """Teacher-forced run of `model` on the L tokens of `prefix` (compacted to `kept` when given:
    `[layers, H_kv, P]` positions kept per KV head (the same count everywhere), or a bool mask
    `[layers, H_kv, L]` of the kept positions (any count per head); the first `n_protected` are
    always kept), then `rest +
    generated`; returns the logprob of each generated token and the argmax at each step. The model
    needs KVzip's attention wrapper (`kvzip_plugin.hf.attention.install`)."""
    L = len(prefix)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), use_cache=True)
        cache = KVzipCache.from_dynamic(out.past_key_values)
        if kept is not None:
            n_layers, n_heads, _ = kept.shape
            if kept.dtype == torch.bool:
                if not bool(kept[..., :n_protected].all()):
                    raise ValueError("the protected tokens must all be kept")
                keep = kept[..., n_protected:].clone()
            else:
                keep = torch.zeros(n_layers, n_heads, L - n_protected, dtype=torch.bool)
                for layer in range(n_layers):
                    for head in range(n_heads):
                        ctx = kept[layer, head]
                        keep[layer, head, ctx[ctx >= n_protected] - n_protected] = True
            structure = "head" if len(set(keep.sum(-1).flatten().tolist())) == 1 else "pair"
            cache = compact(cache, EvictionPlan(keep, structure, tuple(range(n_layers))), n_protected)
        ids = rest + generated[:-1]
        logits = model(torch.tensor([ids]), past_key_values=cache.view(), use_cache=True).logits[0].float()
    logp = torch.log_softmax(logits[len(rest) - 1:], dim=-1)
    return [float(logp[i, t]) for i, t in enumerate(generated)], logp.argmax(-1).tolist()


def check_against_reference(model, prefix: list[int], L: int, n_protected: int, kept: torch.Tensor,
                            requests: list[dict], suffixes: list[list[int]], tol: float) -> list[float]:
    """Every request on the compacted prefix (its first `L` tokens of `prefix`) has the greedy tokens of a
    transformers run of the same kept pairs at their original positions, then `prefix[L:] + suffix` at
    logical positions L, L+1, ...; logprobs within `tol`. Returns each one's largest logprob gap to the full
    cache (the caller checks that the comparison can fail)."""
    gaps = []
    for r, sfx in zip(requests, suffixes, strict=True):
        rest = prefix[L:] + sfx
        ref_lp, ref_argmax = reference_logprobs(model, prefix[:L], n_protected, kept, rest, r["tokens"])
        assert ref_argmax == r["tokens"], r["id"]
        assert max(abs(a - b) for a, b in zip(ref_lp, r["logprobs"], strict=True)) < tol, r["id"]
        full_lp, _ = reference_logprobs(model, prefix[:L], n_protected, None, rest, r["tokens"])
        gaps.append(max(abs(a - b) for a, b in zip(full_lp, r["logprobs"], strict=True)))
    return gaps
