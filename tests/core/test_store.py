# SPDX-License-Identifier: Apache-2.0
"""Head-page store of non-uniform runs: selection, placement, memory bound, copy/gather round trip."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.eviction import plan_eviction
from kvzip_plugin.store import (
    block_table_tokens,
    copy_plan,
    max_store_blocks,
    place_runs,
    run_gather_index,
    select_runs,
    uniform_tokens,
)
from kvzip_plugin.types import ScoreMap

PS = 4


def uneven_scores(n_layers=5, n_heads=2, n_ctx=60, seed=0) -> torch.Tensor:
    """Scores whose scale differs a lot by layer, so a global threshold gives very uneven budgets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.01, 1.0, 0.2, 5.0, 0.05])[:n_layers].view(-1, 1, 1)
    return torch.rand(n_layers, n_heads, n_ctx, generator=g) * scale


@pytest.mark.parametrize("structure", ["pair", "layer_budget", "head"])
def test_runs_are_whole_pages_and_contain_the_plan(structure):
    scores, n_p, ratio = uneven_scores(), 3, 0.3
    keep = select_runs(scores, n_p, ratio, structure, PS)
    L = n_p + scores.shape[-1]
    assert keep.shape == (5, 2, L) and keep[..., :n_p].all()
    lengths = keep.sum(-1)
    assert bool(((lengths % PS == 0) | (lengths == L)).all())
    plan = plan_eviction(ScoreMap(scores, tuple(range(5))), ratio, structure)
    assert bool((keep[..., n_p:] | ~plan.keep).all())  # every planned pair is kept
    extra = lengths - n_p - plan.kept_counts
    assert bool((extra >= 0).all()) and bool((extra < PS).all())  # rounding adds less than one page
    if structure == "head":
        assert len(set(lengths.flatten().tolist())) == 1
    if structure == "layer_budget":
        assert all(len(set(row.tolist())) == 1 for row in lengths)
    if structure == "pair":
        assert len(set(lengths.flatten().tolist())) > 2  # non-uniform budgets


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_head_runs_are_the_physical_budget_selection(ratio):
    """`head` through `select_runs` keeps what the engines kept before: `physical_budget` slots per head,
    the protected tokens and each head's best context tokens (`top_kept_tokens`)."""
    from kvzip_plugin.compaction import physical_budget, top_kept_tokens

    scores, n_p = uneven_scores(n_ctx=60), 4  # 64 tokens: page-aligned, as an engine's prefix is
    P = physical_budget(64, n_p, ratio, PS)
    keep = select_runs(scores, n_p, ratio, "head", PS)
    assert torch.equal(uniform_tokens(keep), top_kept_tokens(scores, P - n_p, n_p))
    assert uniform_tokens(select_runs(scores, n_p, 0.3, "pair", PS)) is None


def test_tensor_parallel_ranks_agree_on_the_layout():
    """Under TP a rank sees only its own heads' runs: runs that happen to be equal on this rank must not put
    the store in the block table while another rank's unequal runs put it in head pages. Only `head` and
    ratio 1.0 (equal runs on every rank by construction) keep the block table with TP > 1."""
    scores, n_p = uneven_scores(n_layers=2, n_heads=1, n_ctx=60), 4
    keep = select_runs(scores, n_p, 0.5, "pair", PS)
    equal = keep.clone()
    equal[1] = keep[0]  # this rank's two runs happen to have one length
    assert uniform_tokens(equal) is not None
    assert torch.equal(block_table_tokens(equal, "pair", 0.5, tp_size=1), uniform_tokens(equal))
    assert block_table_tokens(equal, "pair", 0.5, tp_size=2) is None
    assert block_table_tokens(equal, "layer_budget", 0.5, tp_size=2) is None
    head = select_runs(scores, n_p, 0.5, "head", PS)
    assert torch.equal(block_table_tokens(head, "head", 0.5, tp_size=4), uniform_tokens(head))
    full = select_runs(scores, n_p, 1.0, "pair", PS)
    assert torch.equal(block_table_tokens(full, "pair", 1.0, tp_size=2), uniform_tokens(full))


def test_next_best_pairs_fill_the_page():
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.3, 0.7, 0.2]]])
    keep = select_runs(scores, 0, 1 / 6, "pair", 2)  # plan keeps 1 pair (0.9), rounded to 2: + 0.7
    assert keep[0, 0].tolist() == [True, False, False, False, True, False]


def test_placement_uses_the_fewest_blocks_and_any_layers_buffer():
    lengths = torch.tensor([[4, 0], [40, 36], [4, 4]])  # 3 layers x 2 heads, page 4: 1 + 19 + 2 pages
    layout = place_runs(lengths, PS)
    assert layout.n_blocks == -(-22 // 6) == 4  # one block = 6 head pages; layer 1 alone would need 10
    used = layout.pages[layout.pages >= 0]
    assert used.numel() == 22 and used.unique().numel() == 22 and int(used.max()) < 4 * 6
    blocks, buffers, slots = layout.locate(layout.pages[1][layout.pages[1] >= 0])
    assert set(buffers.tolist()) != {1}  # layer 1's runs spill into other layers' buffers
    assert int(blocks.max()) < layout.n_blocks


@pytest.mark.parametrize("structure", ["pair", "layer_budget", "head"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_memory_is_kept_pairs_plus_under_a_page_per_run_and_within_the_reservation(structure, ratio):
    for seed in range(3):
        scores, n_p = uneven_scores(seed=seed), 5
        L = n_p + scores.shape[-1]
        keep = select_runs(scores, n_p, ratio, structure, PS)
        layout = place_runs(keep.sum(-1), PS)
        runs = layout.n_layers * layout.n_heads
        pages = int((layout.pages >= 0).sum())
        assert pages * PS - layout.kept_pairs < runs * PS  # under one page of padding per run
        assert layout.n_blocks == -(-pages // runs)
        assert layout.n_blocks <= max_store_blocks(L, n_p, ratio, PS, 5, 2, structure)


def test_copy_then_gather_returns_each_heads_run():
    n_layers, n_heads, d, n_p = 3, 2, 8, 2
    scores = uneven_scores(n_layers, n_heads, 22, seed=1)
    L = n_p + 22
    keep = select_runs(scores, n_p, 0.3, "pair", PS)
    layout = place_runs(keep.sum(-1), PS)
    src = torch.randn(n_layers, n_heads, L, d)  # the prefix's keys, per layer and head
    # the store's buffers: [n_blocks, page, H, D] per layer (token-major pages of one layer)
    buffers = torch.zeros(n_layers, layout.n_blocks, PS, n_heads, d)
    for layer in range(n_layers):
        cp = copy_plan(keep, layout, layer)
        buffers[cp.dst_buffers, cp.dst_blocks, cp.dst_offsets, cp.dst_slots] = src[layer, cp.src_heads, cp.src_tokens]
    for layer in range(n_layers):
        grid, blocks, bufs, slots = run_gather_index(layout, layer)
        max_pages = layout.pages.shape[-1]
        out = torch.zeros(n_heads * max_pages, PS, d)
        out[grid] = buffers[bufs, blocks, :, slots]
        out = out.view(n_heads, max_pages * PS, d)
        for h in range(n_heads):
            n = int(layout.lengths[layer, h])
            assert torch.equal(out[h, :n], src[layer, h, keep[layer, h]])


def test_copy_plan_refuses_a_layout_of_other_lengths():
    keep = select_runs(uneven_scores(), 3, 0.3, "pair", PS)
    layout = place_runs(keep.sum(-1) + PS, PS)
    with pytest.raises(ValueError, match="keeps"):
        copy_plan(keep, layout, 0)
