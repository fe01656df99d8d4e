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
