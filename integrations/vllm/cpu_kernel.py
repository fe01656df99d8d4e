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


@dataclass(frozen=True)
class KernelStep:
    """A step's rows on head-page stores as virtual requests of the one-head cache, planned once per step.

    Attributes:
        tokens, heads: `[N]` token index in the step and KV head of every virtual query row (virtual request
            by virtual request): the queries are `q.view(T, H_kv, G, D)[tokens, heads]`.
        query_start_loc: `[V + 1]` int32.
        tables: `[layers, V, W]` int32 block tables; seq_lens `[layers, V]` int32.
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

        A few torch ops per step whatever the number of rows (no per-row torch op). None when a store's
        runs cannot be read this way (`store_tables`)."""
        from vllm import envs as vllm_envs

        h, bs = flat.n_kv_heads, flat.block_size
        run_tabs = []
        for store, _ in groups:
            got = store_tables(store, flat, device)
            if got is None:
                return None
            run_tabs.append(got)
        n_layers = run_tabs[0][0].shape[0]
        width = max(tab.shape[-1] for tab, _ in run_tabs)
        runs = torch.zeros(len(groups), n_layers, h, width, dtype=torch.long, device=device)  # [S, layers, H, W]
        for s, (tab, _) in enumerate(run_tabs):
            runs[s, ..., :tab.shape[-1]] = tab
        run_pages = torch.stack([n for _, n in run_tabs])  # [S, layers, H]
        first = torch.tensor([store.layout.n_blocks for store, _ in groups], dtype=torch.long,
                             device=device)  # [S] a row's first own column: its store's blocks come before
        # per row: store, query span, own tokens, table row (Python ints, one pass)
        store_of, q_start, q_len, n_own, table_row = [], [], [], [], []
        for s, (_, rows) in enumerate(groups):
            for qs, qe, own, row in rows:
                store_of.append(s)
                q_start.append(qs)
                q_len.append(qe - qs)
                n_own.append(own)
                table_row.append(row)
        sel = torch.tensor(store_of, dtype=torch.long, device=device)
        own_t = torch.tensor(n_own, dtype=torch.long, device=device)  # [R]
        own_pages = own_page_ids(block_table, table_row, first[sel], own_t, n_layers, flat)
        n_own_max = own_pages.shape[-1]
        cols = torch.arange(n_own_max, device=device)
        pages = run_pages[sel]  # [R, layers, H]
        tab = torch.zeros(len(store_of), n_layers, h, width + n_own_max, dtype=torch.long, device=device)
        tab[..., :width] = runs[sel]
        tab.scatter_(3, pages.unsqueeze(-1) + cols, own_pages)  # the own pages right after the run's
        n_virtual = len(store_of) * h  # virtual request r * H + head
        tables = tab.permute(1, 0, 2, 3).reshape(n_layers, n_virtual, width + n_own_max)
        seq_lens = (pages * bs + own_t.view(-1, 1, 1)).permute(1, 0, 2).reshape(n_layers, n_virtual)
        q_lens = torch.tensor(q_len, dtype=torch.long, device=device).repeat_interleave(h)  # [V]
        qsl = torch.zeros(n_virtual + 1, dtype=torch.long, device=device)
        qsl[1:] = torch.cumsum(q_lens, 0)
        virtual = torch.repeat_interleave(torch.arange(n_virtual, device=device), q_lens)  # [N]
        tokens = torch.tensor(q_start, dtype=torch.long, device=device)[virtual // h] + (
            torch.arange(virtual.numel(), device=device) - qsl[virtual])
        return cls(tokens, virtual % h, qsl.to(torch.int32), tables.to(torch.int32).contiguous(),
                   seq_lens.to(torch.int32).contiguous(), bool(vllm_envs.VLLM_CPU_ATTN_SPLIT_KV))

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
