# SPDX-License-Identifier: Apache-2.0
"""Compression jobs: a small state machine and a bounded queue.

    PENDING -> SCORING -> COMPACTING -> COMMITTED
       |          |            |
       +----------+------------+--> FAILED | CANCELLED

The queue never blocks the serving step: `submit` refuses (returns None) when full or when the
prefix already has a live job, and `start_next` hands out at most `max_running` jobs at a time.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvzip_plugin.detection import PrefixCandidate


class JobStatus(enum.Enum):
    PENDING = "pending"
    SCORING = "scoring"
    COMPACTING = "compacting"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMMITTED, JobStatus.FAILED, JobStatus.CANCELLED)


_NEXT = {
    JobStatus.PENDING: {JobStatus.SCORING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.SCORING: {JobStatus.COMPACTING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.COMPACTING: {JobStatus.COMMITTED, JobStatus.FAILED, JobStatus.CANCELLED},
}


class InvalidTransition(RuntimeError):
    pass


_ids = itertools.count()


@dataclass
class CompressionJob:
    """One prefix's compression.

    Attributes:
        candidate: the prefix.
        job_id: unique, increasing.
        status: current state.
        error: why it failed or was cancelled.
        entered: monotonic time each state was entered (for durations).
    """

    candidate: PrefixCandidate
    job_id: int = field(default_factory=lambda: next(_ids))
    status: JobStatus = JobStatus.PENDING
    error: str | None = None
    entered: dict[JobStatus, float] = field(default_factory=lambda: {JobStatus.PENDING: time.monotonic()})

    def advance(self, status: JobStatus, error: str | None = None) -> None:
        """Move to `status`; raises `InvalidTransition` for a move the state machine forbids."""
        if status not in _NEXT.get(self.status, set()):
            raise InvalidTransition(f"job {self.job_id}: {self.status.value} -> {status.value}")
        self.status = status
        self.error = error
        self.entered[status] = time.monotonic()

    def seconds_in(self, status: JobStatus) -> float:
        """Time spent in `status` (so far, if still in it)."""
        if status not in self.entered:
            return 0.0
        later = [t for s, t in self.entered.items() if t >= self.entered[status] and s is not status]
        end = min(later) if later else time.monotonic()
        return end - self.entered[status]


@dataclass
class JobQueue:
    """Bounded FIFO of pending jobs plus the running ones, one live job per prefix key."""

    max_queued: int = 16
    max_running: int = 1
    _pending: deque[CompressionJob] = field(default_factory=deque)
    _running: dict[int, CompressionJob] = field(default_factory=dict)
    _by_key: dict[Hashable, CompressionJob] = field(default_factory=dict)
    finished: dict[JobStatus, int] = field(default_factory=lambda: {s: 0 for s in JobStatus if s.terminal})
    rejected: int = 0

    def submit(self, candidate: PrefixCandidate) -> CompressionJob | None:
        """Queue a job for `candidate`; None if the queue is full or the prefix has a live job."""
        if candidate.key in self._by_key or len(self._pending) >= self.max_queued:
            self.rejected += 1
            return None
        job = CompressionJob(candidate)
        self._pending.append(job)
        self._by_key[candidate.key] = job
        return job

    def peek(self) -> CompressionJob | None:
        """The job `start_next` would start (None if nothing is pending)."""
        return self._pending[0] if self._pending else None

    def start_next(self) -> CompressionJob | None:
        """Oldest pending job, moved to SCORING, if fewer than `max_running` run."""
        if not self._pending or len(self._running) >= self.max_running:
            return None
        job = self._pending.popleft()
        job.advance(JobStatus.SCORING)
        self._running[job.job_id] = job
        return job

    def finish(self, job: CompressionJob, status: JobStatus, error: str | None = None) -> None:
        """End a job (COMMITTED, FAILED or CANCELLED) and free its slot."""
        if not status.terminal:
            raise ValueError(f"{status} is not a terminal status")
        job.advance(status, error)
        self._running.pop(job.job_id, None)
        if job in self._pending:
            self._pending.remove(job)
        self._by_key.pop(job.candidate.key, None)
        self.finished[status] += 1

    def cancel(self, key: Hashable, reason: str) -> CompressionJob | None:
        """Cancel the live job of prefix `key`, if any (the caller rolls back its resources)."""
        job = self._by_key.get(key)
        if job is None:
            return None
        self.finish(job, JobStatus.CANCELLED, reason)
        return job

    def job_for(self, key: Hashable) -> CompressionJob | None:
        return self._by_key.get(key)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def running_jobs(self) -> list[CompressionJob]:
        return list(self._running.values())
