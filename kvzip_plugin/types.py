# SPDX-License-Identifier: Apache-2.0
"""Frozen values that cross module boundaries: scores in, eviction plans out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreMap:
    """Importance of every context KV pair; higher = keep.

    Attributes:
        scores: `[layers, kv_heads, n_context]` float32. Rows of layers not in `scored_layers`
            are zero and meaningless (e.g. sliding-window layers, which stay uncompressed).
        scored_layers: indices of the layers whose pairs may be evicted.
    """

    scores: torch.Tensor
    scored_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.scores.dim() != 3:
            raise ValueError(f"scores must be [layers, kv_heads, n_context], got {tuple(self.scores.shape)}")
        if torch.isnan(self.scores).any():
            raise ValueError("scores contain NaN")
        n_layers = self.scores.shape[0]
        if any(not 0 <= i < n_layers for i in self.scored_layers):
            raise ValueError(f"scored_layers {self.scored_layers} out of range for {n_layers} layers")

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_kv_heads(self) -> int:
        return int(self.scores.shape[1])

    @property
    def n_context(self) -> int:
        return int(self.scores.shape[2])


@dataclass(frozen=True)
class EvictionPlan:
    """Which context pairs stay. The protected prefix and tokens after the context always stay.

    Attributes:
        keep: `[layers, kv_heads, n_context]` bool; True = kept. Unscored layers are all True.
        structure: the structure that produced it (`pair`, `head`, `layer`, `head_level`, `none`).
        compressible_layers: layers whose pairs could be evicted; the ratio counts only these.
    """

    keep: torch.Tensor
    structure: str
    compressible_layers: tuple[int, ...]

    @property
    def n_context(self) -> int:
        return int(self.keep.shape[2])

    @property
    def kept_counts(self) -> torch.Tensor:
        """`[layers, kv_heads]` int64: kept context pairs per (layer, KV head)."""
        return self.keep.sum(dim=-1)

    @property
    def achieved_ratio(self) -> float:
        """Kept context pairs / all context pairs, over the compressible layers."""
        if not self.compressible_layers or self.n_context == 0:
            return 1.0
        layers = list(self.compressible_layers)
        sub = self.keep[layers]
        return int(sub.sum().item()) / sub.numel()

    @property
    def is_identity(self) -> bool:
        return bool(self.keep.all().item())

    def is_uniform(self) -> bool:
        """True if every compressible (layer, KV head) keeps the same count (the paged layout)."""
        counts = self.kept_counts[list(self.compressible_layers)]
        if counts.numel() == 0:
            return True
        return bool((counts == counts.flatten()[0]).all().item())

    def kept_indices(self, layer: int) -> list[torch.Tensor]:
        """Per KV head of `layer`, the ascending context positions kept: a list of `[n_kept_h]` int64."""
        return [torch.nonzero(row, as_tuple=False).flatten() for row in self.keep[layer]]
