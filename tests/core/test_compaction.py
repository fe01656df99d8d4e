# SPDX-License-Identifier: Apache-2.0
"""Compaction planner, the in-place copy, the two-phase commit and logical/physical bookkeeping."""

from __future__ import annotations

import random

import pytest
import torch

from kvzip_plugin.compaction import (
    CompactionTxn,
    apply_compaction,
    kept_tokens,
    physical_budget,
    plan_compaction,
    top_kept_tokens,
)
from kvzip_plugin.eviction import plan_eviction
from kvzip_plugin.positions import CompactedLength
from kvzip_plugin.types import ScoreMap

BS = 4


def test_physical_budget_is_block_aligned_and_capped():
    assert physical_budget(64, 4, 0.25, BS) == 4 + 16  # 4 protected + 15 context -> 19 -> 20
    assert physical_budget(64, 4, 1.0, BS) == 64
    assert physical_budget(64, 0, 0.01, BS) == 4
    with pytest.raises(ValueError):
        physical_budget(62, 4, 0.5, BS)
    with pytest.raises(ValueError):
        physical_budget(64, 65, 0.5, BS)


def make_plan(n_layers=2, n_heads=3, n_ctx=28, ratio=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_layers, n_heads, n_ctx, generator=g)
    return plan_eviction(ScoreMap(scores, tuple(range(n_layers))), ratio, "head")


def test_compaction_moves_each_heads_kept_tokens_into_fresh_blocks():
    n_protect, n_ctx = 4, 28  # L = 32 = 8 blocks
    plan = make_plan(n_ctx=n_ctx, ratio=12 / 28)  # 4 + 12 = 16 slots = 4 blocks
    tokens = kept_tokens(plan, n_protect, [0, 1])
    assert tokens.shape == (2, 3, 16)
    src_blocks = [9, 3, 7, 1, 12, 5, 8, 2]
    dst_blocks = [20, 21, 14, 30]
    cp = plan_compaction(tokens, src_blocks, dst_blocks, BS)
    assert (cp.logical_length, cp.physical_length, cp.blocks_saved) == (32, 16, 4)

    n_slots = 32 * BS
    kv = torch.randn(n_slots, 3, 8)
    before = kv.clone()
    for layer in range(2):
        layer_kv = kv.clone()
        apply_compaction(layer_kv, cp.src_slots[layer], cp.dst_slots)
        for h in range(3):
            for j in range(16):
                tok = int(tokens[layer, h, j])
                src = src_blocks[tok // BS] * BS + tok % BS
                dst = dst_blocks[j // BS] * BS + j % BS
                assert torch.equal(layer_kv[dst, h], before[src, h])
        # nothing outside the destination blocks changed (sources untouched)
        untouched = torch.ones(n_slots, dtype=torch.bool)
        untouched[cp.dst_slots] = False
        assert torch.equal(layer_kv[untouched], before[untouched])


def test_compacted_attention_equals_masked_attention():
    """Attention of a later query over the compacted slots equals attention over the full prefix
    with each head's evicted tokens masked out."""
    n_protect = 4
    plan = make_plan(n_layers=1, n_ctx=28, ratio=12 / 28, seed=3)
    tokens = kept_tokens(plan, n_protect, [0])
    src_blocks, dst_blocks = list(range(8)), [8, 9, 10, 11]
    cp = plan_compaction(tokens, src_blocks, dst_blocks, BS)
    keys, values = torch.randn(12 * BS, 3, 8), torch.randn(12 * BS, 3, 8)
    apply_compaction(keys, cp.src_slots[0], cp.dst_slots)
    apply_compaction(values, cp.src_slots[0], cp.dst_slots)
    q = torch.randn(3, 8)
    for h in range(3):
        k, v = keys[cp.dst_slots, h], values[cp.dst_slots, h]
        got = torch.softmax(k @ q[h], 0) @ v
        keep = torch.zeros(32, dtype=torch.bool)
        keep[tokens[0, h]] = True
        kf, vf = keys[:32, h], values[:32, h]
        logits = (kf @ q[h]).masked_fill(~keep, float("-inf"))
        want = torch.softmax(logits, 0) @ vf
        torch.testing.assert_close(got, want)


def test_plan_compaction_rejects_bad_inputs():
    tokens = torch.arange(8).expand(1, 2, 8)
    with pytest.raises(ValueError, match="overlap"):
        plan_compaction(tokens, [0, 1, 2, 3], [3, 4], BS)
    with pytest.raises(ValueError, match="whole blocks"):
        plan_compaction(tokens, [0, 1, 2, 3], [5], BS)
    with pytest.raises(ValueError, match="outside"):
        plan_compaction(tokens + 20, [0, 1, 2, 3], [5, 6], BS)
    with pytest.raises(ValueError, match="ascending"):
        plan_compaction(tokens.flip(-1), [0, 1, 2, 3], [5, 6], BS)
    uneven = plan_eviction(ScoreMap(torch.rand(1, 2, 20), (0,)), 0.3, "pair")
    if not uneven.is_uniform():
        with pytest.raises(ValueError, match="head"):
            kept_tokens(uneven, 4, [0])


class Pool:
    """A minimal block pool honouring the `BlockAllocator` protocol, to check for leaks."""

    def __init__(self, n: int, fail_every: int = 0, seed: int = 0) -> None:
        self.free_ids = list(range(n))
        self.n = n
        self.rng = random.Random(seed)
        self.fail_every = fail_every

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids) or (self.fail_every and self.rng.randrange(self.fail_every) == 0):
            raise RuntimeError("out of blocks")
        out, self.free_ids = self.free_ids[:n], self.free_ids[n:]
        return out

    def free(self, block_ids) -> None:
        assert not set(block_ids) & set(self.free_ids), "double free"
        self.free_ids.extend(block_ids)


def test_two_phase_commit_and_rollback_leak_nothing():
    rng = random.Random(1)
    pool = Pool(64, fail_every=5, seed=2)
    committed: list[list[int]] = []
    for _ in range(300):
        txn = CompactionTxn(pool, n_blocks=rng.randint(1, 6))
        try:
            txn.prepare()
        except RuntimeError:
            assert txn.state == "new"
            continue
        action = rng.choice(["commit", "fail_copy", "fail_publish", "cancel"])
        if action == "commit":
            txn.commit(committed.append)
            txn.rollback()  # no-op after commit
            assert txn.state == "committed"
        elif action == "fail_publish":
            def publish(ids):
                raise RuntimeError("publish failed")
            with pytest.raises(RuntimeError):
                txn.commit(publish)
            assert txn.state == "rolled_back"
        else:
            txn.rollback()
            txn.rollback()  # idempotent
        if committed and rng.random() < 0.5:
            pool.free(committed.pop(rng.randrange(len(committed))))  # a compacted prefix is freed later
    in_use = sum(len(c) for c in committed)
    assert len(pool.free_ids) + in_use == pool.n
    assert len(set(pool.free_ids)) == len(pool.free_ids)


def test_commit_before_prepare_is_refused():
    txn = CompactionTxn(Pool(4), 1)
    with pytest.raises(RuntimeError):
        txn.commit(lambda ids: None)


def test_logical_physical_bookkeeping():
    m = CompactedLength(logical_length=64, physical_length=24, block_size=BS)
    assert m.offset == 40 and m.block_offset == 10
    assert m.physical_position(64) == 24 and m.physical_position(70) == 30
    assert m.physical_seq_len(num_computed_tokens=64, num_new_tokens=5) == 29
    assert m.physical_blocks(64) == 6 and m.physical_blocks(65) == 7
    with pytest.raises(ValueError):
        m.physical_position(63)
    for bad in [(62, 24), (64, 22), (64, 0), (64, 68)]:
        with pytest.raises(ValueError):
            CompactedLength(*bad, block_size=BS)


def test_top_kept_tokens_matches_the_head_plan():
    """Same selection as `plan_eviction(..., "head")` when the budget is its floor(ratio * n)."""
    torch.manual_seed(0)
    scores = torch.rand(3, 2, 40)
    n_keep, n_prot = 10, 4
    tokens = top_kept_tokens(scores, n_keep, n_prot)
    assert tokens.shape == (3, 2, n_prot + n_keep)
    assert bool((tokens[..., :n_prot] == torch.arange(n_prot)).all())
    assert bool((tokens[..., 1:] > tokens[..., :-1]).all())  # ascending per head
    plan = plan_eviction(ScoreMap(scores, (0, 1, 2)), n_keep / 40, "head")
    for layer in range(3):
        for head, idx in enumerate(plan.kept_indices(layer)):
            assert tokens[layer, head, n_prot:].tolist() == (idx + n_prot).tolist()


def test_top_kept_tokens_ties_keep_the_earlier_token():
    tokens = top_kept_tokens(torch.zeros(1, 1, 6), 2, 0)
    assert tokens.tolist() == [[[0, 1]]]
    with pytest.raises(ValueError, match="cannot keep"):
        top_kept_tokens(torch.zeros(1, 1, 6), 7, 0)


def test_apply_compaction_on_a_strided_paged_view_equals_the_flat_one():
    """Engines hand a token-major view over their own layout (e.g. keys stored [blocks, H, D, bs]):
    the paged path writes through the view into the engine's storage, like the flat path."""
    torch.manual_seed(1)
    n_blocks, bs, heads, dim = 6, 4, 3, 5
    storage = torch.randn(n_blocks, heads, dim, bs)  # an engine layout: keys transposed per block
    view = storage.permute(0, 3, 1, 2)  # [blocks, bs, H, D], not contiguous
    flat = view.contiguous().reshape(n_blocks * bs, heads, dim)
    tokens = torch.stack([torch.stack([torch.tensor(sorted(random.Random(h).sample(range(8), 4)))
                                       for h in range(heads)])])
    plan = plan_compaction(tokens, [1, 2], [4], bs)
    apply_compaction(view, plan.src_slots[0], plan.dst_slots)
    apply_compaction(flat, plan.src_slots[0], plan.dst_slots)
    assert torch.equal(view.reshape(n_blocks * bs, heads, dim), flat)
    for h in range(heads):  # slot j of block 4 holds head h's j-th kept token
        for j, t in enumerate(tokens[0, h].tolist()):
            src_block = [1, 2][t // bs]
            assert torch.equal(storage[4, h, :, j], storage[src_block, h, :, t % bs])
