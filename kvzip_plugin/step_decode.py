# SPDX-License-Identifier: Apache-2.0
"""One attention pass per layer for the decode rows of every head-page store in a step (torch path).

`prefix_attention.attend_rows` serves one store at a time, a few dozen torch ops per store and layer; a
step whose requests sit on several compacted prefixes (the multi-tenant case) pays that once per store,
and a small model's decode step is bound by the count of ops, not by bytes or flops. Here the decode rows
of a step on all its stores attend in one pass per layer:

* every page they read is listed once: each store's head pages of this layer (shared by all the step's
  requests on that store, so a prefix is read once per step) and each request's own pages (its own
  tokens, the newest included, in its own blocks of this layer's buffer);
* every page is one batch element of a fused attention call (`prefix_attention.attend`; one call for the
  stores' pages, one for the own pages), attended by the query rows of the requests that read it: up to
  M requests x G query heads of its KV head;
* each (request, query head)'s softmax is formed over all of its pages from the pages' partial outputs
  and log-sum-exps (a max, weights and sums added per row): the softmax over the union, exactly.

The op count per layer does not grow with the number of stores. Measured against `attend_rows` on one
store (`benchmarks/bench_prefix_attention.py`, CPU, SmolLM2 shapes, pages of 32): about as fast for a few
query rows per store, up to 2x slower for many (32 requests): each page's partial output is a row of its
own. So a store takes this pass while its decode rows are few (`one_pass`), `attend_rows` beyond (its
runs copied once, one call per KV head). With pages of one token (SGLang's token pool) every kept pair
would be a page: 2-8x slower than `attend_rows` per store, so SGLang's decode rows take `token_decode.py`
(each (row, KV head) a padded run of elements of the flat buffers) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvzip_plugin.paged_store import PagedStore, PageReader, StoreCache
from kvzip_plugin.prefix_attention import PAGE_ROWS_MAX, attend, length_mask

_NEG_INF = float("-inf")


def one_pass(n_requests: int, group: int) -> bool:
    """Whether a store's `n_requests` decode rows (`group` query heads per KV head) take the one pass:
    while each of its pages is read by at most `PAGE_ROWS_MAX` query rows."""
    return n_requests * group <= PAGE_ROWS_MAX


@dataclass(frozen=True)
class PrefixPages:
    """One layer's head pages of a set of stores, listed once, buffer by buffer.

    Attributes:
        reads: `(buffer, blocks [P_b], head slots [P_b])` per buffer the pages lie in.
        store: `[P]` the store (index in the set) of each page, in the order of `reads`.
        head: `[P]` its KV head.
        mask: `[P, 1, 1, page_size]` additive mask of its unused tail (`length_mask`).
    """

    reads: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]
    store: torch.Tensor
    head: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, stores: Sequence[PagedStore], layer: int, device: torch.device) -> PrefixPages:
        by_buffer: dict[int, list[tuple[int, object]]] = {}
        for i, store in enumerate(stores):
            for g in store.gathers_on(layer, device):
                by_buffer.setdefault(g.buffer, []).append((i, g))
        reads, owner, head, valid = [], [], [], []
        for buf, members in by_buffer.items():
            reads.append((buf, torch.cat([g.blocks for _, g in members]), torch.cat([g.slots for _, g in members])))
            owner += [torch.full_like(g.heads, i) for i, g in members]
            head += [g.heads for _, g in members]
            valid += [g.valid for _, g in members]
        empty = torch.zeros(0, dtype=torch.long, device=device)
        ps = stores[0].layout.page_size
        return cls(tuple(reads), torch.cat(owner) if owner else empty, torch.cat(head) if head else empty,
                   length_mask(torch.cat(valid) if valid else empty, ps))


def PrefixPageCache(size: int = 256) -> StoreCache:  # noqa: N802 - names what the cache holds
    """`PrefixPages` by (set of stores, layer, device), kept across steps (`paged_store.StoreCache`)."""
    return StoreCache(PrefixPages.of, size)


@dataclass(frozen=True)
class DecodeStep:
    """A step's decode rows on head-page stores (one query each), planned once per step.

    Attributes:
        stores: the S stores they are on.
        decode_q: `[R]` token index of each row's query in the step.
        members: `[S, M]` the rows (index in `decode_q`) on each store, -1 past its last.
        own_blocks, own_slots: `[Po]` engine block and head slot of every own page of every row (row by
            row, page by page, head by head), in this layer's buffer.
        own_units: `[Po]` the (row, KV head) unit, row x H_kv + head, reading each own page.
        own_mask: `[Po, 1, 1, page_size]` additive mask of each own page's unused tail.
        n_kv_heads: H_kv.
        cache: where the stores' pages of each layer are listed (kept across steps).
    """

    stores: tuple[PagedStore, ...]
    decode_q: torch.Tensor
    members: torch.Tensor
    own_blocks: torch.Tensor
    own_slots: torch.Tensor
    own_units: torch.Tensor
    own_mask: torch.Tensor
    n_kv_heads: int
    cache: StoreCache

    @classmethod
    def plan(cls, stores: Sequence[PagedStore], rows_of: Sequence[Sequence[int]], decode_q: torch.Tensor,
             own_lens: torch.Tensor, own_block_rows: torch.Tensor, n_kv_heads: int, page_size: int,
             cache: StoreCache) -> DecodeStep:
        """Args:
            stores: the S stores; rows_of: per store, the decode rows (indices into `decode_q`) on it.
            decode_q: `[R]` query token index of each row; own_lens: `[R]` its own tokens (>= 1, the
                newest included).
            own_block_rows: `[R, n]` the engine blocks holding each row's own tokens, in order (n >= its
                own pages; the rest is never read).
        """
        dev = own_block_rows.device
        r, h = int(decode_q.numel()), n_kv_heads
        m = max(len(x) for x in rows_of)
        members = torch.full((len(stores), m), -1, dtype=torch.long)
        for i, rows in enumerate(rows_of):
            members[i, :len(rows)] = torch.tensor(list(rows), dtype=torch.long)
        n_pages = (own_lens + page_size - 1) // page_size  # [R]
        row = torch.repeat_interleave(torch.arange(r), n_pages * h)  # (row, page, head) flattened
        first = torch.repeat_interleave(torch.cumsum(n_pages * h, 0) - n_pages * h, n_pages * h)
        within = torch.arange(int(row.numel())) - first
        page, head = within // h, within % h
        valid = torch.clamp(own_lens[row] - page * page_size, max=page_size)
        return cls(tuple(stores), decode_q.to(dev), members.to(dev),
                   own_block_rows[row.to(dev), page.to(dev)].long(), head.to(dev), (row * h + head).to(dev),
                   length_mask(valid, page_size).to(dev), h, cache)

    def attend(self, layer: int, q_all: torch.Tensor, out_all: torch.Tensor, pages: PageReader,
               scale: float) -> None:
        """Overwrite the decode rows' outputs of `layer` with their attention over their store's runs and
        their own tokens (one softmax).

        Args:
            layer: layer index (the stores' runs of it; the rows' own pages lie in its buffer).
            q_all, out_all: the step's `[num_tokens, H_q, D]` queries and attention output (in place).
            pages: the engine's read of head pages `(buffer, blocks, slots) -> keys, values [P, page, D]`.

        Two fused attention calls: the stores' pages (each read by up to M requests' G query rows) and the
        rows' own pages (each read by its request's G rows); their partial softmaxes then form every row's.
        """
        dev = q_all.device
        h_kv = self.n_kv_heads
        h_q, d = q_all.shape[1], q_all.shape[2]
        g = h_q // h_kv
        r = int(self.decode_q.numel())
        units = r * h_kv  # (row, KV head) pairs; `units` itself is the dump for padding readers
        heads_g = torch.arange(g, device=dev)
        q_units = q_all[self.decode_q].reshape(units, g, d)
        k, v = pages(layer, self.own_blocks, self.own_slots)  # [Po, page, D]
        out, lse = attend(q_units[self.own_units].unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), self.own_mask, scale)
        outs, lses = [out.view(-1, d)], [lse.view(-1)]
        targets = [(self.own_units.unsqueeze(-1) * g + heads_g).view(-1)]
        pre = self.cache.get(self.stores, layer, dev)
        if pre.reads:
            keys, values = [], []
            for buf, blocks, slots in pre.reads:
                k, v = pages(buf, blocks, slots)
                keys.append(k)
                values.append(v)
            mu = self.members[pre.store]  # [P, M] rows reading each page (-1: padding)
            readers = torch.where(mu >= 0, mu * h_kv + pre.head.view(-1, 1), units)
            n_pages, m = readers.shape
            q = torch.cat([q_units, q_units.new_zeros((1, g, d))])[readers].view(n_pages, 1, m * g, d)
            out, lse = attend(q, torch.cat(keys).unsqueeze(1), torch.cat(values).unsqueeze(1), pre.mask, scale)
            outs.append(out.view(-1, d))
            lses.append(lse.view(-1))
            targets.append((readers.unsqueeze(-1) * g + heads_g).view(-1))
        target, lse, out = torch.cat(targets), torch.cat(lses), torch.cat(outs)
        rows = (units + 1) * g
        top = torch.full((rows,), _NEG_INF, device=dev).scatter_reduce_(0, target, lse, "amax")
        w = torch.exp(lse - top[target])
        den = torch.zeros((rows,), device=dev).index_add_(0, target, w)
        num = torch.zeros((rows, d), device=dev).index_add_(0, target, out * w.unsqueeze(-1))
        res = num[:units * g] / den[:units * g].unsqueeze(-1)  # [(row, KV head, g), D] = [R * H_q, D]
        out_all[self.decode_q] = res.view(r, h_q, d).to(out_all.dtype)
