# SPDX-License-Identifier: Apache-2.0
"""Requests on head-page stores attend through vLLM's own CPU attention kernel, reading the pages in place.

vLLM's CPU cache of a layer is `[num_blocks, H_kv, block_size, 2 * D]` (ISA `vec`, `layout.py`), and all
layers' views lie in one allocation, a constant stride apart (`vllm.v1.worker.utils.allocate_kv_cache`).
So a head page (one KV head's `[block_size, 2 * D]` slice of one block of one layer) is one block of a
cache with ONE KV head viewed over the whole allocation: page `(layer l, block b, head slot s)` is block
`l * pages_per_layer + b * H_kv + s` of `FlatPages`' views.

A request on a compacted prefix then attends, for each KV head h, as one "virtual request" of that
one-head cache: its G query heads of h over the block table

    [the pages of run (layer, h)] + [head h's slice of each of its own blocks],

seq_len = run length + own tokens (runs are whole pages in vLLM: `store.select_runs` rounds them to the
block size), causal as vLLM computes it (the run precedes every query; own tokens are causal). One kernel
call per layer serves every row on every store, decode and prefill; the engine's own work partitioning
(`get_scheduler_metadata`) and vectorized kernel do the rest. The keys carry their RoPE rotation from their
original positions, so no position is needed. The result is exactly the softmax over the kept pairs and
the own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvzip_plugin.paged_store import PagedStore

KERNEL_NAME = "vLLM's CPU attention kernel"


@dataclass(frozen=True)
class FlatPages:
    """Every head page of every layer as one block of a one-KV-head cache.

    Attributes:
        key_cache, value_cache: `[n_pages, 1, block_size, D]` views as vLLM's CPU kernel takes them.
        pages_per_layer: page index distance between the same (block, head) of consecutive layers.
        n_kv_heads, block_size, head_size: the layers' shapes.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    pages_per_layer: int
    n_kv_heads: int
    block_size: int
    head_size: int

    @property
    def key_pages(self) -> torch.Tensor:
        """`[n_pages, D, block_size]`: each page's keys as vLLM's CPU cache holds them (transposed: a
        token's key is a column), the view torch reads them through (`cpu_cascade.py`)."""
        page = 2 * self.block_size * self.head_size
        return self.key_cache.as_strided((self.key_cache.shape[0], self.head_size, self.block_size),
                                         (page, self.block_size, 1))

    @classmethod
    def of(cls, kv_caches: Sequence[torch.Tensor], n_kv_heads: int, block_size: int, head_size: int
           ) -> FlatPages | None:
        """The views over `kv_caches` (layer order, each `[num_blocks, H_kv, block_size, 2D]` contiguous, ISA
        `vec`); None where the layers do not lie in one allocation a whole number of pages apart (the caller
        keeps the torch path)."""
        if not kv_caches:
            return None
        first = kv_caches[0]
        page = block_size * 2 * head_size  # elements of one head page
        page_bytes = page * first.element_size()
        storage = first.untyped_storage().data_ptr()
        if any(kv.dtype != first.dtype or kv.shape != first.shape or not kv.is_contiguous()
               or kv.untyped_storage().data_ptr() != storage for kv in kv_caches):
            return None
        layer_pages = first.shape[0] * n_kv_heads
        stride = kv_caches[1].data_ptr() - first.data_ptr() if len(kv_caches) > 1 else layer_pages * page_bytes
        if stride % page_bytes or stride < layer_pages * page_bytes or any(  # a whole number of pages, no overlap
                kv.data_ptr() - first.data_ptr() != i * stride for i, kv in enumerate(kv_caches)):
            return None
        per_layer = stride // page_bytes
        n_pages = (len(kv_caches) - 1) * per_layer + layer_pages
        if n_pages >= 2 ** 31:
            return None  # block ids are int32
        flat = torch.as_strided(first, (n_pages, 1, 2 * block_size, head_size), (page, page, head_size, 1))
        key_cache, value_cache = flat.chunk(2, dim=2)
        return cls(key_cache, value_cache, per_layer, n_kv_heads, block_size, head_size)


def store_tables(store: PagedStore, flat: FlatPages, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The store's runs as flat page ids: `[layers, H_kv, max_pages]` int64 (run order, 0 past a run) and
    `[layers, H_kv]` pages of each run; cached on the store. None when a run ends in a partly used page
    (the own tokens must start on a page boundary of the virtual sequence)."""
    def build() -> tuple[torch.Tensor, torch.Tensor] | None:
        ps = store.layout.page_size
        lengths = store.layout.lengths.long()  # [layers, H]
        if not bool((lengths % ps == 0).all()):
            return None
        n_pages = lengths // ps
        h = flat.n_kv_heads
        table = torch.zeros(store.layout.n_layers, h, max(int(n_pages.max()), 1), dtype=torch.long)
        for layer, lr in enumerate(store.layers):
            first = torch.tensor(lr.starts, dtype=torch.long) // ps  # first page of each head's run, head-major
            for g in lr.gathers:
                page_ids = g.buffer * flat.pages_per_layer + g.blocks * h + g.slots
                table[layer, g.heads, g.rows - first[g.heads]] = page_ids
        return table.to(device), n_pages.to(device)
    return store.cached(("vllm_cpu_kernel", device), build)


def own_page_ids(block_table: torch.Tensor, table_rows: Sequence[int], first: torch.Tensor, n_own: torch.Tensor,
                 n_layers: int, flat: FlatPages) -> torch.Tensor:
    """Flat page ids `[R, layers, H_kv, max own blocks]` of the rows' own tokens: row `i`'s own blocks are
    columns `first[i]:` of `block_table[table_rows[i]]` (`n_own[i]` tokens, >= 1); a row with fewer blocks
    repeats its last one (a real page, never read: the row's length stops before it)."""
    dev = block_table.device
    bs, h = flat.block_size, flat.n_kv_heads
    n_blocks = (n_own + bs - 1) // bs
    cols = torch.arange(int(n_blocks.max()), device=dev)
    src = first.unsqueeze(1) + torch.minimum(cols.unsqueeze(0), (n_blocks - 1).clamp_min(0).unsqueeze(1))
    own = block_table[torch.tensor(list(table_rows), dtype=torch.long, device=dev).unsqueeze(1), src].long()
    layer_off = torch.arange(n_layers, device=dev) * flat.pages_per_layer
    return (own.view(own.shape[0], 1, 1, -1) * h + torch.arange(h, device=dev).view(1, 1, -1, 1)
            + layer_off.view(1, -1, 1, 1))


class RowTables:
    """A store's per-request block tables for vLLM's kernel, kept between steps: `[layers, H_kv, cap, W + own_cap]`
    int32, the row of request `i` for KV head `h` in layer `l` = the run's pages (`store_tables`, fixed) then the
    request's own pages. A step writes only its rows' own pages (a few per row) instead of building the whole
    table: at 32 requests on a 7,680-token prefix that build took ~10 ms per step on the 2-core CPU. Grows
    (doubling) when a step has more rows or own blocks than it holds."""

    def __init__(self, runs: torch.Tensor, run_pages: torch.Tensor) -> None:
        self.runs = runs.to(torch.int32)  # [layers, H, W]
        self.run_pages = run_pages  # [layers, H] int64
        self.table = torch.zeros(runs.shape[0], runs.shape[1], 0, runs.shape[2], dtype=torch.int32,
                                 device=runs.device)

    def rows(self, own_pages: torch.Tensor) -> torch.Tensor:
        """`own_pages`: `[R, layers, H, n]` flat page ids of R rows' own blocks (`own_page_ids`). Returns the
        tables `[layers, H, R, W']` of the R rows (a view of the kept buffer, valid until the next call)."""
        r, _, _, n = own_pages.shape
        width = self.runs.shape[-1]
        cap, own_cap = self.table.shape[2], self.table.shape[-1] - width
        if r > cap or n > own_cap:
            cap, own_cap = max(r, 2 * cap), max(n, 2 * own_cap, 4)
            self.table = torch.zeros(self.runs.shape[0], self.runs.shape[1], cap, width + own_cap, dtype=torch.int32,
                                     device=self.runs.device)
            self.table[..., :width] = self.runs.unsqueeze(2)
        rows = self.table[:, :, :r]
        cols = self.run_pages.view(*self.run_pages.shape, 1, 1) + torch.arange(n, device=own_pages.device)
        rows.scatter_(3, cols.expand(-1, -1, r, -1), own_pages.permute(1, 2, 0, 3).to(torch.int32))
        return rows


def row_tables(store: PagedStore, flat: FlatPages, device: torch.device) -> RowTables | None:
    """The store's `RowTables` (one per store and device); None where `store_tables` cannot address its runs."""
    def build() -> RowTables | None:
        got = store_tables(store, flat, device)
        return None if got is None else RowTables(*got)
    return store.cached(("vllm_cpu_kernel_rows", device), build)


@dataclass(frozen=True)
class KernelStep:
    """A step's rows on head-page stores as virtual requests of the one-head cache, planned once per step.

    Virtual requests go store by store, and within a store KV head by KV head (head 0 of every row, then head
    1, ...): the requests that read the same run follow each other, so the run is still in the cores' caches
    when the next one reads it. On the 2-core CPU (SmolLM2's `pair` plan at 7,680 tokens) vLLM's kernel took
    0.93x / 0.99x the time of `head`'s call at 8 / 32 requests in this order, 1.14x / 1.08x row by row.

    Attributes:
        tokens, heads: `[N]` token index in the step and KV head of every virtual query row (virtual request
            by virtual request): the queries are `q.view(T, H_kv, G, D)[tokens, heads]`.
        query_start_loc: `[V + 1]` int32.
        tables: `[layers, V, W]` int32 block tables (rows contiguous); seq_lens `[layers, V]` int32.
        split_kv: vLLM's own CPU backend setting (`VLLM_CPU_ATTN_SPLIT_KV`), read once per step.
    """

    tokens: torch.Tensor
    heads: torch.Tensor
    query_start_loc: torch.Tensor
    tables: torch.Tensor
    seq_lens: torch.Tensor
    split_kv: bool

    @classmethod
    def plan(cls, groups: Sequence[tuple[PagedStore, Sequence[tuple[int, int, int, int]]]], block_table: torch.Tensor,
             flat: FlatPages, device: torch.device) -> KernelStep | None:
        """Args:
            groups: per store, its rows as `(q_start, q_end, own tokens, row of block_table)`.
            block_table: the step's `[rows, max_blocks]` block table; a row's own blocks follow its store's
                `layout.n_blocks` blocks.

        A few torch ops per store whatever the number of rows (no per-row torch op); the run part of the
        tables is kept on the store (`RowTables`). None when a store's runs cannot be read this way."""
        from vllm import envs as vllm_envs

        h, bs = flat.n_kv_heads, flat.block_size
        tables, seq_lens, v_start, v_len, v_head = [], [], [], [], []
        for store, rows in groups:
            kept = row_tables(store, flat, device)
            if kept is None:
                return None
            n_layers, r = kept.runs.shape[0], len(rows)
            own_t = torch.tensor([own for _, _, own, _ in rows], dtype=torch.long, device=device)  # [R]
            first = torch.full((r,), store.layout.n_blocks, dtype=torch.long, device=device)
            own_pages = own_page_ids(block_table, [row for *_, row in rows], first, own_t, n_layers, flat)
            tab = kept.rows(own_pages)  # [layers, H, R, W]
            tables.append(tab.reshape(n_layers, h * r, tab.shape[-1]))  # virtual request h * R + i
            seq_lens.append((kept.run_pages.unsqueeze(-1) * bs + own_t).reshape(n_layers, h * r))
            v_start.append(torch.tensor([qs for qs, _, _, _ in rows], dtype=torch.long, device=device).repeat(h))
            v_len.append(torch.tensor([qe - qs for qs, qe, _, _ in rows], dtype=torch.long, device=device).repeat(h))
            v_head.append(torch.arange(h, device=device).repeat_interleave(r))
        if len(tables) == 1:
            table = tables[0]
        else:  # one table for every store's rows
            width = max(t.shape[-1] for t in tables)
            table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tables], 1)
        q_lens, starts, heads = torch.cat(v_len), torch.cat(v_start), torch.cat(v_head)  # [V]
        qsl = torch.zeros(q_lens.numel() + 1, dtype=torch.long, device=device)
        qsl[1:] = torch.cumsum(q_lens, 0)
        virtual = torch.repeat_interleave(torch.arange(q_lens.numel(), device=device), q_lens)  # [N]
        tokens = starts[virtual] + (torch.arange(virtual.numel(), device=device) - qsl[virtual])
        return cls(tokens, heads[virtual], qsl.to(torch.int32), table.contiguous(),
                   torch.cat(seq_lens, 1).to(torch.int32).contiguous(), bool(vllm_envs.VLLM_CPU_ATTN_SPLIT_KV))

    def attend(self, layer: int, q_all: torch.Tensor, out_all: torch.Tensor, flat: FlatPages, scale: float) -> None:
        """Overwrite the rows' outputs of `layer` (`q_all`, `out_all`: the step's `[T, H_q, D]`) with their
        attention over their store's runs and their own tokens, in one call of vLLM's CPU kernel."""
        from vllm import _custom_ops as ops

        t, h_q, d = q_all.shape
        h = flat.n_kv_heads
        g = h_q // h
        q = q_all.view(t, h, g, d)[self.tokens, self.heads]  # [N, G, D]
        out = torch.empty_like(q)
        seq_lens = self.seq_lens[layer]
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=g, num_kv_heads=1, head_dim=d, seq_lens=seq_lens, dtype=q.dtype,
            query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1, isa="vec",
            enable_kv_split=self.split_kv)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=flat.key_cache, value_cache=flat.value_cache, output=out,
            query_start_loc=self.query_start_loc, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=self.tables[layer], softcap=0.0, scheduler_metadata=meta, s_aux=None)
        out_all.view(t, h, g, d)[self.tokens, self.heads] = out.to(out_all.dtype)
