# SPDX-License-Identifier: Apache-2.0
"""Fixed-size pages for a `head`-structured compacted layer (what a paged engine's block table holds).

With the `head` (or `layer`) structure every KV head of a layer keeps the same count, so a
compacted prefix of logical length L occupies P physical slots, slot s of every head in page
`s // page_size` at offset `s % page_size`. Heads may hold *different* tokens in the same slot:
attention is invariant to key order and keys carry their RoPE rotation. Tokens appended later keep
logical positions L, L+1, ... while their slots continue at P, P+1, ... (offset L - P).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedLayer:
    """One layer's compacted KV in pages.

    Attributes:
        keys, values: `[n_pages, page_size, H_kv, D]` (the vLLM/SGLang per-layer page layout).
        n_slots: physical slots in use (P); slots past it in the last page are zero padding.
        logical_length: L, the logical length the slots represent.
    """

    keys: torch.Tensor
    values: torch.Tensor
    n_slots: int
    logical_length: int

    @property
    def position_offset(self) -> int:
        """L - P: add to a later token's slot index to get its logical (RoPE) position."""
        return self.logical_length - self.n_slots


def pages_needed(n_slots: int, page_size: int) -> int:
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    return -(-n_slots // page_size)


def pack_pages(keys: torch.Tensor, values: torch.Tensor, page_size: int, logical_length: int) -> PagedLayer:
    """Lay a uniform compacted layer into pages.

    Args:
        keys, values: `[H_kv, P, D]` (every head the same count P).
        page_size: slots per page.
        logical_length: logical length L the P slots stand for (L >= P).
    """
    heads, n_slots, dim = keys.shape
    if logical_length < n_slots:
        raise ValueError(f"logical length {logical_length} < {n_slots} physical slots")
    n_pages = pages_needed(n_slots, page_size)
    pad = n_pages * page_size - n_slots

    def _pack(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))  # [H, n_pages*page, D]
        return x.view(heads, n_pages, page_size, dim).permute(1, 2, 0, 3).contiguous()

    return PagedLayer(_pack(keys), _pack(values), n_slots, logical_length)


def unpack_pages(paged: PagedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_pages`: `[H_kv, P, D]` keys and values."""
    n_pages, page, heads, dim = paged.keys.shape

    def _unpack(x: torch.Tensor) -> torch.Tensor:
        return x.permute(2, 0, 1, 3).reshape(heads, n_pages * page, dim)[:, : paged.n_slots]

    return _unpack(paged.keys), _unpack(paged.values)
