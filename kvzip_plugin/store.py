# SPDX-License-Identifier: Apache-2.0
"""A compacted prefix with its own run of kept pairs per (layer, KV head), laid out in head pages.

KVzip's non-uniform budgets (`pair`, `layer_budget`) keep a different count in every (layer, KV
head). A paged engine's page holds all KV heads of one layer, so a stock block table can only hold
the same count everywhere. This module lays the runs out in **head pages**: one KV head's slice of
one page of one layer's KV buffer (`page_size` tokens x D for keys, the same for values). A store
holds `n_blocks` whole engine blocks; block `b` of the store offers `n_layers * H_kv` head pages
(one per (layer buffer, head slot)), and a run may use head pages of *any* layer's buffer, so budgets
that differ by layer cost their total, not `n_layers` times the fullest layer.

Head-page id `g` (int, local to the store) -> (block index in the store, layer buffer, head slot):
`block = g // (n_layers * H)`, `buffer = (g // H) % n_layers`, `slot = g % H`.

Each run is rounded up to whole pages with that head's next-best pairs (never padding to mask),
so a store holds its kept pairs plus less than one page per run, and every head page is full.

Engine-agnostic: the engines' glue maps (block index, buffer, slot) onto their own buffers
(vLLM: `[blocks, H, block_size, 2D]` per layer; SGLang: token slots of `[slots, H, D]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzip_plugin.eviction import budget, plan_eviction, top_mask_variable
from kvzip_plugin.types import ScoreMap

SERVED_STRUCTURES = ("pair", "layer_budget", "head")
"""Structures the engines serve: `pair` and `layer_budget` through head pages, `head` through the
engine's own block table (every run the same length)."""


def _ceil_to(n: torch.Tensor, page: int) -> torch.Tensor:
    return -(-n // page) * page


def select_runs(scores: torch.Tensor, n_protected: int, ratio: float, structure: str,
                page_size: int) -> torch.Tensor:
    """Which prefix tokens each (layer, KV head) keeps, rounded up to whole pages.

    Args:
        scores: `[layers, H_kv, n_context]` KVzip scores of the context tokens (after the protected ones).
        n_protected: tokens before the context, always kept.
        ratio: fraction of the context pairs kept by the plan (before rounding), in (0, 1].
        structure: `pair`, `layer_budget` or `head` (`eviction.plan_eviction`).
        page_size: tokens per page; every run's length becomes a multiple of it, or the prefix
            length `n_protected + n_context` (when that is shorter).

    Returns:
        keep `[layers, H_kv, n_protected + n_context]` bool: protected tokens, the plan's pairs and
        that head's next-best pairs up to the page boundary.
    """
    if structure not in SERVED_STRUCTURES:
        raise ValueError(f"structure must be one of {', '.join(SERVED_STRUCTURES)}; got {structure!r}")
    n_layers, n_heads, n_ctx = scores.shape
    plan = plan_eviction(ScoreMap(scores.float(), tuple(range(n_layers))), ratio, structure)
    total = torch.clamp(_ceil_to(n_protected + plan.kept_counts, page_size), max=n_protected + n_ctx)
    ctx_keep = top_mask_variable(scores.float(), total - n_protected)
    protected = torch.ones(n_layers, n_heads, n_protected, dtype=torch.bool)
    return torch.cat([protected, ctx_keep], dim=-1)


def uniform_tokens(keep: torch.Tensor) -> torch.Tensor | None:
    """The kept tokens as `[layers, H_kv, P]` (ascending per head) when every run has the same length P
    (always for `head`; any structure at ratio 1.0): the layout an engine's own block table and kernel
    read (`compaction.plan_compaction`). None when the runs differ (they need head pages)."""
    lengths = keep.sum(-1)
    n = int(lengths.flatten()[0])
    if not bool((lengths == n).all()):
        return None
    return keep.nonzero()[:, 2].view(keep.shape[0], keep.shape[1], n)


def block_table_tokens(keep: torch.Tensor, structure: str, ratio: float, tp_size: int = 1) -> torch.Tensor | None:
    """`uniform_tokens(keep)` where the engine may lay the store out in its own block table: under tensor
    parallelism every rank must choose the same layout (the scheduler publishes one physical length and one
    attention path for the store), but each rank sees only its own heads' runs, which can be equal on one
    rank and not on another. So with `tp_size > 1` only the structures whose runs are equal on every rank by
    construction (`head`; any structure at ratio 1.0, which keeps everything) use the block table; the
    others always go to head pages."""
    if tp_size > 1 and structure != "head" and ratio < 1.0:
        return None
    return uniform_tokens(keep)


@dataclass(frozen=True)
class HeadPageLayout:
    """Where each (layer, KV head)'s run of a compacted prefix lies in the store's blocks.

    Attributes:
        lengths: `[layers, H_kv]` int64 tokens of each run (whole pages, or the prefix length).
        pages: `[layers, H_kv, max_pages]` int64 head-page ids of each run in order, -1 padding.
        n_blocks: engine blocks the store holds.
        page_size: tokens per head page (the engine's block size; 1 for SGLang's token pool).
    """

    lengths: torch.Tensor
    pages: torch.Tensor
    n_blocks: int
    page_size: int

    @property
    def n_layers(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def pages_per_block(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def kept_pairs(self) -> int:
        return int(self.lengths.sum())

    def locate(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head-page ids -> (block index in the store, layer buffer, head slot), each like `page_ids`."""
        h = self.n_heads
        return page_ids // self.pages_per_block, (page_ids // h) % self.n_layers, page_ids % h


def place_runs(lengths: torch.Tensor, page_size: int) -> HeadPageLayout:
    """Lay runs of the given lengths out in head pages, using as few whole blocks as fit them.

    Layer `l`'s pages go first into buffer `l`'s head pages of the store's blocks (block-major, then
    slot); the pages that do not fit there fill the free head pages of the other buffers in order.
    Deterministic.

    Args:
        lengths: `[layers, H_kv]` int64 run lengths (multiples of `page_size`, or any length: the
            last page of a run is then partly used).
        page_size: tokens per head page.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    lengths = lengths.long()
    n_layers, n_heads = lengths.shape
    n_pages = -(-lengths // page_size)  # [layers, H]
    per_block = n_layers * n_heads
    total = int(n_pages.sum())
    n_blocks = -(-total // per_block)
    capacity = n_blocks * n_heads  # head pages of one buffer in the store

    def buffer_pages(buf: int) -> list[int]:
        return [(blk * n_layers + buf) * n_heads + s for blk in range(n_blocks) for s in range(n_heads)]

    free = [buffer_pages(b) for b in range(n_layers)]
    assigned: list[list[int]] = []
    overflow: list[tuple[int, int]] = []  # (layer, count) of pages that did not fit their own buffer
    for layer in range(n_layers):
        need = int(n_pages[layer].sum())
        own = min(need, capacity)
        assigned.append(free[layer][:own])
        free[layer] = free[layer][own:]
        overflow.append((layer, need - own))
    for layer, extra in overflow:
        buf = 0
        while extra:
            while not free[buf]:
                buf += 1
            take = min(extra, len(free[buf]))
            assigned[layer].extend(free[buf][:take])
            free[buf] = free[buf][take:]
            extra -= take
    max_pages = int(n_pages.max()) if n_pages.numel() else 0
    pages = torch.full((n_layers, n_heads, max_pages), -1, dtype=torch.long)
    for layer in range(n_layers):
        start = 0
        for head in range(n_heads):
            n = int(n_pages[layer, head])
            pages[layer, head, :n] = torch.tensor(assigned[layer][start:start + n], dtype=torch.long)
            start += n
    return HeadPageLayout(lengths=lengths, pages=pages, n_blocks=n_blocks, page_size=page_size)


def max_store_blocks(n_tokens: int, n_protected: int, ratio: float, page_size: int, n_layers: int,
                     n_heads: int, structure: str) -> int:
    """Blocks a store of a `n_tokens`-token prefix can need at most, before its scores are known
    (what the scheduler reserves; the worker reports what it used and the rest is freed).

    Bound: the plan keeps `budget(ratio, runs * n_context)` context pairs (`layer_budget` adds less
    than one per head), every run adds its protected tokens and rounds up by less than one page;
    capped at the whole prefix (`n_tokens / page_size` blocks hold every run at full length).
    """
    runs = n_layers * n_heads
    n_ctx = n_tokens - n_protected
    if structure == "head":
        kept = runs * (n_protected + budget(ratio, n_ctx))
    else:
        kept = runs * n_protected + budget(ratio, runs * n_ctx) + (runs if structure == "layer_budget" else 0)
    pages = -(-kept // page_size) + runs
    return min(-(-n_tokens // page_size), -(-pages // runs))


@dataclass(frozen=True)
class CopyPlan:
    """Token copies that build a store, for one source layer.

    Attributes:
        src_tokens: `[n]` token index in the prefix.
        src_heads: `[n]` KV head of the source (= the run's head).
        dst_blocks: `[n]` block index in the store.
        dst_buffers: `[n]` layer buffer written.
        dst_slots: `[n]` head slot written.
        dst_offsets: `[n]` offset in the page.
    """

    src_tokens: torch.Tensor
    src_heads: torch.Tensor
    dst_blocks: torch.Tensor
    dst_buffers: torch.Tensor
    dst_slots: torch.Tensor
    dst_offsets: torch.Tensor


def copy_plan(keep: torch.Tensor, layout: HeadPageLayout, layer: int) -> CopyPlan:
    """The copies of `layer`'s runs: token `j` of run (layer, h) goes to page `j // page_size` of the
    run at offset `j % page_size`. `keep` is `select_runs`' mask `[layers, H_kv, n_tokens]`."""
    ps = layout.page_size
    heads, tokens = [], []
    for h in range(layout.n_heads):
        idx = keep[layer, h].nonzero().flatten()
        if idx.numel() != int(layout.lengths[layer, h]):
            raise ValueError(f"run ({layer}, {h}) keeps {idx.numel()} tokens, "
                             f"layout says {int(layout.lengths[layer, h])}")
        tokens.append(idx)
        heads.append(torch.full_like(idx, h))
    src_tokens, src_heads = torch.cat(tokens), torch.cat(heads)
    rank = torch.cat([torch.arange(t.numel()) for t in tokens])
    page_ids = layout.pages[layer][src_heads, rank // ps]
    blocks, buffers, slots = layout.locate(page_ids)
    return CopyPlan(src_tokens, src_heads, blocks, buffers, slots, rank % ps)


def run_gather_index(layout: HeadPageLayout,
                     layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where `layer`'s runs are, page by page, to read them as a padded `[H_kv, max_pages * page_size, D]`.

    Returns:
        (grid, blocks, buffers, slots): `grid` `[n]` positions in the `[H_kv * max_pages]` page grid
        (head-major) of the `n` used head pages, and for each its block index in the store, layer
        buffer and head slot.
    """
    pages = layout.pages[layer]  # [H, max_pages]
    used = pages >= 0
    grid = used.flatten().nonzero().flatten()
    blocks, buffers, slots = layout.locate(pages.flatten()[grid])
    return grid, blocks, buffers, slots
