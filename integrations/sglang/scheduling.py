# SPDX-License-Identifier: Apache-2.0
"""Admission and scoring requests of KVzip in SGLang: which prefixes become jobs, and each job's life
from queued to committed, failed or cancelled (all on the scheduler thread).

1. Detection (`observe`, from `KVzipRadixCache.match_prefix`): every new request's tree hit is reported
   once to the core's `Admission`, keyed by (namespace, L, digest of the L tokens).
2. Scoring (`pump`, after every batch and when idle): a job locks the prefix's tree path (originals
   pinned) and adds internal requests `kvzip-score-<job>-<chunk>` to the scheduler's waiting queue, one
   per reconstruction chunk: prefix + "repeat the previous context" input, max_new_tokens=1,
   `skip_radix_cache_insert`. Their prefix is a tree hit (capped at L by `scoring_len`), so only the
   repeat input is computed, as ordinary prefill; `capture.ScoreCapture` scores it in the attention
   layers. With the `kvzip_head` scorer there is no scoring pass: the head scores make the plan.
3. Compaction (`_compact`, once every scoring request finished): the kept runs are chosen and copied into
   fresh slots (`compaction.py`) and published as a `store.CompactedPrefix`; the tree lock is released.
   Failure or cancellation frees the new slots and leaves the tree as it was."""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from kvzip_plugin.integrations.sglang.adoption import plain_tokens
from kvzip_plugin.integrations.sglang.compaction import KeptRuns, SlotAllocator, choose_runs, copy_kept, page_slots
from kvzip_plugin.integrations.sglang.metrics import write_job
from kvzip_plugin.integrations.sglang.store import Namespace, namespace_of
from sglang.srt.mem_cache.base_prefix_cache import TreeLock
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvzip_plugin import envs
from kvzip_plugin.admission import Admission
from kvzip_plugin.compaction import CompactionTxn
from kvzip_plugin.head_scores import head_level_scores
from kvzip_plugin.jobs import CompressionJob, JobStatus
from kvzip_plugin.metrics import ScoringClock
from kvzip_plugin.retention import RoomWait
from kvzip_plugin.scoring.plan import SCORING_OVERHEAD, Unservable, plan_scoring, protected_tokens

if TYPE_CHECKING:
    from kvzip_plugin.integrations.sglang.radix_cache import KVzipRadixCache

logger = logging.getLogger("sglang.kvzip_plugin")

SCORING_PREFIX = "kvzip-score-"
SEEN_ATTR = "_kvzip_observed"
MAX_ALLOC_WAIT_PUMPS = 200  # pumps a scored job may wait for free slots before it fails
MIN_CHUNK = 16  # shortest scoring chunk (vLLM: the core default, 32)


def is_scoring_rid(rid: Any) -> bool:
    return isinstance(rid, str) and rid.startswith(SCORING_PREFIX)


def _digest(namespace: Namespace, tokens: array) -> Hashable:
    """A token sequence in a namespace: the key of a prefix, or the identity of a whole prompt."""
    return (namespace, len(tokens), hashlib.blake2b(tokens.tobytes(), digest_size=16).digest())


@dataclass
class Job:
    job: CompressionJob
    tokens: array
    namespace: Namespace
    lora_id: Any
    n_protected: int = 0
    lock: TreeLock | None = None
    node: Any = None
    reqs: dict[str, Any] = field(default_factory=dict)  # pending scoring Req objects
    unsent: list[Any] = field(default_factory=list)  # sliced scoring: requests not handed to SGLang yet
    scoring_started: float = 0.0
    clock: ScoringClock = field(default_factory=ScoringClock)  # forward time of its scoring requests
    txn: CompactionTxn | None = None
    waits: int = 0
    scores: torch.Tensor | None = None  # [layers, H_kv, n_context], taken from the capture at compaction
    runs: KeptRuns | None = None  # what it keeps, once chosen


class Cancelled(RuntimeError):
    pass


class Jobs:
    """Admission, scoring requests and compaction of the cache's jobs. `cache` gives the tree, the pools,
    the capture and the entries; this class owns the jobs and the scoring requests' prefix caps."""

    def __init__(self, cache: KVzipRadixCache) -> None:
        self.cache = cache
        # hit counting (with the retention meter), job queue, retries (shared with vLLM)
        self.admission = Admission(cache.kvzip_trigger, meter=cache.kvzip_settings.hit_meter())
        self.live: dict[int, Job] = {}
        self.scoring_len: dict[str, int] = {}  # scoring rid -> prefix length its match is capped at
        self.room_wait = RoomWait()  # how long the queued job has found no room while nothing ran

    # ------------------------------------------------------------------ detection

    def observe(self, req: Any, key: RadixKey, device_prefix_len: int) -> None:
        """A new request hit `device_prefix_len` cached tokens: count the hit, maybe queue a job."""
        cache = self.cache
        if getattr(req, SEEN_ATTR, False):
            return
        setattr(req, SEEN_ATTR, True)
        if key.is_bigram or not plain_tokens(req):
            return
        namespace = namespace_of(key)
        if self.admission.note_prompt(_digest(namespace, key.token_ids)):  # the same prompt again: not sharing
            return
        L = device_prefix_len // cache.page_size * cache.page_size
        if L < cache.kvzip_trigger.min_prefix_tokens:
            return
        tokens = key.token_ids[:L]
        ckey = _digest(namespace, tokens)
        queued = next((j.job.candidate.key for j in self.live.values()
                       if j.namespace == namespace and len(j.tokens) <= L and tokens[:len(j.tokens)] == j.tokens), None)
        if queued is not None:  # its job waits or runs: the hit still weighs for it (retention.py)
            self.admission.note_queued_hit(queued)
        if not self.admission.eligible(ckey) or self._covered(namespace, tokens):
            return
        offer = self.admission.offer(ckey, L, key.cache_salt)
        if offer.candidate is None:
            return
        job, candidate = offer.job, offer.candidate
        cache.stats.jobs["submitted" if job else "rejected"] += 1
        if job is not None:
            self.live[job.job_id] = Job(job, array("q", tokens), namespace, getattr(req, "lora_id", None))
            cache.mark_dirty()
            logger.info("kvzip-plugin: job %d queued for a %d-token prefix hit by %d requests", job.job_id, L,
                        candidate.hits)

    def reopen(self, key: Hashable) -> None:
        """A compacted prefix was dropped: the document may be compressed again."""
        self.admission.tracker.reopen(key)

    def _covered(self, namespace: Namespace, tokens: array) -> bool:
        """A prefix that contains a compacted or in-flight one, or lies inside one, is not compressed again."""
        n = len(tokens)
        others = [e.tokens for e in self.cache.entries.of(namespace)]
        others += [j.tokens for j in self.live.values() if j.namespace == namespace]
        for other in others:
            m = min(n, len(other))
            if tokens[:m] == other[:m]:
                return True
        return False

    # ------------------------------------------------------------------ the pump

    def pending(self) -> bool:
        """Whether a job is queued or running (the scheduler must keep pumping, not sleep)."""
        return bool(self.live) or self.admission.queue.peek() is not None

    def pump(self, sched: Any) -> None:
        """Notice finished scoring requests, commit compactions, start queued jobs."""
        if sched is not None:
            self._check_scoring(sched)
            self._send_next(sched)
        for j in list(self.live.values()):
            if j.job.status is JobStatus.SCORING and j.reqs == {} and j.scoring_started:
                self._compact(j)
        if sched is not None:
            while self._can_start(sched) and (job := self.admission.queue.start_next()) is not None:
                self._start(self.live[job.job_id], sched)

    def _can_start(self, sched: Any) -> bool:
        """Jobs yield to traffic: start one only when no request waits for admission and the pool has
        room for its scoring input and its destination slots: free slots plus what SGLang may evict (the
        tree's unlocked nodes and the unpinned compacted entries), less the unpinned compacted entries the
        job must not displace (`retention.py`: its candidate is not hit more than
        `--kv-compression-displace-factor` times as often); those are then made the most recently used, so the
        job's allocations evict colder entries first. A job that finds no room while no request runs (nothing
        will free any) is cancelled after `NO_ROOM_WAIT_S`, with the sizes in the reason."""
        if len(sched.waiting_queue) > 0 or getattr(sched, "chunked_req", None) is not None:
            return False
        pending = self.admission.queue.peek()
        if pending is None:
            self.room_wait.clear()
            return False
        L = pending.candidate.num_tokens
        need = 2 * L + SCORING_OVERHEAD + self.cache.kvzip_config.carry_tokens
        now = time.monotonic()
        room = self.cache.token_to_kv_pool_allocator.available_size() + self.cache.evictable_size()
        # the kept entries matter only when the pool would have room with them (not looked at in the pumps a
        # queued job spends waiting for room)
        kept = [e for e in self.cache.entries
                if e.refs == 0 and self.admission.keeps(e.key, pending.candidate.key, now)] if room >= need else []
        held = sum(e.physical_length for e in kept)
        if room - held >= need:
            self.room_wait.clear()
            for e in kept:
                e.last_access = now
            return True
        running = getattr(sched, "running_batch", None)
        busy = running is not None and not running.is_empty()  # requests hold slots that they will free
        if self.room_wait.expired(now, running=busy) and (job := self.admission.queue.start_next()) is not None:
            wait = self.admission.no_room_backoff_s(job.candidate.key)
            kept_note = (f" (of which {held} in {len(kept)} compacted prefixes kept: this one is not hit more than "
                         f"{self.admission.meter.displace_factor:g}x as often)" if kept else "")
            self.end(self.live[job.job_id], JobStatus.CANCELLED,
                     f"no room in the KV pool to score it: it needs {need} token slots, {room} are free or "
                     f"evictable{kept_note} (--max-total-tokens too small for this prefix beside what the pool "
                     f"pins); no new job for it for {wait:.0f} s", no_room=True)
        return False

    def _start(self, j: Job, sched: Any) -> None:
        cache, cfg = self.cache, self.cache.kvzip_config
        L = len(j.tokens)
        try:
            key = RadixKey(token_ids=j.tokens, extra_key=j.namespace[0], cache_salt=j.namespace[1])
            match = cache.tree_match(key)
            if match.device_prefix_len < L:
                raise Cancelled("the prefix was evicted before its job started")
            j.node = match.last_device_node
            j.lock = cache.tree_lock(j.node)  # pinned until commit or rollback
            if cache.head_scores is not None:  # kvzip_head: no scoring pass, compacted at the next pump
                j.n_protected = protected_tokens(j.tokens, cache.tokenizer(sched), cfg)
                if cache.head_scores.shape[1] != cache.kv_pool.head_num:
                    raise Unservable(f"head scores for {cache.head_scores.shape[1]} KV heads, this rank holds "
                                     f"{cache.kv_pool.head_num} (TP > 1 is not supported by kvzip_head)")
                j.scores = head_level_scores(cache.head_scores, L - j.n_protected)
                j.runs = choose_runs(j.scores, j.n_protected, cfg, cache.page_size)
                j.scoring_started = time.perf_counter()
                cache.mark_dirty()
                logger.info("kvzip-plugin: job %d: %d tokens (%d protected), head-level scores (no scoring pass)",
                            j.job.job_id, L, j.n_protected)
                return
            max_len = int(getattr(sched, "max_req_input_len", None) or sched.model_config.context_len) - 1
            plan = plan_scoring(j.tokens, cache.tokenizer(sched), cfg, max_len, min_chunk=MIN_CHUNK)
            j.n_protected = plan.n_protected
            if envs.fault_injection() == "scoring":
                raise RuntimeError("fault injected (KVZIP_FAULT_INJECTION=scoring)")
            reqs, targets = [], {}
            for chunk, target in zip(plan.chunks, plan.targets(j.job.job_id, L, cfg.score_softmax), strict=True):
                rid = f"{SCORING_PREFIX}{j.job.job_id}-{chunk.index}"
                reqs.append(self._scoring_req(sched, rid, array("q", j.tokens) + array("q", chunk.input_ids), j))
                targets[rid] = target
            assert cache.capture is not None
            cache.capture.add_targets(targets)
            for req in reqs:  # only once every chunk is valid
                j.reqs[req.rid] = req
                self.scoring_len[req.rid] = L
            j.scoring_started = time.perf_counter()
            if cache.slicing is not None:  # one scoring request in SGLang at a time (`pump` sends the next)
                reqs, j.unsent = reqs[:1], reqs[1:]
            for req in reqs:
                sched._add_request_to_queue(req)
            cache.mark_dirty()
            logger.info("kvzip-plugin: job %d scoring %d tokens (%d protected) in %d chunk(s)", j.job.job_id, L,
                        j.n_protected, len(plan.chunks))
        except Cancelled as exc:
            self.end(j, JobStatus.CANCELLED, str(exc))
        except Unservable as exc:  # the same prefix would fail again: never retried
            self.end(j, JobStatus.FAILED, str(exc), unservable=True)
        except Exception as exc:
            self.end(j, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _scoring_req(sched: Any, rid: str, ids: array, j: Job):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        params.normalize(getattr(sched, "tokenizer", None))
        params.verify(sched.model_config.vocab_size)
        req = Req(rid, "", ids, params, lora_id=j.lora_id, extra_key=j.namespace[0], cache_salt=j.namespace[1],
                  eos_token_ids=sched.model_config.hf_eos_token_id, vocab_size=sched.model_config.vocab_size)
        req.tokenizer = getattr(sched, "tokenizer", None)
        req.skip_radix_cache_insert = True  # the repeat input must never serve later lookups
        req.logprob_start_len = -1
        sched.init_req_max_new_tokens(req)
        return req

    def _send_next(self, sched: Any) -> None:
        """Sliced scoring: a job's next scoring request once the previous one ended."""
        for j in self.live.values():
            if j.unsent and j.job.status is JobStatus.SCORING and len(j.reqs) == len(j.unsent):
                sched._add_request_to_queue(j.unsent.pop(0))

    def _check_scoring(self, sched: Any) -> None:
        waiting = {id(r) for r in sched.waiting_queue}
        for j in list(self.live.values()):
            if j.job.status is not JobStatus.SCORING:
                continue
            unsent = {id(r) for r in j.unsent}
            for rid, req in list(j.reqs.items()):
                if id(req) in unsent:
                    continue
                if req.finished() and not req.kv.holds_kv:
                    del j.reqs[rid]
                    self.scoring_len.pop(rid, None)
                    reason = type(req.finished_reason).__name__
                    if reason != "FINISH_LENGTH":
                        self.end(j, JobStatus.CANCELLED, f"scoring request {rid} ended with {reason}")
                        break
                elif not req.kv.holds_kv and id(req) not in waiting and not req.finished():
                    # taken out of the waiting queue without running (e.g. /abort_request abort_all)
                    self.end(j, JobStatus.CANCELLED, f"scoring request {rid} was aborted")
                    break

    def scoring_tokens(self, reqs: list[Any], lens: list[int]) -> dict[int, int]:
        """Scoring tokens per job in an extend batch of `reqs` with `lens` new tokens each."""
        owner = {rid: job_id for job_id, j in self.live.items() for rid in j.reqs}
        tokens: dict[int, int] = {}
        for req, n in zip(reqs, lens, strict=False):
            job_id = owner.get(req.rid)
            if job_id is not None:
                tokens[job_id] = tokens.get(job_id, 0) + int(n)
        return tokens

    # ------------------------------------------------------------------ compaction

    def _compact(self, j: Job) -> None:
        cache = self.cache
        L, page = len(j.tokens), cache.page_size
        capture = cache.capture
        assert capture is not None
        if j.runs is None:
            job_scores = capture.jobs.get(j.job.job_id)
            if job_scores is None:
                self.end(j, JobStatus.FAILED, "no scores were captured for this job")
                return
            j.scores = job_scores.scores
            j.runs = choose_runs(j.scores, j.n_protected, cache.kvzip_config, page)
        if j.txn is None:
            allocator = SlotAllocator(cache.token_to_kv_pool_allocator, page, cache.evict_tokens)
            txn = CompactionTxn(allocator, j.runs.n_pages)
            try:
                txn.prepare()
            except RuntimeError as exc:  # no room now: retry at the next pump (bounded)
                j.waits += 1
                if j.waits >= MAX_ALLOC_WAIT_PUMPS:
                    self.end(j, JobStatus.FAILED, f"no free KV slots for the compacted prefix: {exc}")
                return
            j.txn = txn
        j.job.advance(JobStatus.COMPACTING)
        t0 = time.perf_counter()
        capture.drop_job(j.job.job_id)
        P = j.runs.n_pages * page
        try:
            if envs.fault_injection() == "compaction":
                raise RuntimeError("fault injected (KVZIP_FAULT_INJECTION=compaction)")
            src = cache.tree_core.collect_full_device_indices(j.node, cache.root_node_handle(j.namespace[0]))
            if len(src) != L:
                raise RuntimeError(f"the prefix's tree path holds {len(src)} slots, expected {L}")
            dst = page_slots(j.txn.dst_block_ids, page, cache.token_to_kv_pool_allocator.device)
            src_pages = (src[::page] // page).tolist()
            store = copy_kept(j.runs, src_pages, list(j.txn.dst_block_ids), page,
                              [layer.layer_id for layer in capture.layers], cache.kv_pool,
                              cache.paged.views if cache.paged is not None else None)
            if dst.is_cuda:  # forwards on other streams read the new slots once the entry is published
                torch.cuda.synchronize(dst.device)
            j.txn.commit(lambda _ids: cache.entries.publish(j.job.candidate.key, j.namespace, j.tokens, dst, P,
                                                            store=store))
            write_job(j.job.job_id, {"keep": j.runs.keep, "structure": cache.kvzip_config.structure,
                                     "head_pages": j.runs.layout is not None, "scores": j.scores,
                                     "n_protected": j.n_protected, "prefix_len": L, "physical_length": P,
                                     "prefix_ids": list(j.tokens), "src_slots": src, "dst_slots": dst})
        except Exception as exc:
            self.end(j, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - t0
        stats = cache.stats
        stats.prefixes_compressed += 1
        stats.achieved_ratios.append(P / L)
        stats.compaction_seconds.append(seconds)
        # forward time of the scoring requests (as vLLM reports it); the wall time also holds the traffic's
        # batches that ran in between
        stats.scoring_seconds.append(j.clock.seconds if j.clock.tokens else t0 - j.scoring_started)
        ratio = j.clock.scoring_to_prefill(L)
        if ratio is not None:
            stats.scoring_to_prefill.append(ratio)
        self.end(j, JobStatus.COMMITTED)
        sliced = "" if cache.slicing is None else (" (scoring slices: {step_tokens} tokens now, {slices} slices, "
                                                   "{held_steps} held, {deferred} decode rounds between, {parked} "
                                                   "client prefills alone, {drained} drained, idle slice "
                                                   "{idle_tokens} tokens, {forced} forced, no room beside decode "
                                                   "{no_room} times)"
                                                   .format(**cache.slicing.describe()))
        logger.info("kvzip-plugin: job %d committed (%s): %d -> %d tokens (%d slots saved, %s) in %.3f s%s",
                    j.job.job_id, cache.kvzip_config.structure, L, P, L - P,
                    "head pages" if store is not None else "SGLang's own slots", seconds, sliced)

    # ------------------------------------------------------------------ the end of a job

    def end(self, j: Job, status: JobStatus, error: str | None = None, unservable: bool = False,
            no_room: bool = False) -> None:
        """Finish a job: roll back what it holds unless it committed, take its queued scoring requests
        out, release the tree lock (the originals go back to LRU eviction) and count the outcome."""
        cache = self.cache
        if j.txn is not None and status is not JobStatus.COMMITTED:
            j.txn.rollback()
        if j.lock is not None:
            cache.tree_unlock(j.lock)
            j.lock = None
        if cache.capture is not None:
            cache.capture.drop_job(j.job.job_id)
        for rid in list(j.reqs):
            self.scoring_len.pop(rid, None)
        sched = cache.scheduler()
        if status is not JobStatus.COMMITTED and sched is not None and j.reqs:
            # scoring requests still queued are taken out; running ones finish on their own (ignored)
            ids = {id(r) for r in j.reqs.values()}
            sched.waiting_queue[:] = [r for r in sched.waiting_queue if id(r) not in ids]
        j.reqs, j.unsent = {}, []
        outcome = self.admission.finish(j.job, status, error, unservable=unservable, no_room=no_room)
        self.live.pop(j.job.job_id, None)
        cache.mark_dirty()
        cache.stats.jobs[outcome] += 1
        if status is not JobStatus.COMMITTED:
            logger.warning("kvzip-plugin: job %d %s: %s", j.job.job_id, status.value, error)

    def cancel_all(self, reason: str, tree_reset: bool = False) -> None:
        """Cancel every live job (`tree_reset`: the tree was reset, no lock is left to release)."""
        for j in list(self.live.values()):
            if tree_reset:
                j.lock = None
            self.end(j, JobStatus.CANCELLED, reason)
