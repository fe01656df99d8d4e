# SPDX-License-Identifier: Apache-2.0
"""Prefix tracker trigger policy and the job state machine / bounded queue."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvzip_plugin.detection import PrefixCandidate, PrefixTracker, TriggerPolicy
from kvzip_plugin.jobs import CompressionJob, InvalidTransition, JobQueue, JobStatus


def tracker(min_tokens=64, min_hits=2, **kw) -> PrefixTracker:
    return PrefixTracker(TriggerPolicy(min_prefix_tokens=min_tokens, min_hits=min_hits), **kw)


def test_prefix_is_proposed_once_after_enough_hits():
    t = tracker(min_hits=3)
    assert t.observe("h1", 128, [1, 2]) is None
    assert t.observe("h1", 128, [1, 2]) is None
    cand = t.observe("h1", 128, [1, 2], salt="tenant-a")
    assert cand == PrefixCandidate("h1", 128, (1, 2), None, 3)
    assert t.observe("h1", 128, [1, 2]) is None  # deduplicated
    assert t.hits("h1") == 4


def test_short_prefixes_are_ignored():
    t = tracker(min_tokens=64, min_hits=1)
    assert t.observe("short", 63, [1]) is None
    assert len(t) == 0
    assert t.observe("long", 64, [1]) is not None


def test_salted_chains_are_distinct_prefixes():
    t = tracker(min_hits=2)
    t.observe(("h", "salt-a"), 128, [1])
    assert t.observe(("h", "salt-b"), 128, [2]) is None
    assert t.observe(("h", "salt-a"), 128, [1]) is not None


def test_forget_and_reopen():
    t = tracker(min_hits=2)
    t.observe("k", 128, [1])
    assert t.forget("k") is True and t.forget("k") is False
    assert t.observe("k", 128, [1]) is None  # counting restarts
    assert t.observe("k", 128, [1]) is not None
    t.reopen("k")
    assert t.observe("k", 128, [1]) is None
    assert t.observe("k", 128, [1]) is not None


def test_tracker_memory_is_bounded_lru():
    t = tracker(min_hits=2, max_tracked=3)
    for key in ("a", "b", "c"):
        t.observe(key, 128, [1])
    assert t.observe("a", 128, [1]) is not None  # "a" is now the most recent (and proposed)
    t.observe("d", 128, [1])  # evicts "b", the least recently hit
    assert len(t) == 3 and t.hits("b") == 0 and t.hits("a") == 2


@pytest.mark.parametrize("bad", [{"min_prefix_tokens": 0}, {"min_hits": 0}, {"min_hits": "x"}, {"other": 1}])
def test_trigger_policy_validation(bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        TriggerPolicy(**bad)


def cand(key="k") -> PrefixCandidate:
    return PrefixCandidate(key, 128, (1, 2), None, 2)


def test_job_state_machine():
    job = CompressionJob(cand())
    assert job.status is JobStatus.PENDING
    job.advance(JobStatus.SCORING)
    job.advance(JobStatus.COMPACTING)
    job.advance(JobStatus.COMMITTED)
    assert job.status.terminal
    with pytest.raises(InvalidTransition):
        job.advance(JobStatus.SCORING)
    with pytest.raises(InvalidTransition):
        CompressionJob(cand()).advance(JobStatus.COMMITTED)
    assert job.seconds_in(JobStatus.SCORING) >= 0


def test_queue_bounds_dedup_and_running_limit():
    q = JobQueue(max_queued=2, max_running=1)
    a, b = q.submit(cand("a")), q.submit(cand("b"))
    assert a and b and q.submit(cand("c")) is None  # full
    assert q.submit(cand("a")) is None  # live job for "a"
    assert q.rejected == 2
    assert q.peek() is a and a.status is JobStatus.PENDING  # peek does not start it
    first = q.start_next()
    assert first is a and first.status is JobStatus.SCORING and q.peek() is b
    assert q.start_next() is None  # max_running reached
    q.finish(first, JobStatus.FAILED, "boom")
    assert q.finished[JobStatus.FAILED] == 1 and q.running == 0
    assert q.submit(cand("a")) is not None  # "a" may be retried now
    assert q.start_next() is b


def test_cancel_pending_and_running_jobs():
    q = JobQueue(max_queued=4, max_running=1)
    running = q.submit(cand("r"))
    pending = q.submit(cand("p"))
    q.start_next()
    assert q.cancel("p", "prefix freed") is pending and pending.status is JobStatus.CANCELLED
    assert q.cancel("r", "prefix freed") is running and q.running == 0 and q.queued == 0
    assert q.cancel("missing", "x") is None
    assert q.finished[JobStatus.CANCELLED] == 2
    with pytest.raises(ValueError):
        q.finish(running, JobStatus.SCORING)
