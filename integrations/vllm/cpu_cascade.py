# SPDX-License-Identifier: Apache-2.0
"""Many decode requests on one head-page store attend to its runs in one pass per layer (the cascade), on
vLLM's CPU backend.

vLLM's CPU kernel (`cpu_kernel.py`) reads a request's prefix by itself: with many requests on one store,
every run is read again for every request. Here a store's decode rows read each run once: the layer's runs
are gathered from the pool's pages and every KV head's `G x R` query rows take two GEMMs over its run, their
own tokens joining the same softmax (`prefix_attention.segment_decode_attention`). The gathers and the
per-layer torch ops cost more than the kernel's rereads until many rows share the store and its runs are long
(the kernel rereads short runs from the core's cache), so a store takes the cascade from `CASCADE_MIN_ROWS`
query rows per KV head and `CASCADE_MIN_RUN` tokens per run on average; its prefill rows and the other stores'
rows keep the kernel.

Pages are read through `FlatPages` (every head page of every layer as one block of a one-KV-head cache):
a page's keys are `[D, block_size]` (transposed, as vLLM stores them), its values `[block_size, D]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kvzip_plugin.integrations.vllm.cpu_kernel import FlatPages, own_page_ids, store_tables

from kvzip_plugin import envs
from kvzip_plugin.paged_store import PagedStore
from kvzip_plugin.prefix_attention import length_mask, own_positions, segment_decode_attention

CASCADE_NAME = "torch, a store's decode rows reading its runs once (the cascade)"
CASCADE_MIN_ROWS = 84
"""Query rows per KV head (G x decode requests on the store) from which a store's decode rows take the cascade.
Measured with SmolLM2 (G = 3) at 7,680 tokens on the 2-core CPU, attention of a whole step against vLLM's kernel
over the same head pages (`bench_cpu_kernel.py`, `benchmarks/README.md`, 2026-12-05, after the kernel path kept
its tables on the store): the cascade took 1.18x / 1.20x the kernel's time at 24 requests (72 rows, two runs),
1.09x / 1.03x at 16 (48) and 1.23x at 8, but 0.77x at 28 (84) and 0.77x / 0.97x at 32 (96, two days)."""


CASCADE_MIN_RUN = 2048
"""Mean run length (kept tokens per (layer, KV head)) from which a store takes the cascade. Shorter runs stay in a
core's cache between the requests that read them, and vLLM's kernel reads them faster than the cascade's gathers
and per-layer ops: measured (`benchmarks/README.md`) at 32 requests, a 2,048-token prefix at ratio 0.3 (runs of
672 tokens on average) took 1.01x the full prefix's step with the cascade against 0.80x for `head`; a 7,680-token
prefix (2,336) 0.41-0.44x with it against 0.45-0.46x without."""


def takes_cascade(n_decode: int, group: int, mean_run: float) -> bool:
    """Whether a store's `n_decode` decode rows (G = `group` query heads per KV head) take the cascade, its runs
    holding `mean_run` tokens on average (`KVZIP_CPU_CASCADE` may force either way)."""
    mode = envs.cpu_cascade()
    if n_decode == 0 or mode == "never":
        return False
    return mode == "always" or (n_decode * group >= CASCADE_MIN_ROWS and mean_run >= CASCADE_MIN_RUN)


@dataclass(frozen=True)
class _Runs:
    """One layer's runs of a store as flat page ids, head-major (head 0's pages in order, then head 1's, ...)."""

    pages: torch.Tensor  # [P] int64
    starts: list[int]
    lengths: list[int]


def store_runs(store: PagedStore, flat: FlatPages, device: torch.device) -> tuple[_Runs, ...] | None:
    """Every layer's runs of `store` as `_Runs` (cached on the store); None where `store_tables` cannot
    address them (a run ending in a partly used page)."""
    def build() -> tuple[_Runs, ...] | None:
        got = store_tables(store, flat, device)
        if got is None:
            return None
        table, n_pages = got  # [layers, H, W], [layers, H]
        out = []
        for layer in range(table.shape[0]):
            counts = n_pages[layer].tolist()
            lengths = [n * flat.block_size for n in counts]
            out.append(_Runs(torch.cat([table[layer, h, :n] for h, n in enumerate(counts)]),
                             [sum(lengths[:h]) for h in range(len(lengths))], lengths))
        return tuple(out)
    return store.cached(("vllm_cpu_cascade", device), build)


@dataclass(frozen=True)
class CascadeGroup:
    """A store's decode rows of a step, planned once per step.

    Attributes:
        runs: per layer, the store's runs (`store_runs`).
        tokens: the rows' query tokens in the step: a slice where they follow each other, else `[R]` indices.
        own_pages: `[layers, R, H_kv, T]` flat page id of each of the rows' own tokens, padded to the longest
            by repeating a row's newest token (real, finite numbers, masked).
        own_offsets: `[R, 1, T]` each own token's offset in its page.
        own_mask: `[R, 1, 1, T]` additive mask of the padding.
    """

    runs: tuple[_Runs, ...]
    tokens: torch.Tensor | slice
    own_pages: torch.Tensor
    own_offsets: torch.Tensor
    own_mask: torch.Tensor

    @classmethod
    def plan(cls, store: PagedStore, rows: Sequence[tuple[int, int, int]], block_table: torch.Tensor,
             flat: FlatPages, device: torch.device) -> CascadeGroup | None:
        """`rows`: the store's decode rows as `(query token, own tokens, row of block_table)`; a row's own blocks
        follow the store's `layout.n_blocks` in its block-table row. None where the runs are not whole pages."""
        runs = store_runs(store, flat, device)
        if runs is None:
            return None
        n_own = torch.tensor([own for _, own, _ in rows], dtype=torch.long, device=device)
        first = torch.full((len(rows),), store.layout.n_blocks, dtype=torch.long, device=device)
        own = own_page_ids(block_table, [row for _, _, row in rows], first, n_own, len(runs), flat)  # [R, l, H, n]
        pos = own_positions(n_own)  # [R, T]
        r, n_layers, h, _ = own.shape
        t = pos.shape[1]
        pages = own.gather(3, (pos // flat.block_size).view(r, 1, 1, t).expand(r, n_layers, h, t))
        tokens = [q for q, _, _ in rows]
        if tokens == list(range(tokens[0], tokens[0] + len(tokens))):  # one span of the step (the usual case)
            index: torch.Tensor | slice = slice(tokens[0], tokens[0] + len(tokens))
        else:
            index = torch.tensor(tokens, dtype=torch.long, device=device)
        return cls(runs, index, pages.permute(1, 0, 2, 3).contiguous(), (pos % flat.block_size).view(r, 1, t),
                   length_mask(n_own, t))

    def attend(self, layer: int, q_all: torch.Tensor, out_all: torch.Tensor, flat: FlatPages, scale: float) -> None:
        """Overwrite the rows' outputs of `layer` (`q_all`, `out_all`: the step's `[T, H_q, D]`) with their
        attention over the store's runs and their own tokens."""
        d = flat.head_size
        runs = self.runs[layer]
        key_pages, value_pages = flat.key_pages, flat.value_cache[:, 0]  # [n, D, bs], [n, bs, D]
        keys_t = key_pages.index_select(0, runs.pages).transpose(0, 1).reshape(d, -1)  # [D, N]
        values = value_pages.index_select(0, runs.pages).view(-1, d)  # [N, D]
        pages = self.own_pages[layer]  # [R, H, T]
        own_k_t = key_pages[pages, :, self.own_offsets].transpose(-1, -2)  # [R, H, D, T]
        own_v = value_pages[pages, self.own_offsets]  # [R, H, T, D]
        out_all[self.tokens] = segment_decode_attention(q_all[self.tokens], keys_t, values, runs.starts, runs.lengths,
                                                        own_k_t, own_v, self.own_mask, scale).to(out_all.dtype)
