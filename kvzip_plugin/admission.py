# SPDX-License-Identifier: Apache-2.0
"""Admission of hot prefixes to compression jobs, and what a job's end means for the next try.

Both engines report every request's cached-prefix hit here (`offer`) and every job's end (`finish`).
The rules, shared so vLLM and SGLang behave the same:

* a prefix is counted by `PrefixTracker`; the request that cached it counts as its first hit (it
  was computed, not hit, so it never reports itself);
* a prefix is *shared* when different prompts continue it: every request's whole prompt is noted
  (`note_prompt`) and a request whose prompt was seen before (the same prompt sent again, e.g. a
  client's retry or a benchmark's warm-up) counts no hit;
* once hot, a job is submitted to the bounded `JobQueue` (refused when full or already queued);
* a failed or cancelled job reopens the prefix: it needs `min_hits` *new* hits before the next try
  (the caching request no longer counts);
* a prefix whose jobs failed `max_retries` times, or that can never be served here (`unservable`:
  e.g. its scoring input exceeds the engine's context), is not offered again;
* a job cancelled because the engine had no room to run it (`finish(..., no_room=True)`) backs its prefix
  off: no new job for it during `NO_ROOM_BACKOFF_S` after the first such cancel, doubling with each next one
  up to `NO_ROOM_BACKOFF_MAX_S` (room may come back, e.g. when tenants leave; until then every try would
  wait out its bound and be cancelled again);
* every counted hit, every hit on a prefix whose job is queued or running (`note_queued_hit`) and every hit a
  compacted prefix serves (`note_compressed_hit`) goes to `meter`
  (`retention.HitMeter`): a queued job may displace only compacted prefixes colder than its candidate
  (`retention.py`).

The engine keeps what is engine-specific: the prefix key (vLLM's chained block hash, SGLang's
digest of the token ids + namespace), which prefixes are already covered by a compacted or
in-flight one, the job's work, and the metrics it counts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvzip_plugin.detection import PrefixCandidate, PrefixTracker, TriggerPolicy
from kvzip_plugin.jobs import CompressionJob, JobQueue, JobStatus
from kvzip_plugin.retention import HitMeter

MAX_RETRIES = 3
"""Failed jobs per prefix before it is given up."""

NO_ROOM_BACKOFF_S = 300.0
"""No new job for a prefix this long after its first job cancelled for want of room (doubling after each next)."""

NO_ROOM_BACKOFF_MAX_S = 3600.0
"""The longest no-room back-off."""

MAX_SEEN_PROMPTS = 65536
"""Whole prompts remembered to tell a repeated prompt from a new one (least recently seen dropped)."""


@dataclass
class Offer:
    """The outcome of `Admission.offer` for one request's hit.

    Attributes:
        candidate: the prefix became hot with this hit (None: not yet, or not eligible).
        job: the job submitted for it (None when the queue refused it: `rejected`).
    """

    candidate: PrefixCandidate | None = None
    job: CompressionJob | None = None

    @property
    def rejected(self) -> bool:
        return self.candidate is not None and self.job is None


@dataclass
class Admission:
    """Hit counting, job submission and retry bookkeeping of one engine instance."""

    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
    max_retries: int = MAX_RETRIES
    tracker: PrefixTracker = field(init=False)
    queue: JobQueue = field(default_factory=JobQueue)
    failed: set[Hashable] = field(default_factory=set)
    """Prefixes whose last job failed or was cancelled: the caching request no longer counts."""
    failures: dict[Hashable, int] = field(default_factory=dict)
    """Failed jobs per prefix."""
    unservable: set[Hashable] = field(default_factory=set)
    """Prefixes that can never be compressed by this engine instance."""
    max_seen: int = MAX_SEEN_PROMPTS
    seen: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)
    """Digests of the whole prompts seen, most recent last."""
    backoff: dict[Hashable, tuple[float, int]] = field(default_factory=dict)
    """Prefixes backed off after no-room cancels: (no job before this `time.monotonic()`, cancels so far)."""
    meter: HitMeter = field(default_factory=HitMeter)
    """Decayed hits per prefix, as a candidate and served compacted (which compacted prefixes a job may displace)."""

    def __post_init__(self) -> None:
        self.tracker = PrefixTracker(self.policy)

    def note_prompt(self, prompt: Hashable) -> bool:
        """Record one new request's whole prompt (a digest the engine makes: tokens + namespace); True
        if the same prompt was seen before, in which case its hit is no evidence of sharing."""
        repeat = prompt in self.seen
        if repeat:
            self.seen.move_to_end(prompt)
        else:
            self.seen[prompt] = None
            while len(self.seen) > self.max_seen:
                self.seen.popitem(last=False)
        return repeat

    def eligible(self, key: Hashable, now: float | None = None) -> bool:
        """False for prefixes given up on (unservable, or `max_retries` failed jobs) or backed off (no room)."""
        until = self.backoff.get(key)
        if until is not None and (time.monotonic() if now is None else now) < until[0]:
            return False
        return key not in self.unservable and self.failures.get(key, 0) < self.max_retries

    def offer(self, key: Hashable, num_tokens: int, salt: str | None = None, now: float | None = None) -> Offer:
        """Count one request's hit on the cached prefix `key` (`num_tokens` long); submit a job the
        first time the prefix qualifies. The caller has already checked that the prefix is not
        covered by a compacted or in-flight one. `now`: `time.monotonic()` unless given (tests)."""
        if not self.eligible(key, now) or num_tokens < self.policy.min_prefix_tokens:
            return Offer()
        candidate = None
        if self.tracker.hits(key) == 0 and key not in self.failed:  # the request that cached it
            self.meter.hit(key, now)
            candidate = self.tracker.observe(key, num_tokens, (), salt)  # qualifies already with min_hits=1
        if candidate is None:
            self.meter.hit(key, now)
            candidate = self.tracker.observe(key, num_tokens, (), salt)
        if candidate is None:
            return Offer()
        return Offer(candidate, self.queue.submit(candidate))

    def note_compressed_hit(self, key: Hashable, now: float | None = None) -> None:
        """A request was served by the compacted prefix `key` (the key its job's candidate had)."""
        self.meter.hit(key, now)

    def note_queued_hit(self, key: Hashable, now: float | None = None) -> None:
        """A request hit the prefix `key` whose job is queued or running (not offered again): it still weighs in
        the job's favour, so a job waiting for room can come to outweigh a colder compacted prefix."""
        self.meter.hit(key, now)

    def keeps(self, kept: Hashable, candidate: Hashable, now: float | None = None) -> bool:
        """Whether the compacted prefix `kept` must not be displaced by a job on `candidate` (`HitMeter.keeps`)."""
        return self.meter.keeps(kept, candidate, now)

    def no_room_backoff_s(self, key: Hashable) -> float:
        """How long the next no-room cancel of `key` backs it off: `NO_ROOM_BACKOFF_S`, doubled for each earlier
        one, at most `NO_ROOM_BACKOFF_MAX_S`."""
        return min(NO_ROOM_BACKOFF_S * 2 ** self.backoff.get(key, (0.0, 0))[1], NO_ROOM_BACKOFF_MAX_S)

    def finish(self, job: CompressionJob, status: JobStatus, error: str | None = None, *,
               unservable: bool = False, no_room: bool = False, now: float | None = None) -> str:
        """Record `job`'s end in the queue and the retry bookkeeping; returns its outcome label
        (`committed`, `failed` or `cancelled`, as in `kvzip_jobs_total{outcome}`). `unservable`: the
        same prefix would fail the same way again, never retry it. `no_room`: cancelled because the engine
        had no room to run it: back the prefix off (`NO_ROOM_BACKOFF_S`, doubling)."""
        self.queue.finish(job, status, error)
        key = job.candidate.key
        if unservable:
            self.unservable.add(key)
        if status is JobStatus.COMMITTED:
            self.backoff.pop(key, None)
            return "committed"
        if no_room:
            start = time.monotonic() if now is None else now
            self.backoff[key] = (start + self.no_room_backoff_s(key), self.backoff.get(key, (0.0, 0))[1] + 1)
        self.tracker.reopen(key)
        self.failed.add(key)
        if status is JobStatus.FAILED:
            self.failures[key] = self.failures.get(key, 0) + 1
            return "failed"
        return "cancelled"
