# SPDX-License-Identifier: Apache-2.0
"""`Admission`: the hit-counting / submission / retry rules both engines share."""

from __future__ import annotations

import pytest

from kvzip_plugin.admission import MAX_RETRIES, NO_ROOM_BACKOFF_MAX_S, NO_ROOM_BACKOFF_S, Admission
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.jobs import JobQueue, JobStatus


def _admission(min_hits: int = 2, **kw) -> Admission:
    return Admission(TriggerPolicy(min_prefix_tokens=64, min_hits=min_hits), **kw)


def _run(adm: Admission, key: str, status: JobStatus, **kw) -> str:
    """Offer `key` until it is submitted, start its job and end it with `status`."""
    for _ in range(adm.policy.min_hits + 1):
        offer = adm.offer(key, 128)
        if offer.job is not None:
            break
    assert offer.job is not None
    job = adm.queue.start_next()
    assert job is offer.job
    if status is JobStatus.COMMITTED:
        job.advance(JobStatus.COMPACTING)
    return adm.finish(job, status, "test", **kw)


def test_the_caching_request_counts_as_the_first_hit():
    adm = _admission(min_hits=2)
    offer = adm.offer("p", 128)  # one request hit it: with the request that cached it, 2 hits
    assert offer.candidate is not None and offer.candidate.hits == 2
    assert offer.job is not None and offer.job.candidate.key == "p" and not offer.rejected
    assert adm.queue.queued == 1
    assert adm.offer("p", 128).candidate is None  # proposed once


def test_min_hits_one_submits_on_the_first_hit():
    """The request that cached the prefix already makes one hit: the first request that hits it
    submits the job (it used to be swallowed: the caching request's observation made the candidate)."""
    adm = _admission(min_hits=1)
    offer = adm.offer("p", 128)
    assert offer.job is not None and offer.candidate.hits == 1
    assert adm.queue.queued == 1 and adm.offer("p", 128).candidate is None


def test_min_hits_three_needs_two_hits():
    adm = _admission(min_hits=3)
    assert adm.offer("p", 128).candidate is None
    assert adm.offer("p", 128).job is not None


def test_short_prefixes_are_not_counted():
    adm = _admission()
    assert adm.offer("p", 63).candidate is None
    assert adm.tracker.hits("p") == 0


def test_a_full_queue_rejects():
    adm = _admission(min_hits=2, queue=JobQueue(max_queued=1))
    assert adm.offer("a", 128).job is not None
    offer = adm.offer("b", 128)
    assert offer.candidate is not None and offer.job is None and offer.rejected


def test_commit_counts_nothing_against_the_prefix():
    adm = _admission()
    assert _run(adm, "p", JobStatus.COMMITTED) == "committed"
    assert adm.failures == {} and adm.failed == set() and adm.eligible("p")
    assert adm.queue.finished[JobStatus.COMMITTED] == 1


@pytest.mark.parametrize("status,outcome", [(JobStatus.FAILED, "failed"), (JobStatus.CANCELLED, "cancelled")])
def test_after_a_failed_or_cancelled_job_the_prefix_needs_min_hits_new_hits(status, outcome):
    adm = _admission(min_hits=2)
    assert _run(adm, "p", status) == outcome
    # the request that cached it no longer counts: one hit is not enough any more
    assert adm.offer("p", 128).candidate is None
    assert adm.offer("p", 128).job is not None
    assert adm.failures.get("p", 0) == (1 if status is JobStatus.FAILED else 0)


def test_failed_jobs_are_retried_max_retries_times():
    adm = _admission()
    for _ in range(MAX_RETRIES):
        assert adm.eligible("p")
        _run(adm, "p", JobStatus.FAILED)
    assert not adm.eligible("p")
    assert all(adm.offer("p", 128).candidate is None for _ in range(5))
    assert adm.eligible("q")  # other prefixes are unaffected


def test_cancelled_jobs_do_not_use_up_retries():
    adm = _admission()
    for _ in range(MAX_RETRIES + 2):
        _run(adm, "p", JobStatus.CANCELLED)
    assert adm.eligible("p") and adm.failures == {}


def test_an_unservable_prefix_is_never_offered_again():
    adm = _admission()
    assert _run(adm, "p", JobStatus.FAILED, unservable=True) == "failed"
    assert not adm.eligible("p")
    assert all(adm.offer("p", 128).candidate is None for _ in range(5))


def test_a_prompt_sent_again_is_not_a_shared_prefix():
    """`vllm bench serve` sends prompt 0 twice: the second send hits the whole prompt, but no other prompt
    continues it, so it must not count (it made the 1,728-token prompt a job mid-run)."""
    adm = Admission(TriggerPolicy(min_prefix_tokens=64, min_hits=2))
    assert adm.note_prompt("prompt-A") is False  # first seen: computed, it caches the prefix
    assert adm.note_prompt("prompt-A") is True  # the same prompt again: its hit is not offered
    assert adm.note_prompt("prompt-B") is False  # another prompt on the same prefix counts
    offer = adm.offer("prefix", 128)
    assert offer.job is not None and offer.candidate.hits == 2


def test_seen_prompts_are_bounded_least_recently_seen_first():
    adm = Admission(TriggerPolicy(min_prefix_tokens=64, min_hits=2), max_seen=2)
    for prompt in ("a", "b", "a", "c"):  # "a" seen again, so "b" is the least recent when "c" arrives
        adm.note_prompt(prompt)
    assert list(adm.seen) == ["a", "c"]
    assert adm.note_prompt("b") is False


def _offer_until(adm: Admission, key: str, now: float, tries: int = 4):
    """Offer `key` up to `tries` times at `now`; the job submitted, or None."""
    for _ in range(tries):
        offer = adm.offer(key, 128, now=now)
        if offer.job is not None:
            return offer.job
    return None


def test_a_no_room_cancel_backs_the_prefix_off_doubling_and_a_commit_clears_it():
    """A job cancelled because the engine had no room (SGLang: the pool cannot hold its scoring) is not
    tried again at once: every try would wait out its bound and be cancelled again. The back-off doubles
    with each such cancel, up to the cap; other prefixes, and other cancels, are not affected."""
    adm = _admission(min_hits=2)
    t = 1000.0
    waits = []
    for _ in range(6):
        job = _offer_until(adm, "p", t)
        assert job is not None and adm.queue.start_next() is job
        waits.append(adm.no_room_backoff_s("p"))
        assert adm.finish(job, JobStatus.CANCELLED, "no room", no_room=True, now=t) == "cancelled"
        assert _offer_until(adm, "p", t + waits[-1] - 1) is None  # backed off: hits are not even counted
        t += waits[-1]
    assert waits == [min(NO_ROOM_BACKOFF_S * 2 ** i, NO_ROOM_BACKOFF_MAX_S) for i in range(6)]
    assert "other" not in adm.backoff and adm.eligible("other", now=t - 1)  # only that prefix backs off
    assert waits[-1] == NO_ROOM_BACKOFF_MAX_S and waits[0] == NO_ROOM_BACKOFF_S
    assert adm.failures.get("p", 0) == 0  # not a failure: the prefix is not given up on
    job = _offer_until(adm, "p", t)
    assert job is not None and adm.queue.start_next() is job
    job.advance(JobStatus.COMPACTING)
    assert adm.finish(job, JobStatus.COMMITTED, None, now=t) == "committed"
    assert "p" not in adm.backoff and adm.no_room_backoff_s("p") == NO_ROOM_BACKOFF_S


def test_other_cancels_do_not_back_off():
    adm = _admission(min_hits=2)
    job = _offer_until(adm, "p", 0.0)
    adm.queue.start_next()
    adm.finish(job, JobStatus.CANCELLED, "client abort", now=0.0)
    assert _offer_until(adm, "p", 1.0) is not None  # new hits submit again at once
