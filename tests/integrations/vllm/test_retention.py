# SPDX-License-Identifier: Apache-2.0
"""A queued job's room in vLLM's real `BlockPool` (`SchedulerState._can_start`, `kvzip_plugin.retention`):
compacted prefixes whose hits the job's candidate does not outweigh (`DISPLACE_FACTOR`) are not room for it
and move behind colder cached blocks in vLLM's free queue; colder ones are room; with no room while nothing
runs the job is cancelled after the bounded wait and its prefix backed off. No engine is started: the pool, its blocks,
hashes and free queue are vLLM's own; the scheduler is only its `waiting` / `running` lists."""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvzip_plugin.integrations.vllm import scheduler as vsched  # noqa: E402
from kvzip_plugin.integrations.vllm.scheduler import CompactedPrefix, SchedulerState, _Job  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id  # noqa: E402

from kvzip_plugin.config import KVzipConfig  # noqa: E402
from kvzip_plugin.detection import TriggerPolicy  # noqa: E402
from kvzip_plugin.retention import NO_ROOM_WAIT_S, HitMeter  # noqa: E402

BS = 16


def _hash(tag: str, i: int):
    return make_block_hash_with_group_id(hashlib.sha256(f"{tag}|{i}".encode()).digest(), 0)


def _cached(pool: BlockPool, tag: str, n: int) -> tuple[list, list]:
    """`n` blocks published under their own hashes and freed (ref 0, cached: LRU tail of the free queue)."""
    blocks = pool.get_new_blocks(n)
    hashes = [_hash(tag, i) for i in range(n)]
    for b, h in zip(blocks, hashes, strict=True):
        b.set_block_hash(h, BS)
        pool.cached_block_hash_to_block.insert(h, b)
    pool.free_blocks(blocks)
    return blocks, hashes


def _state(num_blocks: int, held: int, compacted: dict[str, int], candidate_hits: int = 2,
           displace_factor: float | None = None):
    """A pool of `num_blocks` (+ vLLM's null block): compacted prefixes (tag -> blocks, published in this
    order, so the first is the least recently used), `held` blocks in use by requests, and one queued job on
    a 4-block prefix hit `candidate_hits` times (its scoring needs 2 x 4 + 2 = 10 blocks)."""
    pool = BlockPool(num_gpu_blocks=num_blocks + 1, enable_caching=True, hash_block_size=BS)
    meter = None if displace_factor is None else HitMeter(displace_factor=displace_factor)
    state = SchedulerState(KVzipConfig(), TriggerPolicy(min_prefix_tokens=BS, min_hits=2), vllm_config=None,
                           meter=meter)
    state.pool, state.block_size = pool, BS
    for tag, n in compacted.items():
        blocks, hashes = _cached(pool, tag, n)
        state.compacted[tag] = CompactedPrefix(tag, 8 * n * BS, n * BS, blocks, hashes)
    pool.get_new_blocks(held)  # running requests' blocks, as it were
    offer = state.admission.offer("cand", 4 * BS, now=0.0)
    assert offer.job is not None
    state.admission.meter.hit("cand", 0.0, n=candidate_hits - 2)
    state.jobs[offer.job.job_id] = _Job(offer.job, list(range(4 * BS)), request=None)
    return state, pool


def _sched(running: bool = False):
    return SimpleNamespace(waiting=[], running=[object()] if running else [])


def test_cold_compacted_prefixes_are_room_for_a_job():
    """14 free blocks, 6 of them two compacted prefixes never hit: room 14 >= 10, the job may start."""
    state, pool = _state(num_blocks=20, held=6, compacted={"a": 3, "b": 3})
    assert pool.get_num_free_blocks() == 14
    assert state._can_start(_sched())


def test_a_prefix_hit_as_often_as_the_candidate_is_kept_and_moved_behind_colder_blocks(monkeypatch):
    """Prefix "a" (published first: vLLM would evict it first) has served 2 hits, like the candidate: its 3
    blocks are not room (14 - 3 = 11 >= 10, the job starts) and move to the tail of the free queue, so the
    job's allocations evict "b" (never hit) first; "a" survives an allocation of every other free block."""
    state, pool = _state(num_blocks=20, held=6, compacted={"a": 3, "b": 3})
    state.admission.note_compressed_hit("a", now=0.0)
    state.admission.note_compressed_hit("a", now=0.0)
    monkeypatch.setattr(vsched.time, "monotonic", lambda: 0.0)
    assert state._can_start(_sched())
    taken = pool.get_new_blocks(pool.get_num_free_blocks() - 3)  # the job's and clients' allocations
    assert state.compacted["a"].alive() and not state.compacted["b"].alive()
    assert {b.block_id for b in state.compacted["a"].blocks}.isdisjoint(b.block_id for b in taken)


def test_without_the_move_vllm_would_evict_the_kept_prefix_first():
    """The check above is not vacuous: in vLLM's own order the first published prefix goes first."""
    state, pool = _state(num_blocks=20, held=6, compacted={"a": 3, "b": 3})
    pool.get_new_blocks(pool.get_num_free_blocks() - 3)
    assert not state.compacted["a"].alive() and state.compacted["b"].alive()


def test_a_job_that_would_displace_a_hotter_prefix_waits_then_is_cancelled_and_backed_off(monkeypatch, caplog):
    """8 free + 3 kept = 11 free blocks, 10 needed: without the kept prefix there is no room. The job waits
    while requests run; with nothing running it is cancelled after `NO_ROOM_WAIT_S` (nothing evicted) and its
    prefix backed off; once the kept prefix's hits have decayed it is room again."""
    from kvzip_plugin.admission import NO_ROOM_BACKOFF_S

    state, pool = _state(num_blocks=20, held=9, compacted={"a": 3})
    clock = [0.0]
    monkeypatch.setattr(vsched.time, "monotonic", lambda: clock[0])
    for _ in range(3):
        state.admission.note_compressed_hit("a", now=0.0)
    assert not state._can_start(_sched())  # the wait starts
    clock[0] += NO_ROOM_WAIT_S
    assert not state._can_start(_sched(running=True))  # requests run: the wait starts afresh
    assert not state._can_start(_sched())
    clock[0] += NO_ROOM_WAIT_S - 1
    assert not state._can_start(_sched()) and state.queue.peek() is not None
    clock[0] += 1
    with caplog.at_level(logging.WARNING, logger="vllm.kvzip_plugin.scheduler"):
        assert not state._can_start(_sched())
    assert state.queue.peek() is None and state.jobs == {} and state.stats.jobs["cancelled"] == 1
    assert ("it needs 10 blocks, 11 are free or cached (of which 3 hold compacted prefixes kept: this one is not "
            f"hit more than 2x as often); no new job for it for {NO_ROOM_BACKOFF_S:.0f} s") in caplog.text
    assert state.compacted["a"].alive()
    assert not state.admission.eligible("cand", clock[0])  # backed off

    # with `--kv-compression-displace-factor 0` the same pool is room (vLLM's LRU order decides)
    off, _ = _state(num_blocks=20, held=9, compacted={"a": 3}, displace_factor=0.0)
    for _ in range(3):
        off.admission.note_compressed_hit("a", now=clock[0])
    assert off._can_start(_sched())

    # an hour later "a" is colder than a candidate hit twice now
    later = clock[0] + 3600.0
    state.admission.meter.hit("cand2", later, n=2)
    assert not state.admission.keeps("a", "cand2", later)


def test_hits_on_a_queued_jobs_prefix_still_count_for_it():
    """Real vLLM requests (vLLM's block hasher): the second request on a 4-block document queues a job (2 hits
    with the request that cached it); later requests on it are not offered again (covered) but each adds one
    hit to the job's weight, so a job waiting for room can come to outweigh a colder compacted prefix."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    state, _ = _state(num_blocks=20, held=0, compacted={})
    hasher = get_request_block_hasher(BS, sha256)
    doc = list(range(1000, 1000 + 4 * BS))

    def request(i: int) -> Request:
        return Request(f"r{i}", doc + [i, i + 1], SamplingParams(max_tokens=1), None, block_hasher=hasher)

    first = request(1)
    key = first.block_hashes[3]
    state.observe(first, 0)  # computed, not hit: nothing yet
    state.observe(request(2), 4 * BS)
    job = state.queue.job_for(key)
    assert job is not None and job.candidate.hits == 2
    before = state.admission.meter.value(key)
    for i in range(3, 6):
        state.observe(request(i), 4 * BS)
    assert state.queue.job_for(key) is job and len(state.jobs) == 2  # "cand" of `_state` and this one
    assert state.admission.meter.value(key) == pytest.approx(before + 3, rel=1e-3)
