# SPDX-License-Identifier: Apache-2.0
"""A `head`-structured compacted layer packs into fixed-size pages and back without loss, and
attention read from the pages equals attention over the compacted slots."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.paging import pack_pages, pages_needed, unpack_pages


@pytest.mark.parametrize(("n_slots", "page_size"), [(16, 16), (17, 16), (5, 16), (48, 8)])
def test_pack_unpack_round_trip(n_slots, page_size):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, n_slots, 8, generator=g)
    values = torch.randn(3, n_slots, 8, generator=g)
    paged = pack_pages(keys, values, page_size, logical_length=n_slots + 40)
    assert paged.keys.shape == (pages_needed(n_slots, page_size), page_size, 3, 8)
    assert paged.position_offset == 40
    k, v = unpack_pages(paged)
    assert torch.equal(k, keys) and torch.equal(v, values)
    # slot s of head h sits in page s // page_size at offset s % page_size
    s = n_slots - 1
    assert torch.equal(paged.keys[s // page_size, s % page_size, 2], keys[2, s])
    # padding past the last slot is zero
    flat = paged.keys.permute(2, 0, 1, 3).reshape(3, -1, 8)
    assert not flat[:, n_slots:].any()


def test_attention_from_pages_equals_attention_over_slots():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 21, 16, generator=g), torch.randn(2, 21, 16, generator=g)
    query = torch.randn(2, 1, 16, generator=g)
    paged = pack_pages(keys, values, 8, logical_length=60)
    # what a paged kernel does: gather the block table's pages, read the first n_slots slots
    block_table = torch.arange(paged.keys.shape[0])
    k = paged.keys[block_table].reshape(-1, 2, 16)[: paged.n_slots].transpose(0, 1)
    v = paged.values[block_table].reshape(-1, 2, 16)[: paged.n_slots].transpose(0, 1)
    got = torch.softmax(query @ k.transpose(1, 2) / 4, dim=-1) @ v
    want = torch.softmax(query @ keys.transpose(1, 2) / 4, dim=-1) @ values
    torch.testing.assert_close(got, want)


def test_invalid_page_inputs():
    with pytest.raises(ValueError):
        pages_needed(4, 0)
    with pytest.raises(ValueError):
        pack_pages(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), 4, logical_length=3)
