# SPDX-License-Identifier: Apache-2.0
"""Decode rows on stores of one-token head pages (SGLang's token pool), every row of a step in one attention.

With pages of one token a kept pair is one `(slot, head slot)` element of a layer buffer `[slots, H_kv, D]`,
i.e. one row of the flat `[slots * H_kv, D]` buffer. `prefix_attention.attend_rows` serves one store at a
time (read the runs, one attention per KV head over its run, the own tokens, a log-sum-exp merge: about 25
torch ops per store and layer), and a small model's decode step on CPU is bound by that count, not by bytes:
with a request on each of four tenants' prefixes the step paid four times the ops and decoded ~1.2x slower
than SGLang reading the full prefixes (`benchmarks/results/engine-clients-sglang-cpu-capacity.md`).

Here every decode row of a step, on any store, attends in ONE pass per layer, as a "virtual request" per
(row, KV head): its G query heads over

    [the elements of its store's run of (layer, head), buffer by buffer] + [its own tokens' elements of head h],

padded to the longest (row, head) of the step and masked. Per layer: one `index_select` of keys and one of
values per buffer the rows' runs lie in and for the own tokens, one `cat`, one fused attention, one write;
the index of each buffer's part is built once per (rows' stores, layer) and kept across steps, the own part
once per step. The result is exactly the softmax over the kept pairs and the own tokens (their order does
not matter; keys carry their RoPE rotation from their original positions). The price is the padding: a
(row, head) with a short run reads the longest run's count of (masked) elements; never more than the full
prefix's, which SGLang's own loop reads per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvzip_plugin.paged_store import PagedStore, StoreCache
from kvzip_plugin.prefix_attention import attend, length_mask

_NEG_INF = float("-inf")

FlatViews = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Buffer (layer) index -> its keys and values as flat `[slots * H_kv, D]` views (element `slot * H_kv + h`)."""


@dataclass(frozen=True)
class RunIndex:
    """One layer's runs of a step's rows, buffer by buffer.

    Attributes:
        parts: `(buffer, elements [R * H_kv * T_b])` per buffer: row r, head h's run elements in that buffer
            at `[r, h, :n]`, the rest padding (a real element, masked).
        mask: `[R, H_kv, 1, sum T_b]` additive mask of the padding (0 attend, -inf not).
        widths: `T_b` per part.
    """

    parts: tuple[tuple[int, torch.Tensor], ...]
    mask: torch.Tensor
    widths: tuple[int, ...]

    @classmethod
    def of(cls, stores: Sequence[PagedStore], layer: int, n_kv_heads: int, device: torch.device) -> RunIndex:
        """`stores[r]`: the store of row r (repeats allowed)."""
        r_count, h_kv = len(stores), n_kv_heads
        per_row = [_store_runs(store, layer, h_kv) for store in stores]  # row -> buffer -> (elements, valid)
        buffers = list(dict.fromkeys(b for row in per_row for b in row))
        parts, masks, widths = [], [], []
        for b in buffers:
            width = max((row[b][0].shape[1] for row in per_row if b in row), default=0)
            if width == 0:
                continue
            idx = torch.zeros(r_count, h_kv, width, dtype=torch.long)
            valid = torch.zeros(r_count, h_kv, width, dtype=torch.bool)
            for r, row in enumerate(per_row):
                if b in row:
                    elements, ok = row[b]
                    idx[r, :, :elements.shape[1]] = elements
                    valid[r, :, :ok.shape[1]] = ok
            idx = torch.where(valid, idx, idx[valid][0])  # padding reads a real element (finite), masked
            parts.append((b, idx.flatten().to(device)))
            masks.append(torch.zeros(valid.shape).masked_fill_(~valid, _NEG_INF))
            widths.append(width)
        mask = torch.cat(masks, -1) if masks else torch.zeros(r_count, h_kv, 0)
        return cls(tuple(parts), mask.unsqueeze(2).to(device), tuple(widths))


def _store_runs(store: PagedStore, layer: int, n_kv_heads: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One store's runs of `layer`, buffer by buffer: `(elements [H_kv, n], valid [H_kv, n])`, head h's elements
    of that buffer first in its row (built once per store and layer, `PagedStore.cached`)."""
    if store.layout.page_size != 1:
        raise ValueError("token_decode serves stores of one-token pages only")

    def build() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for g in store.gathers_on(layer, torch.device("cpu")):
            per_head = [(g.blocks * n_kv_heads + g.slots)[g.heads == h] for h in range(n_kv_heads)]
            n = max(int(e.numel()) for e in per_head)
            if n == 0:
                continue
            elements = torch.zeros(n_kv_heads, n, dtype=torch.long)
            valid = torch.zeros(n_kv_heads, n, dtype=torch.bool)
            for h, e in enumerate(per_head):
                elements[h, :e.numel()] = e
                valid[h, :e.numel()] = True
            out[g.buffer] = (elements, valid)
        return out

    return store.cached(("token_runs", layer, n_kv_heads), build)


def RunIndexCache(n_kv_heads: int, size: int = 512) -> StoreCache:  # noqa: N802 - names what the cache holds
    """`RunIndex` by (the rows' stores, layer, device), kept across steps (`paged_store.StoreCache`; a decode
    batch keeps its rows for many steps)."""
    return StoreCache(lambda stores, layer, device: RunIndex.of(stores, layer, n_kv_heads, device), size)


@dataclass(frozen=True)
class TokenDecode:
    """A step's decode rows on one-token-page stores, planned once per step.

    Attributes:
        stores: `[R]` the store of each row.
        decode_q: `[R]` token index of each row's query in the step.
        own_elements: `[R * H_kv * T_o]` flat elements of each row's own tokens (the newest included), per
            head, padded with the row's last token.
        own_mask: `[R, 1, 1, T_o]` additive mask of that padding.
        n_kv_heads: H_kv.
        cache: where each layer's `RunIndex` is kept (`RunIndexCache(n_kv_heads)`).
    """

    stores: tuple[PagedStore, ...]
    decode_q: torch.Tensor
    own_elements: torch.Tensor
    own_mask: torch.Tensor
    n_kv_heads: int
    own_width: int
    cache: StoreCache

    @classmethod
    def plan(cls, stores: Sequence[PagedStore], decode_q: torch.Tensor, own_slots: torch.Tensor,
             own_lens: torch.Tensor, n_kv_heads: int, cache: StoreCache) -> TokenDecode:
        """Args:
            stores: the store of each of the R rows; decode_q: `[R]` their query token index in the step.
            own_slots: `[R, T_o]` the token slots of each row's own tokens, padded with a repeat of its last.
            own_lens: `[R]` own tokens of each row (>= 1).
        """
        dev = own_slots.device
        h = torch.arange(n_kv_heads, device=dev).view(1, -1, 1)
        elements = own_slots.long().unsqueeze(1) * n_kv_heads + h  # [R, H_kv, T_o]
        t_o = int(own_slots.shape[1])
        return cls(tuple(stores), decode_q.to(dev), elements.flatten(), length_mask(own_lens.to(dev), t_o),
                   n_kv_heads, t_o, cache)

    def attend(self, layer: int, q_all: torch.Tensor, out_all: torch.Tensor, flat: FlatViews, own_buffer: int,
               scale: float) -> None:
        """Overwrite the rows' output in `out_all` (`[num_tokens, H_q, D]`) with their attention in `layer`.

        Args:
            q_all: the step's queries `[num_tokens, H_q, D]`.
            flat: the flat views of each buffer; own_buffer: the buffer of this layer (the own tokens).
        """
        r, h_kv = int(self.decode_q.numel()), self.n_kv_heads
        dev = q_all.device
        index = self.cache.get(self.stores, layer, dev)
        ks, vs = [], []
        for (buf, elements), width in zip(index.parts, index.widths, strict=True):
            k_flat, v_flat = flat(buf)
            ks.append(k_flat.index_select(0, elements).view(r, h_kv, width, -1))
            vs.append(v_flat.index_select(0, elements).view(r, h_kv, width, -1))
        k_flat, v_flat = flat(own_buffer)
        ks.append(k_flat.index_select(0, self.own_elements).view(r, h_kv, self.own_width, -1))
        vs.append(v_flat.index_select(0, self.own_elements).view(r, h_kv, self.own_width, -1))
        mask = torch.cat([index.mask, self.own_mask.expand(r, h_kv, 1, self.own_width)], -1)
        _, h_q, d = q_all.shape
        q = q_all.index_select(0, self.decode_q).view(r, h_kv, h_q // h_kv, d)
        out, _ = attend(q, torch.cat(ks, 2), torch.cat(vs, 2), mask, scale)  # [R, H_kv, G, D]
        out_all[self.decode_q] = out.reshape(r, h_q, -1).to(out_all.dtype)


def _store_columns(store: PagedStore, layer: int, n_kv_heads: int, device: torch.device
                   ) -> tuple[tuple[tuple[int, torch.Tensor], ...], torch.Tensor]:
    """One store's runs of `layer` as flat elements, buffer by buffer, every head's run in one list (no padding):
    `((buffer, elements [N_b]), ...)` and the KV head of each of the `N = sum N_b` columns they give in that
    order: `_store_runs` without its padding (built once per store, layer and device)."""

    def build() -> tuple[tuple[tuple[int, torch.Tensor], ...], torch.Tensor]:
        parts, heads = [], []
        for buf, (elements, valid) in _store_runs(store, layer, n_kv_heads).items():
            parts.append((buf, elements[valid].to(device)))  # head-major: head 0's elements, then head 1's, ...
            heads.append(torch.arange(n_kv_heads).repeat_interleave(valid.sum(1)))
        col_heads = torch.cat(heads) if heads else torch.zeros(0, dtype=torch.long)
        return tuple(parts), col_heads.to(device)

    return store.cached(("token_columns", layer, n_kv_heads, device), build)


@dataclass(frozen=True)
class EntryDecode:
    """A step's few decode rows on ONE store of one-token pages, every layer in ONE masked attention call.

    The keys of a layer are the store's runs read once (each head's run, buffer by buffer, no padding) followed
    by the rows' own tokens; every query row `(r, h, g)` (request r, query head `h * G + g`) sees the columns of
    its KV head's run and its own tokens of head h (a block mask). That is exactly the softmax over its kept
    pairs and own tokens, computed with `H_kv` times the scores it needs (each row also scores the other heads'
    runs, masked): worth it only for a few rows (`one_pass`), where a decode step of a small model on CPU is
    bound by the op count: about 15 torch ops per layer against ~45 for the per-entry pass (runs copied, then
    two GEMMs and an exponential per KV head, `prefix_attention.segment_decode_attention`).

    Attributes:
        store: the rows' store.
        decode_q: `[R]` token index of each row's query in the step.
        own_elements: `[R * H_kv * T_o]` flat elements of each row's own tokens (the newest included), per head,
            padded with the row's last token.
        own_mask: `[R, H_q, R * H_kv * T_o]` additive mask of the own columns (row r, query head of KV head h: its
            own tokens of head h only).
        row_heads: `[H_q, 1]` the KV head of each query head.
    """

    store: PagedStore
    decode_q: torch.Tensor
    own_elements: torch.Tensor
    own_mask: torch.Tensor
    row_heads: torch.Tensor
    n_kv_heads: int

    @classmethod
    def plan(cls, store: PagedStore, decode_q: torch.Tensor, own_slots: torch.Tensor, own_lens: torch.Tensor,
             n_kv_heads: int, n_q_heads: int) -> EntryDecode:
        """Args:
            store: the store of all R rows; decode_q: `[R]` their query token index in the step.
            own_slots: `[R, T_o]` the token slots of each row's own tokens, padded with a repeat of its last.
            own_lens: `[R]` own tokens of each row (>= 1).
        """
        dev = own_slots.device
        r, t_o = own_slots.shape
        h = torch.arange(n_kv_heads, device=dev)
        elements = own_slots.long().unsqueeze(1) * n_kv_heads + h.view(1, -1, 1)  # [R, H_kv, T_o]
        row_heads = torch.arange(n_q_heads, device=dev) // (n_q_heads // n_kv_heads)  # [H_q]
        # column (r', h', t) of the own part is open to row (r, query head of KV head h) iff r' = r, h' = h, t < len
        same = ((torch.arange(r, device=dev).view(r, 1, 1, 1, 1) == torch.arange(r, device=dev).view(1, 1, r, 1, 1))
                & (row_heads.view(1, -1, 1, 1, 1) == h.view(1, 1, 1, -1, 1))
                & (torch.arange(t_o, device=dev).view(1, 1, 1, 1, -1) < own_lens.to(dev).view(1, 1, r, 1, 1)))
        own_mask = torch.zeros(same.shape, device=dev).masked_fill_(~same, _NEG_INF).view(r, n_q_heads, -1)
        return cls(store, decode_q.to(dev), elements.flatten(), own_mask, row_heads.view(-1, 1), n_kv_heads)

    def attend(self, layer: int, q_all: torch.Tensor, out_all: torch.Tensor, flat: FlatViews, own_buffer: int,
               scale: float) -> None:
        """Overwrite the rows' output in `out_all` (`[num_tokens, H_q, D]`) with their attention in `layer`
        (arguments as `TokenDecode.attend`)."""
        r = int(self.decode_q.numel())
        _, h_q, d = q_all.shape
        parts, col_heads = _store_columns(self.store, layer, self.n_kv_heads, q_all.device)
        ks, vs = [], []
        for buf, elements in parts:
            k_flat, v_flat = flat(buf)
            ks.append(k_flat.index_select(0, elements))
            vs.append(v_flat.index_select(0, elements))
        k_flat, v_flat = flat(own_buffer)
        ks.append(k_flat.index_select(0, self.own_elements))
        vs.append(v_flat.index_select(0, self.own_elements))
        run_mask = torch.where(col_heads.view(1, -1) == self.row_heads, 0.0, _NEG_INF)  # [H_q, N]
        mask = torch.cat([run_mask.expand(r, h_q, -1), self.own_mask], -1).view(1, 1, r * h_q, -1)
        q = q_all.index_select(0, self.decode_q).view(1, 1, r * h_q, d)
        out, _ = attend(q, torch.cat(ks).view(1, 1, -1, d), torch.cat(vs).view(1, 1, -1, d), mask, scale)
        out_all[self.decode_q] = out.reshape(r, h_q, -1).to(out_all.dtype)
