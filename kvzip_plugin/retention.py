# SPDX-License-Identifier: Apache-2.0
"""Which compacted prefixes a new compression job may displace, and how long a job waits for room.

A job needs room in the KV pool while it runs: the prefix it scores stays pinned, and its scoring input (the
"repeat the previous context" pass, about as long as the prefix) takes slots beside it. In a pool that binds
(the case KVzip is for), that room comes from what the engine evicts, least recently used first, and that
includes the compacted prefixes built by earlier jobs. Evicting a compacted prefix to compress another one
throws away a finished job's work; its tenant then recomputes the full document and queues a job of its
own, which evicts the next one: churn (measured: the fourth of four tenants' scoring evicted the first
tenant's compacted document on both engines, `benchmarks/README.md`, capacity).

The rule, the same in both engines: every hit a prefix gets, as a candidate or served compacted, is counted
in a `HitMeter` with exponential decay (half-life `HIT_HALF_LIFE_S`). A compacted prefix is *kept* against
a queued job unless the candidate's decayed hits exceed `DISPLACE_FACTOR` times its own (the flag
`--kv-compression-displace-factor`; 0 turns the rule off). A switch costs a scoring pass and the displaced
tenant's next full prefill, so tenants with the same traffic do not displace each other, whichever came
last. A kept prefix's slots do not count as room for that job, and when the job starts they move behind
what the engine evicts first (the engine's allocations then evict the colder entries and free slots before
them). A colder compacted prefix (e.g. a tenant that left) is room
like any cached block. Client requests are not affected: they evict what they need, as without the plugin.
A job that finds no room waits; while no request runs (nothing will free slots) the wait is bounded by
`NO_ROOM_WAIT_S` (`RoomWait`), after which the engine cancels it and `Admission` backs its prefix off.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

HIT_HALF_LIFE_S = 600.0
"""A hit counts half as much after this long (the meter's half-life)."""

DISPLACE_FACTOR = 2.0
"""A job may displace a compacted prefix only when its candidate has more than this many times its hits
(default of `--kv-compression-displace-factor`)."""

MAX_METERED_KEYS = 65536
"""Prefixes metered at most (the least recently hit are dropped)."""

NO_ROOM_WAIT_S = 60.0
"""A queued job that finds no room for this long while no request runs is cancelled (engines)."""


@dataclass
class HitMeter:
    """Exponentially decayed hit counts per prefix key: `value = sum over hits of 0.5 ** (age / half_life)`.

    Kept as (value at t, t) per key, so a hit and a read are O(1) whatever the history."""

    half_life_s: float = HIT_HALF_LIFE_S
    displace_factor: float = DISPLACE_FACTOR
    max_keys: int = MAX_METERED_KEYS
    _values: OrderedDict[Hashable, tuple[float, float]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {self.half_life_s}")
        if not (self.displace_factor >= 0 and math.isfinite(self.displace_factor)):
            raise ValueError(f"displace_factor must be a finite number >= 0, got {self.displace_factor}")

    def _decayed(self, key: Hashable, now: float) -> float:
        got = self._values.get(key)
        if got is None:
            return 0.0
        value, at = got
        return value * math.exp2(-max(now - at, 0.0) / self.half_life_s)

    def hit(self, key: Hashable, now: float | None = None, n: int = 1) -> float:
        """Count `n` hits on `key` now; returns its value after them."""
        now = time.monotonic() if now is None else now
        value = self._decayed(key, now) + n
        self._values[key] = (value, now)
        self._values.move_to_end(key)
        while len(self._values) > self.max_keys:
            self._values.popitem(last=False)
        return value

    def value(self, key: Hashable, now: float | None = None) -> float:
        """The decayed hit count of `key` (0 for a key never hit)."""
        return self._decayed(key, time.monotonic() if now is None else now)

    def keeps(self, kept: Hashable, candidate: Hashable, now: float | None = None) -> bool:
        """Whether the compacted prefix `kept` stays out of the room of a job on `candidate`: the candidate has
        not been hit more than `displace_factor` times as much (0: never kept, the engine's LRU order decides)."""
        if self.displace_factor == 0:
            return False
        now = time.monotonic() if now is None else now
        return self.displace_factor * self.value(kept, now) >= self.value(candidate, now)


@dataclass
class RoomWait:
    """How long the queued job has found no room while no request ran (requests that run will free slots,
    so their presence restarts the wait)."""

    bound_s: float = NO_ROOM_WAIT_S
    since: float | None = None

    def clear(self) -> None:
        """Room was found, or requests run: the wait starts afresh next time."""
        self.since = None

    def expired(self, now: float | None = None, running: bool = False) -> bool:
        """Note one more check without room; True once there was none for `bound_s` while no request ran (the
        wait is then cleared for the next job). `running`: requests run now, which will free slots: the wait
        starts afresh."""
        if running:
            self.since = None
            return False
        now = time.monotonic() if now is None else now
        if self.since is None:
            self.since = now
            return False
        if now - self.since >= self.bound_s:
            self.since = None
            return True
        return False
