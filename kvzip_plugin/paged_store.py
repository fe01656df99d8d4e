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
from dataclasses import dataclass, field

import torch

from kvzip_plugin.kernel_runs import KernelRuns, kernel_runs, use_kernel
from kvzip_plugin.prefix_attention import PageRuns, SegmentRuns, length_mask
from kvzip_plugin.store import HeadPageLayout, copy_plan, run_gather_index

Views = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Layer index -> (keys, values) token-major views `[num_blocks, block_size, H_kv, D]` of its buffer."""


PageReader = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(buffer, blocks `[P]`, head slots `[P]`) -> those head pages' keys and values `[P, page_size, D]` (any
strides): an engine's fastest read of whole head pages (default: indexing the `Views`)."""


@dataclass(frozen=True)
class _Gather:
    """The pages of one layer's runs that lie in one buffer, in the layer's page order (head-major).

    Attributes:
        buffer: the layer buffer they lie in.
        rows: their positions among the layer's used pages.
        blocks, slots: engine block id and head slot of each.
        heads: the KV head (run) each belongs to.
        valid: `[P]` tokens of each page the run uses (the page size but for a run's last page).
        mask: `[P, 1, 1, page_size]` additive mask for pages not full (the last page of a run whose length
            is not a multiple of the page size), None when all are full.
    """

    buffer: int
    rows: torch.Tensor
    blocks: torch.Tensor
    slots: torch.Tensor
    heads: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class _LayerRuns:
    """How to read one layer's runs: its used pages, head-major (head 0's pages in order, then head 1's,
    ...), gathered by buffer; head `h`'s run starts at token `starts[h]` of the pages taken in that order."""

    gathers: tuple[_Gather, ...]
    n_pages: int
    starts: list[int]
    lengths: list[int]


@dataclass
class PagedStore:
    """A compacted prefix in head pages, on this worker.

    Attributes:
        layout: where each run lies (block index in the store, buffer, head slot per page).
        block_ids: `[layout.n_blocks]` the engine blocks of the store, in order.
        layers: per layer, how its runs are read (no `gathers` when the layer keeps nothing).
    """

    layout: HeadPageLayout
    block_ids: torch.Tensor
    layers: tuple[_LayerRuns, ...]
    # (layer, device) -> the gathers' tensors there; ("kernel", layer, device) -> KernelRuns, or None; and what
    # else a reader derives once per store (`cached`)
    _on: dict = field(default_factory=dict, repr=False)

    def cached(self, key: tuple, build: Callable[[], object]) -> object:
        """What `build` returns for `key` (a tuple naming what it is and the device), built once per store:
        index tensors and page tables derived from the layout, read every step. A None result is kept too."""
        if key not in self._on:
            self._on[key] = build()
        return self._on[key]

    @property
    def n_slots(self) -> int:
        """Token slots of the store's pages (what a request's block table / req_to_token row starts with)."""
        return self.layout.n_blocks * self.layout.page_size

    @classmethod
    def build(cls, layout: HeadPageLayout, block_ids: Sequence[int]) -> PagedStore:
        if len(block_ids) != layout.n_blocks:
            raise ValueError(f"the layout needs {layout.n_blocks} blocks, got {len(block_ids)}")
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        ps, max_pages = layout.page_size, layout.pages.shape[-1]
        layers = []
        for layer in range(layout.n_layers):
            grid, blocks, buffers, slots = run_gather_index(layout, layer)  # used pages, head-major
            heads, index = grid // max(max_pages, 1), grid % max(max_pages, 1)
            valid = torch.clamp(layout.lengths[layer][heads] - index * ps, max=ps)  # [P] tokens used per page
            n_pages = -(-layout.lengths[layer] // ps)
            starts = (torch.cumsum(n_pages, 0) - n_pages) * ps
            gathers = []
            for b in buffers.unique().tolist():
                sel = buffers == b
                mask = None
                if bool((valid[sel] < ps).any()):
                    mask = length_mask(valid[sel], ps)
                gathers.append(_Gather(int(b), sel.nonzero().flatten(), ids[blocks[sel]], slots[sel], heads[sel],
                                       valid[sel], mask))
            layers.append(_LayerRuns(tuple(gathers), int(blocks.numel()), starts.tolist(),
                                     layout.lengths[layer].tolist()))
        return cls(layout, ids, tuple(layers))

    def gathers_on(self, layer: int, device: torch.device) -> tuple[_Gather, ...]:
        """`layer`'s pages by buffer (head-major within each), their index tensors on `device` (cached)."""
        return self.cached((layer, device), lambda: tuple(
            _Gather(g.buffer, g.rows.to(device), g.blocks.to(device), g.slots.to(device), g.heads.to(device),
                    g.valid.to(device), None if g.mask is None else g.mask.to(device))
            for g in self.layers[layer].gathers))

    def read_runs(self, layer: int, views: Views,
                  pages: PageReader | None = None) -> PageRuns | SegmentRuns | KernelRuns:
        """`layer`'s runs for `prefix_attention.attend_rows`, read from the engine's buffers once per layer
        and step and shared by every request on the prefix. With the Triton kernel (CUDA, or forced by
        `KVZIP_PREFIX_ATTENTION=triton`): the pages read in place by one launch (`KernelRuns`, its page
        table built once per layer and device). Otherwise torch: page by page (`PageRuns`: the pages as
        they are, no copy into runs) when pages hold several tokens; one after another (`SegmentRuns`, one
        gather of exactly the used slots) for pages of one token (SGLang's token pool)."""
        lr = self.layers[layer]
        ps = self.layout.page_size
        if not lr.gathers:  # the layer keeps nothing (no protected tokens, no kept pairs)
            return PageRuns([], [], lr.starts, lr.lengths)
        k0, _ = views(lr.gathers[0].buffer)
        if use_kernel(k0.device):
            got = self.cached(("kernel", layer, k0.device),  # None: buffers the kernel cannot address (torch path)
                              lambda: kernel_runs(self.layout, layer, self.block_ids, views))
            if got is not None:
                return got
        gathers = self.gathers_on(layer, k0.device)
        if pages is None:
            def pages(buf: int, blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                k_view, v_view = views(buf)
                return page_rows(k_view, blocks, slots), page_rows(v_view, blocks, slots)
        read = [pages(g.buffer, g.blocks, g.slots) for g in gathers]
        if len(gathers) == 1:  # all of the layer's pages in one buffer: head-major already
            g = gathers[0]
            runs = PageRuns([(*read[0], g.heads, g.mask)], [g.rows], lr.starts, lr.lengths, head_major=True)
        elif ps == 1:  # copied into runs below, buffer by buffer
            runs = PageRuns([(*r, g.heads, g.mask) for r, g in zip(read, gathers, strict=True)],
                            [g.rows for g in gathers], lr.starts, lr.lengths)
        else:  # every buffer's pages in one chunk: the attention's op count is that of one buffer, not one per buffer
            heads, rows, mask = self._merged_on(layer, k0.device)
            runs = PageRuns([(torch.cat([k for k, _ in read]), torch.cat([v for _, v in read]), heads, mask)],
                            [rows], lr.starts, lr.lengths)
        if ps > 1:
            return runs
        return SegmentRuns(*runs.runs(), lr.starts, lr.lengths)  # pages of one token: always the copied runs

    def _merged_on(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`layer`'s pages of all buffers as one chunk, buffer by buffer: (heads `[P]`, positions in the
        head-major page order `[P]`, mask `[P, 1, 1, page_size]` or None when every page is full), cached."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            gathers = self.gathers_on(layer, device)
            valid = torch.cat([g.valid for g in gathers])
            ps = self.layout.page_size
            return (torch.cat([g.heads for g in gathers]), torch.cat([g.rows for g in gathers]),
                    length_mask(valid, ps) if bool((valid < ps).any()) else None)
        return self.cached(("merged", layer, device), build)


class StoreCache:
    """Index tensors derived from a set of stores for one layer (what a step's rows on them read), kept across
    steps (a running batch rarely changes its stores); at most `size` entries, the oldest dropped first. An
    entry holds its stores, so a store dropped by the engine is never mistaken for a new one at the same
    address. `build(stores, layer, device)` makes an entry (`step_decode.PrefixPages.of`,
    `token_decode.RunIndex.of`)."""

    def __init__(self, build: Callable[[tuple[PagedStore, ...], int, torch.device], object], size: int = 256) -> None:
        self.build = build
        self.size = size
        self._entries: dict[tuple, tuple[tuple[PagedStore, ...], object]] = {}

    def get(self, stores: tuple[PagedStore, ...], layer: int, device: torch.device):
        key = (tuple(id(s) for s in stores), layer, device)
        got = self._entries.get(key)
        if got is not None and all(a is b for a, b in zip(got[0], stores, strict=True)):
            return got[1]
        value = self.build(stores, layer, device)
        if len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (stores, value)
        return value


def page_rows(view: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Pages `(blocks[i], head slot slots[i])` of a token-major `[num_blocks, page_size, H, D]` view, as
    `[P, page_size, D]`. Pages of one token (SGLang's token pool) of a contiguous buffer are one `index_select`
    of rows `block * H + slot` of the flat `[num_blocks * H, D]` buffer: on CPU about 4x faster than the
    advanced indexing `view[blocks, :, slots]` (measured at a 135M model's shapes), the same values."""
    n, ps, h, d = view.shape
    if ps == 1 and view.is_contiguous():
        return view.view(n * h, d).index_select(0, blocks * h + slots).view(-1, 1, d)
    return view[blocks, :, slots]


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
