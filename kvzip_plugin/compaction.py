# SPDX-License-Identifier: Apache-2.0
"""Compaction of a prefix's kept KV pairs into fresh pages, with a two-phase commit.

A prefix of logical length L sits in `L / block_size` source blocks. With the uniform (`head`)
structure every (layer, KV head) keeps the same P tokens count (protected prefix included), so the
kept pairs fit in `P / block_size` fresh destination blocks: slot j of every head holds that head's
j-th kept token (heads may hold different tokens in the same slot; keys carry their RoPE rotation
and attention does not depend on key order).

Safety: destination blocks are freshly allocated and disjoint from the sources, so no move
overwrites a slot that a later move reads, and the source blocks are never written: until commit,
the prefix cache and every running request still read the untouched originals. Rolling back
frees the destination blocks and leaves the cache exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvzip_plugin.eviction import budget
from kvzip_plugin.types import EvictionPlan


def physical_budget(n_tokens: int, n_protected: int, ratio: float, block_size: int) -> int:
    """Slots P kept per (layer, KV head) for a prefix of `n_tokens` (block-aligned) tokens:
    the protected tokens plus `budget(ratio, context)` context tokens, rounded up to a whole block
    and capped at `n_tokens`."""
    if n_tokens % block_size:
        raise ValueError(f"prefix length {n_tokens} is not a multiple of the block size {block_size}")
    if not 0 <= n_protected <= n_tokens:
        raise ValueError(f"protected tokens {n_protected} outside [0, {n_tokens}]")
    kept = n_protected + budget(ratio, n_tokens - n_protected)
    return min(n_tokens, -(-kept // block_size) * block_size)


def kept_tokens(plan: EvictionPlan, n_protected: int, layers: Sequence[int]) -> torch.Tensor:
    """Token indices each (layer, KV head) keeps: protected tokens then its kept context tokens.

    Args:
        plan: a uniform plan over the context `[n_protected, n_protected + n_context)`.
        n_protected: tokens before the context (always kept).
        layers: the layers to lay out (in this order).

    Returns:
        `[len(layers), H_kv, n_protected + P_context]` int64, ascending per head.
    """
    rows = []
    for layer in layers:
        heads = [torch.cat([torch.arange(n_protected), n_protected + idx]) for idx in plan.kept_indices(layer)]
        if len({h.numel() for h in heads}) != 1:
            raise ValueError(f"layer {layer}: heads keep different counts; compaction needs the 'head' structure")
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def top_kept_tokens(scores: torch.Tensor, n_keep: int, n_protected: int) -> torch.Tensor:
    """The `head`-structure selection straight from per-(layer, KV head) scores, for a physical
    budget: every head keeps the protected tokens and its `n_keep` best context tokens.

    Args:
        scores: `[layers, H_kv, n_context]` scores of the context tokens (after the protected ones).
        n_keep: context tokens kept per head (`physical_budget(...) - n_protected`).
        n_protected: tokens before the context (always kept).

    Returns:
        `[layers, H_kv, n_protected + n_keep]` int64 token indices in the prefix, ascending per head.
        Ties keep the earlier token (stable order), as `eviction.plan_eviction` does.
    """
    n_layers, n_heads, n_context = scores.shape
    if not 0 <= n_keep <= n_context:
        raise ValueError(f"cannot keep {n_keep} of {n_context} context tokens")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :n_keep]
    kept = torch.sort(order, dim=-1).values + n_protected
    protected = torch.arange(n_protected).expand(n_layers, n_heads, n_protected)
    return torch.cat([protected, kept], dim=-1)


@dataclass(frozen=True)
class CompactionPlan:
    """Slot moves of one prefix, for every layer and KV head.

    Attributes:
        src_slots: `[layers, H_kv, P]` int64 flat slot index (block_id * block_size + offset) in the
            engine's per-layer KV buffer of each kept token, in destination order.
        dst_slots: `[P]` int64 flat destination slots (the same for every layer and head).
        src_block_ids, dst_block_ids: the prefix's blocks and the fresh ones.
        logical_length, physical_length: L and P.
    """

    src_slots: torch.Tensor
    dst_slots: torch.Tensor
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    block_size: int
    logical_length: int
    physical_length: int

    @property
    def blocks_saved(self) -> int:
        return len(self.src_block_ids) - len(self.dst_block_ids)


def _flat_slots(block_ids: torch.Tensor, tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_ids[tokens // block_size] * block_size + tokens % block_size


def plan_compaction(tokens: torch.Tensor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                    block_size: int) -> CompactionPlan:
    """Map kept tokens to destination slots.

    Args:
        tokens: `[layers, H_kv, P]` kept token indices in the prefix, ascending per head
            (`kept_tokens`); P must be a multiple of `block_size`.
        src_block_ids: the prefix's blocks, logical order (`L / block_size` of them).
        dst_block_ids: `P / block_size` fresh blocks, disjoint from the sources.
        block_size: tokens per block.
    """
    n_layers, n_heads, n_phys = tokens.shape
    logical = len(src_block_ids) * block_size
    if n_phys % block_size or len(dst_block_ids) * block_size != n_phys:
        raise ValueError(f"{n_phys} kept slots need {n_phys // block_size} whole blocks, got {len(dst_block_ids)}")
    if set(src_block_ids) & set(dst_block_ids):
        raise ValueError("destination blocks overlap the source blocks")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logical):
        raise ValueError(f"kept token index outside the prefix [0, {logical})")
    if n_phys > 1 and not bool((tokens[..., 1:] > tokens[..., :-1]).all()):
        raise ValueError("kept tokens must be strictly ascending per head")
    src = torch.tensor(list(src_block_ids), dtype=torch.long)
    dst = torch.tensor(list(dst_block_ids), dtype=torch.long)
    return CompactionPlan(
        src_slots=_flat_slots(src, tokens, block_size),
        dst_slots=_flat_slots(dst, torch.arange(n_phys), block_size),
        src_block_ids=tuple(src_block_ids), dst_block_ids=tuple(dst_block_ids),
        block_size=block_size, logical_length=logical, physical_length=n_phys,
    )


def apply_compaction(kv: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy one layer's kept pairs into the destination slots, in place.

    Args:
        kv: one layer's key (or value) buffer, either a flat `[num_slots, H_kv, D]` view or a paged
            token-major `[num_blocks, block_size, H_kv, D]` view (it may be a strided view of the
            engine's own layout; writes go to the engine's storage).
        src_slots: `[H_kv, P]` this layer's source slots (`CompactionPlan.src_slots[layer]`).
        dst_slots: `[P]` destination slots.
    """
    src = src_slots.to(kv.device).T  # [P, H_kv]
    dst = dst_slots.to(kv.device)
    if kv.dim() == 3:
        heads = torch.arange(kv.shape[1], device=kv.device)
        gathered = kv[src, heads]  # [P, H_kv, D], read fully before any write
        kv[dst] = gathered
        return
    block_size, n_heads = kv.shape[1], kv.shape[2]
    heads = torch.arange(n_heads, device=kv.device)
    gathered = kv[src // block_size, src % block_size, heads]  # [P, H_kv, D]
    kv[dst // block_size, dst % block_size] = gathered


class BlockAllocator(Protocol):
    """What a compaction needs from an engine's block pool."""

    def allocate(self, n: int) -> list[int]: ...

    def free(self, block_ids: Sequence[int]) -> None: ...


@dataclass
class CompactionTxn:
    """Two-phase commit of one compaction.

    `prepare()` allocates the destination blocks (nothing is visible yet); the caller then copies
    into them; `commit(publish)` makes them visible (e.g. registers them in the prefix cache); on
    any failure `rollback()` frees the destination blocks. `rollback()` is idempotent and a no-op
    after a successful commit.
    """

    allocator: BlockAllocator
    n_blocks: int
    dst_block_ids: list[int] = field(default_factory=list)
    state: str = "new"

    def prepare(self) -> list[int]:
        if self.state != "new":
            raise RuntimeError(f"prepare() in state {self.state}")
        self.dst_block_ids = list(self.allocator.allocate(self.n_blocks))
        if len(self.dst_block_ids) != self.n_blocks:
            self.allocator.free(self.dst_block_ids)
            self.dst_block_ids = []
            self.state = "rolled_back"
            raise RuntimeError(f"allocator returned the wrong number of blocks for {self.n_blocks}")
        self.state = "prepared"
        return self.dst_block_ids

    def shrink(self, n_blocks: int) -> None:
        """Keep only the first `n_blocks` prepared blocks (a reservation larger than what was used);
        frees the rest. Only before commit."""
        if self.state != "prepared":
            raise RuntimeError(f"shrink() in state {self.state}")
        if not 0 <= n_blocks <= len(self.dst_block_ids):
            raise ValueError(f"cannot keep {n_blocks} of {len(self.dst_block_ids)} blocks")
        extra, self.dst_block_ids = self.dst_block_ids[n_blocks:], self.dst_block_ids[:n_blocks]
        self.n_blocks = n_blocks
        if extra:
            self.allocator.free(extra)

    def commit(self, publish: Callable[[list[int]], None]) -> None:
        if self.state != "prepared":
            raise RuntimeError(f"commit() in state {self.state}")
        try:
            publish(self.dst_block_ids)
        except BaseException:
            self.rollback()
            raise
        self.state = "committed"

    def rollback(self) -> None:
        if self.state == "prepared":
            self.allocator.free(self.dst_block_ids)
            self.dst_block_ids = []
        if self.state != "committed":
            self.state = "rolled_back"
