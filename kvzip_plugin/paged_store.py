# SPDX-License-Identifier: Apache-2.0
"""A compacted prefix laid out in head pages inside an engine's own KV buffers (`store.py` plans the
layout): the copy that builds it and the per-step read of a layer's runs, engine-agnostic.

A head page is one KV head's slice of one page of one layer's buffer: in a token-major view of that
buffer (`[num_pages, page_size, H_kv, D]`: vLLM's blocks, SGLang's pages of token slots), `view[page, :,
head]`. The engines hand a `Views` function (layer index -> its keys and values views) and the ids of the
pages the store owns in their pool, so their accounting, eviction and metrics see the memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvzip_plugin.store import HeadPageLayout, copy_plan, run_gather_index

Views = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Layer index -> (keys, values) token-major views `[num_blocks, block_size, H_kv, D]` of its buffer."""


@dataclass(frozen=True)
class _Gather:
    """One layer's runs that lie in one buffer: `grid` rows of the padded page grid <- (blocks, slots)."""

    buffer: int
    grid: torch.Tensor
    blocks: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True)
class PagedStore:
    """A compacted prefix in head pages, on this worker.

    Attributes:
        layout: where each run lies (block index in the store, buffer, head slot per page).
        block_ids: `[layout.n_blocks]` the engine blocks of the store, in order.
        gathers: per layer, its runs' pages grouped by the buffer they lie in.
    """

    layout: HeadPageLayout
    block_ids: torch.Tensor
    gathers: tuple[tuple[_Gather, ...], ...]

    @property
    def n_slots(self) -> int:
        """Token slots of the store's pages (what a request's block table / req_to_token row starts with)."""
        return self.layout.n_blocks * self.layout.page_size

    @classmethod
    def build(cls, layout: HeadPageLayout, block_ids: Sequence[int]) -> PagedStore:
        if len(block_ids) != layout.n_blocks:
            raise ValueError(f"the layout needs {layout.n_blocks} blocks, got {len(block_ids)}")
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        gathers = []
        for layer in range(layout.n_layers):
            grid, blocks, buffers, slots = run_gather_index(layout, layer)
            gathers.append(tuple(_Gather(int(b), grid[buffers == b], ids[blocks[buffers == b]], slots[buffers == b])
                                 for b in buffers.unique().tolist()))
        return cls(layout, ids, tuple(gathers))

    def read_runs(self, layer: int, views: Views) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s runs as `[H_kv, max_pages * page_size, D]` keys and values (head `h` valid in its first
        `lengths[h]` rows; the rest is uninitialised) and `[H_kv]` lengths: a gather from the engine's buffers,
        once per layer and step, shared by every request on the prefix."""
        h, max_pages, ps = self.layout.n_heads, self.layout.pages.shape[-1], self.layout.page_size
        out_k = out_v = None
        for g in self.gathers[layer]:
            k_view, v_view = views(g.buffer)
            if out_k is None:
                shape = (h * max_pages, ps, k_view.shape[-1])
                out_k = k_view.new_empty(shape)  # pages past a run's length are never read
                out_v = v_view.new_empty(shape)
            dev = k_view.device
            blocks, slots, grid = g.blocks.to(dev), g.slots.to(dev), g.grid.to(dev)
            out_k[grid] = k_view[blocks, :, slots]  # [n, page, D]
            out_v[grid] = v_view[blocks, :, slots]
        if out_k is None:  # the layer keeps nothing (no protected tokens, no kept pairs)
            k_view, _ = views(0)
            out_k = out_v = k_view.new_zeros((h, 0, k_view.shape[-1]))
            return out_k, out_v, self.layout.lengths[layer]
        return (out_k.view(h, max_pages * ps, -1), out_v.view(h, max_pages * ps, -1), self.layout.lengths[layer])


def write_store(keep: torch.Tensor, layout: HeadPageLayout, src_block_ids: Sequence[int],
                dst_block_ids: Sequence[int], views: Views) -> None:
    """Copy every run into its head pages, layer by layer (keys and values).

    Args:
        keep: `[layers, H_kv, L]` the kept tokens of the prefix (`store.select_runs`).
        layout: `store.place_runs` of the runs' lengths.
        src_block_ids: the prefix's `L / block_size` blocks; only read.
        dst_block_ids: the store's `layout.n_blocks` fresh blocks (disjoint from the sources).
        views: token-major views of each layer's buffer.
    """
    if set(src_block_ids) & set(dst_block_ids):
        raise ValueError("destination blocks overlap the source blocks")
    if len(dst_block_ids) != layout.n_blocks:
        raise ValueError(f"the layout needs {layout.n_blocks} blocks, got {len(dst_block_ids)}")
    ps = layout.page_size
    src = torch.tensor(list(src_block_ids), dtype=torch.long)
    dst = torch.tensor(list(dst_block_ids), dtype=torch.long)
    for layer in range(layout.n_layers):
        cp = copy_plan(keep, layout, layer)
        for src_view, kind in zip(views(layer), (0, 1), strict=True):
            dev = src_view.device
            gathered = src_view[src[cp.src_tokens // ps].to(dev), (cp.src_tokens % ps).to(dev), cp.src_heads.to(dev)]
            for buf in cp.dst_buffers.unique().tolist():
                sel = cp.dst_buffers == buf
                dst_view = views(buf)[kind]
                dst_view[dst[cp.dst_blocks[sel]].to(dev), cp.dst_offsets[sel].to(dev),
                         cp.dst_slots[sel].to(dev)] = gathered[sel.to(dev)]


class StoreIndex:
    """The paged stores this worker holds, by job id (the scheduler names them in its metadata)."""

    def __init__(self) -> None:
        self.stores: dict[int, PagedStore] = {}

    def add(self, job_id: int, store: PagedStore) -> None:
        self.stores[job_id] = store

    def drop(self, job_ids: Sequence[int]) -> None:
        for job_id in job_ids:
            self.stores.pop(job_id, None)

    def get(self, job_id: int | None) -> PagedStore | None:
        return None if job_id is None else self.stores.get(job_id)
