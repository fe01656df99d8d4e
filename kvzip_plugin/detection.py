# SPDX-License-Identifier: Apache-2.0
"""Hot shared-prefix detection: which cached prefixes deserve a KVzip compression pass.

The engine glue reports every prefix-cache hit (or insertion) of a block-aligned prefix, keyed by
the hash of its last full block. Engines chain block hashes (each block's hash covers all blocks
before it and the request's cache salt), so that one hash identifies the whole prefix, tenant salt
included. A prefix becomes a candidate once it is at least `min_prefix_tokens` long and has been
hit by at least `min_hits` requests; each prefix is proposed once. `forget()` drops a prefix that
the engine freed, so a queued job for it can be cancelled.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class TriggerPolicy(BaseModel):
    """When a shared prefix is worth compressing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_prefix_tokens: int = Field(1024, ge=1)
    """Only prefixes at least this long (tokens) are compressed."""

    min_hits: int = Field(2, ge=1)
    """A prefix must be hit by this many requests (the request that cached it counts as one)."""

    def unreachable(self, max_model_len: int) -> str | None:
        """Why no prefix can ever be compressed under a context length of `max_model_len` tokens (a
        request that hits a prefix of L tokens holds at least L + 1), or None."""
        if self.min_prefix_tokens >= max_model_len:
            return (f"--kv-compression-min-prefix-tokens {self.min_prefix_tokens} is not below the context length "
                    f"{max_model_len}: no prefix can ever be compressed")
        return None


@dataclass(frozen=True)
class PrefixCandidate:
    """A hot prefix to compress.

    Attributes:
        key: the engine's hash of the prefix's last full block (identifies the whole chain + salt).
        num_tokens: logical length L of the prefix (block-aligned).
        block_ids: the engine's blocks holding it, in logical order.
        salt: the tenant's cache salt, if any (for logs and metrics; the key already includes it).
        hits: requests that hit it when it was proposed.
    """

    key: Hashable
    num_tokens: int
    block_ids: tuple[int, ...]
    salt: str | None
    hits: int


@dataclass
class _Entry:
    num_tokens: int
    block_ids: tuple[int, ...]
    salt: str | None
    hits: int = 0
    proposed: bool = False


@dataclass
class PrefixTracker:
    """Counts hits per prefix and proposes each hot prefix once.

    Memory is bounded: at most `max_tracked` prefixes are counted; the least recently hit is
    dropped first when full.
    """

    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
    max_tracked: int = 4096
    _entries: dict[Hashable, _Entry] = field(default_factory=dict)

    def observe(self, key: Hashable, num_tokens: int, block_ids: tuple[int, ...] | list[int],
                salt: str | None = None) -> PrefixCandidate | None:
        """Record one request using the cached prefix `key`; return it as a candidate the first
        time it qualifies, else None."""
        if num_tokens < self.policy.min_prefix_tokens:
            return None
        entry = self._entries.pop(key, None)  # re-insert: dict order = recency
        if entry is None:
            entry = _Entry(num_tokens, tuple(block_ids), salt)
            while len(self._entries) >= self.max_tracked:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        entry.hits += 1
        if entry.proposed or entry.hits < self.policy.min_hits:
            return None
        entry.proposed = True
        return PrefixCandidate(key, entry.num_tokens, entry.block_ids, entry.salt, entry.hits)

    def forget(self, key: Hashable) -> bool:
        """The engine freed or evicted the prefix: stop tracking it. True if it was tracked."""
        return self._entries.pop(key, None) is not None

    def reopen(self, key: Hashable) -> None:
        """Allow `key` to be proposed again (its job failed or was cancelled)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.proposed = False
            entry.hits = 0

    def hits(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return entry.hits if entry else 0

    def __len__(self) -> int:
        return len(self._entries)
