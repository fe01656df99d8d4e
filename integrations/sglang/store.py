# SPDX-License-Identifier: Apache-2.0
"""Compacted prefixes of the SGLang glue: the entries that own compacted KV slots beside the radix tree.

A `CompactedPrefix` stands for L logical tokens with P <= L device slots of SGLang's token pool (the tree is
never given a P-slot value under L keys). `CompactedEntries` holds the live ones by namespace
`(extra_key, cache_salt)`, counts their slots for SGLang's pool invariant (unpinned = evictable, pinned =
protected) and frees them, least recently used first, when the tree has nothing left to evict.
`CompactedNode` is the entry's handle where SGLang expects a tree node id (`req.last_node`,
`TreeLock.node`)."""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvzip_plugin.paged_store import PagedStore

logger = logging.getLogger("sglang.kvzip_plugin")

Namespace = tuple[Any, Any]  # (extra_key, cache_salt)


def namespace_of(key: Any) -> Namespace:
    """The namespace of a `RadixKey`: prefixes are shared only inside one (extra_key, cache_salt)."""
    return (key.extra_key, key.cache_salt)


class CompactedNode:
    """Stands for a compacted prefix where SGLang expects a tree node id: locking it pins the entry."""

    __slots__ = ("entry",)

    def __init__(self, entry: CompactedPrefix) -> None:
        self.entry = entry

    def __repr__(self) -> str:
        return f"CompactedNode(entry={self.entry.entry_id})"


@dataclass(eq=False)
class CompactedPrefix:
    """A published compacted prefix: `slots` (P device slots) stand for the L logical tokens `tokens`."""

    entry_id: int
    key: Hashable
    namespace: Namespace
    tokens: array
    slots: torch.Tensor
    logical_length: int
    physical_length: int
    refs: int = 0
    last_access: float = field(default_factory=time.monotonic)
    alive: bool = True
    store: PagedStore | None = None  # runs of different lengths in head pages (`pair`, `layer_budget`)
    handle: CompactedNode = field(init=False)

    def __post_init__(self) -> None:
        self.handle = CompactedNode(self)

    @property
    def offset(self) -> int:
        return self.logical_length - self.physical_length


class CompactedEntries:
    """The live compacted prefixes; owns their slots. `free(slots)` gives slots back to SGLang's allocator,
    `on_drop(entry)` runs after an entry is dropped (the document may be compressed again)."""

    def __init__(self, free: Callable[[torch.Tensor], None], on_drop: Callable[[CompactedPrefix], None]) -> None:
        self.by_namespace: dict[Namespace, list[CompactedPrefix]] = {}
        self._free = free
        self._on_drop = on_drop
        self._ids = 0

    def __iter__(self) -> Iterator[CompactedPrefix]:
        for entries in self.by_namespace.values():
            yield from entries

    def __bool__(self) -> bool:
        return bool(self.by_namespace)

    def of(self, namespace: Namespace) -> list[CompactedPrefix]:
        return self.by_namespace.get(namespace, [])

    def publish(self, key: Hashable, namespace: Namespace, tokens: array, slots: torch.Tensor, physical_length: int,
                store: PagedStore | None = None) -> CompactedPrefix:
        """A new entry owning `slots` for the logical `tokens`."""
        self._ids += 1
        entry = CompactedPrefix(self._ids, key, namespace, array("q", tokens), slots, len(tokens), physical_length,
                                store=store)
        self.add(entry)
        return entry

    def add(self, entry: CompactedPrefix) -> None:
        self.by_namespace.setdefault(entry.namespace, []).append(entry)

    def slots_held(self, pinned: bool) -> int:
        """Slots of the pinned (requests on them) or unpinned entries."""
        return sum(e.physical_length for e in self if (e.refs > 0) == pinned)

    def tokens_saved(self) -> int:
        return sum(e.offset for e in self)

    def evict(self, need: int) -> int:
        """Free least recently used unpinned entries until `need` slots are freed; returns the slots freed."""
        freed = 0
        for entry in sorted((e for e in self if e.refs == 0), key=lambda e: e.last_access):
            if freed >= need:
                break
            freed += entry.physical_length
            self.drop(entry, free=True, reason="evicted")
        return freed

    def drop(self, entry: CompactedPrefix, free: bool, reason: str) -> None:
        entries = self.by_namespace.get(entry.namespace, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self.by_namespace[entry.namespace]
        if entry.alive and free:
            self._free(entry.slots)
        entry.alive = False
        self._on_drop(entry)
        logger.info("kvzip-plugin: compacted prefix %d (%d -> %d tokens) %s", entry.entry_id,
                    entry.logical_length, entry.physical_length, reason)

    def clear(self, reason: str) -> None:
        for entry in list(self):
            self.drop(entry, free=True, reason=reason)
        self.by_namespace.clear()

    def lock(self, entry: CompactedPrefix) -> None:
        if not entry.alive:
            raise RuntimeError(f"kvzip-plugin: compacted prefix {entry.entry_id} locked after it was dropped")
        entry.refs += 1
        entry.last_access = time.monotonic()

    @staticmethod
    def unlock(entry: CompactedPrefix) -> None:
        entry.refs -= 1
        assert entry.refs >= 0, f"compacted prefix {entry.entry_id} unlocked more than locked"
        entry.last_access = time.monotonic()

    def describe(self) -> list[dict]:
        return [{"id": e.entry_id, "L": e.logical_length, "P": e.physical_length, "refs": e.refs,
                 "slots": e.slots.tolist()} for e in self]
