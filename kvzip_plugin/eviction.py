# SPDX-License-Identifier: Apache-2.0
"""Scores -> eviction plan, for each structure.

Tie rule (deterministic): candidates are ranked by score, descending, with a *stable* sort over
their flat index in (layer, KV head, position) order, so among equal scores the pair with the lower
layer, then head, then position is kept first. Budgets are exact: `floor(ratio * n)` pairs, at least
one, where `n` is the number of candidates of the budget's scope (all compressible pairs for `pair`,
one head's positions for `head`, one layer's positions for `layer`). `layer_budget` takes the
`pair` plan's count in each layer and splits it evenly over the layer's KV heads (rounded up), each
head keeping its own best tokens: budgets follow the layers, uniform across the heads of a layer.
"""

from __future__ import annotations

import math

import torch

from kvzip_plugin.types import EvictionPlan, ScoreMap

STRUCTURES = ("pair", "head", "layer", "layer_budget")


def budget(ratio: float, n: int) -> int:
    """Kept count for `n` candidates at `ratio`: floor(ratio * n), clamped to [1, n] (0 if n == 0)."""
    if n == 0:
        return 0
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    return min(n, max(1, math.floor(ratio * n + 1e-9)))


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over the last dim of `scores` `[..., n]` marking its top-k (stable tie rule)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], True)
    return mask


def top_mask_variable(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask over the last dim of `scores` `[..., n]` marking, in each row, its top `counts[...]`
    entries (stable tie rule: among equal scores the earlier position first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank_kept = torch.arange(scores.shape[-1]) < counts.unsqueeze(-1)  # [..., n] in rank order
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order, rank_kept)
    return mask


def plan_eviction(score_map: ScoreMap, ratio: float, structure: str) -> EvictionPlan:
    """Choose the kept context pairs.

    Args:
        score_map: scores `[layers, kv_heads, n_context]`; only `scored_layers` are compressed.
        ratio: fraction of the compressible context pairs kept, in (0, 1].
        structure: `pair` (one global threshold), `head` (same count per layer and head),
            `layer` (same tokens for all heads of a layer; layer score = max over heads),
            `layer_budget` (the `pair` plan's count per layer, split evenly over its KV heads).

    Returns:
        The plan; `keep` is all True for unscored layers and at ratio 1.0.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}; got {structure!r}")
    scores = score_map.scores.float()
    n_layers, n_heads, n_ctx = scores.shape
    keep = torch.ones((n_layers, n_heads, n_ctx), dtype=torch.bool)
    layers = list(score_map.scored_layers)
    if ratio >= 1.0 or not layers or n_ctx == 0:
        return EvictionPlan(keep=keep, structure=structure, compressible_layers=tuple(layers))
    sub = scores[layers]  # [l, H, n]
    if structure == "pair":
        flat = sub.reshape(-1)
        sub_keep = _top_mask(flat, budget(ratio, flat.numel())).view_as(sub)
    elif structure == "head":
        sub_keep = _top_mask(sub, budget(ratio, n_ctx))
    elif structure == "layer_budget":
        flat = sub.reshape(-1)
        per_layer = _top_mask(flat, budget(ratio, flat.numel())).view_as(sub).sum(dim=(1, 2))  # [l]
        per_head = torch.clamp(-(-per_layer // n_heads), max=n_ctx)  # ceil(count / H)
        sub_keep = top_mask_variable(sub, per_head.view(-1, 1).expand(-1, n_heads))
    else:  # "layer"
        layer_scores = sub.amax(dim=1)  # [l, n]
        sub_keep = _top_mask(layer_scores, budget(ratio, n_ctx)).unsqueeze(1).expand_as(sub)
    keep[layers] = sub_keep
    return EvictionPlan(keep=keep, structure=structure, compressible_layers=tuple(layers))


def plan_head_level(head_scores: torch.Tensor, n_context: int, ratio: float,
                    scored_layers: tuple[int, ...]) -> EvictionPlan:
    """Context-independent variant: keep whole (layer, KV head) context spans.

    Args:
        head_scores: `[layers, kv_heads]`, one score per head (max over positions of a calibration
            run's `ScoreMap`).
        n_context: context length of the cache being compressed.
        ratio: fraction of compressible heads (hence of pairs) whose context span is kept.
        scored_layers: compressible layers; others keep everything.

    Returns:
        A plan whose rows are all True (kept head) or all False (dropped head: only the protected
        prefix and later tokens remain).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if head_scores.dim() != 2:
        raise ValueError(f"head_scores must be [layers, kv_heads], got {tuple(head_scores.shape)}")
    n_layers, n_heads = head_scores.shape
    keep = torch.ones((n_layers, n_heads, n_context), dtype=torch.bool)
    layers = list(scored_layers)
    if ratio < 1.0 and layers and n_context > 0:
        flat = head_scores.float()[layers].reshape(-1)
        head_keep = _top_mask(flat, budget(ratio, flat.numel())).view(len(layers), n_heads)
        keep[layers] = head_keep.unsqueeze(-1).expand(len(layers), n_heads, n_context)
    return EvictionPlan(keep=keep, structure="head_level", compressible_layers=tuple(layers))
