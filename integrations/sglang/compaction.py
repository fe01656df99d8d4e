# SPDX-License-Identifier: Apache-2.0
"""Compaction of a scored prefix into fresh slots of SGLang's token pool.

`choose_runs` turns a job's scores into what it keeps (the core's `store.select_runs` for the structure),
`SlotAllocator` takes the destination pages from SGLang's allocator (evicting through the cache when the
pool is short) for the core's `CompactionTxn`, and `copy_kept` copies the kept pairs layer by layer: with
one run length P (`head`, ratio 1.0) slot s of every head holds its s-th kept token (SGLang's own kernels
read it); otherwise the runs go to head pages (`kvzip_plugin.paged_store`, read by `attention.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvzip_plugin.compaction import apply_compaction, plan_compaction
from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.paged_store import PagedStore, write_store
from kvzip_plugin.store import HeadPageLayout, place_runs, select_runs, uniform_tokens


@dataclass
class KeptRuns:
    """What a job keeps: `keep` [layers, H_kv, L] (rounded to whole pages); `tokens` [layers, H_kv, P] when
    every run has the same length P; else `layout`, the head pages of the runs; `n_pages` the entry owns."""

    keep: torch.Tensor
    tokens: torch.Tensor | None
    n_pages: int
    layout: HeadPageLayout | None


def choose_runs(scores: torch.Tensor, n_protected: int, cfg: KVzipConfig, page_size: int) -> KeptRuns:
    """scores: [layers, H_kv, L - n_protected] (any device)."""
    keep = select_runs(scores.cpu(), n_protected, cfg.ratio, cfg.structure, page_size)
    tokens = uniform_tokens(keep)
    if tokens is not None:
        return KeptRuns(keep, tokens, tokens.shape[-1] // page_size, None)
    layout = place_runs(keep.sum(-1), page_size)
    return KeptRuns(keep, None, layout.n_blocks, layout)


def page_slots(page_ids: Sequence[int] | torch.Tensor, page_size: int, device: Any) -> torch.Tensor:
    """The token slots of pages `page_ids`, page by page: [len(page_ids) * page_size]."""
    pages = torch.as_tensor(list(page_ids), dtype=torch.int64, device=device)
    if page_size == 1:
        return pages
    return (pages[:, None] * page_size + torch.arange(page_size, device=device)).flatten()


class SlotAllocator:
    """`compaction.BlockAllocator` over SGLang's token allocator (page ids <-> slots). `evict(n)` asks the
    cache to free n tokens (tree first, then compacted prefixes) when the pool is short."""

    def __init__(self, allocator: Any, page_size: int, evict: Callable[[int], None]) -> None:
        self.allocator = allocator
        self.page = page_size
        self._evict = evict

    def allocate(self, n: int) -> list[int]:
        tokens = n * self.page
        if self.allocator.available_size() < tokens:
            self._evict(tokens - self.allocator.available_size())
        slots = self.allocator.alloc(tokens) if self.allocator.available_size() >= tokens else None
        if slots is None:
            raise RuntimeError(f"{tokens} free KV slots needed, {self.allocator.available_size()} free")
        return (slots[:: self.page] // self.page).tolist()

    def free(self, block_ids) -> None:
        if len(block_ids):
            self.allocator.free(page_slots(block_ids, self.page, self.allocator.device))


def copy_kept(runs: KeptRuns, src_pages: list[int], dst_pages: list[int], page_size: int, layer_ids: list[int],
              kv_pool: Any, paged_views: Any) -> PagedStore | None:
    """Copy the kept pairs of the prefix in `src_pages` to `dst_pages`; returns the head-page store, or
    None when the entry's slots are read by SGLang's own kernels (one run length)."""
    if runs.layout is None:
        plan = plan_compaction(runs.tokens, src_pages, dst_pages, page_size)
        for idx, layer_id in enumerate(layer_ids):
            for buf in (kv_pool._get_key_buffer(layer_id), kv_pool._get_value_buffer(layer_id)):
                apply_compaction(buf, plan.src_slots[idx], plan.dst_slots)
        return None
    if paged_views is None:
        raise RuntimeError("runs of different lengths need the head-page attention, which is not set up")
    write_store(runs.keep, runs.layout, src_pages, dst_pages, paged_views)
    return PagedStore.build(runs.layout, dst_pages)
