# SPDX-License-Identifier: Apache-2.0
"""Scheduler half of KVzip in vLLM (runs in EngineCore): detection, jobs, blocks, adoption.

Life of a hot prefix (logical length L tokens = n blocks, block-aligned):

1. Detection: every new request's local prefix-cache hit is reported to `PrefixTracker`, keyed
   by the hash of the hit's last block (vLLM chains hashes, cache salt and LoRA included).
2. Scoring: a job pins the n source blocks (`BlockPool.touch`) and adds internal requests
   `kvzip-score-<job>-<chunk>` to the scheduler, one per reconstruction chunk: prompt = the
   prefix + the chunk's "repeat the previous context" input, max_tokens=1. Their prefix is a
   cache hit, so only the repeat input is computed; the worker scores it (`worker.py`). The
   frontend ignores outputs of request ids it does not know.
3. Compaction: once every scoring request finished, fresh blocks are taken from the pool
   (`CompactionTxn.prepare`): `P / block_size` for `head`, the bound `store.max_store_blocks` for
   `pair` / `layer_budget` (whose runs' lengths only the worker knows), and a `CompactCommand` goes to
   the workers. They report the blocks they used; the rest of the reservation is freed before commit.
4. Commit (all ranks acknowledged): the destination blocks are published in the prefix cache
   under their own salted hashes (derived from the prefix's last original hash, so tenants with
   different salts never share them) and released to the pool's LRU tail like any cached block;
   the source blocks lose their hashes (`evict_blocks`) and return to the pool when their last
   reader leaves. Failure or cancellation rolls back: destination blocks freed, sources unpinned,
   nothing published.
5. Adoption: `KVCacheManager.get_computed_blocks` is wrapped (on the instance) so that a newly
   admitted request whose block hashes contain a live compacted prefix gets its m blocks while
   L tokens count as computed. Its `allocate_slots` calls are made in physical tokens (offset
   L - P) and never cache its own blocks (they were computed on the compressed context; first
   version: not shared). Running requests keep their append-only tables.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from kvzip_plugin.integrations.vllm.protocol import CompactCommand, KVzipConnectorMetadata, ScoringTarget

from kvzip_plugin.admission import Admission
from kvzip_plugin.compaction import CompactionTxn, physical_budget
from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.jobs import CompressionJob, JobStatus
from kvzip_plugin.metrics import KVzipStats
from kvzip_plugin.retention import HitMeter, RoomWait
from kvzip_plugin.scoring.plan import Unservable, plan_scoring, protected_tokens
from kvzip_plugin.slicing import ScoringBudget, ScoringGate
from kvzip_plugin.store import max_store_blocks

logger = logging.getLogger("vllm.kvzip_plugin.scheduler")

SCORING_PREFIX = "kvzip-score-"
ACK_TIMEOUT_S = 120.0
_WRAPPED = "__kvzip_kvcm__"
_OBSERVED = "_kvzip_observed"  # set on a vLLM Request once its first lookup was counted


def is_scoring_request(request_id: str) -> bool:
    return request_id.startswith(SCORING_PREFIX)


@dataclass
class CompactedPrefix:
    """A published compacted prefix: `blocks` hold P slots standing for L logical tokens."""

    key: Hashable
    logical_length: int
    physical_length: int
    blocks: list[Any]  # vLLM KVCacheBlock
    hashes: list[bytes]  # BlockHashWithGroupId of each block, as published
    store_id: int = -1  # the job that built it (names its head-page layout on the workers)
    head_pages: bool = False  # runs of different lengths in head pages (the plugin's attention)

    def alive(self) -> bool:
        """False once vLLM evicted any of the blocks (its hash was reset or replaced)."""
        return all(b.block_hash == h for b, h in zip(self.blocks, self.hashes, strict=True))


@dataclass
class _Job:
    job: CompressionJob
    prefix_ids: list[int]
    request: Any  # the vLLM Request that triggered it (salt, LoRA, block hasher)
    n_protected: int = 0
    src_blocks: list[Any] = field(default_factory=list)
    pending: set[str] = field(default_factory=set)
    targets: dict[str, ScoringTarget] = field(default_factory=dict)
    txn: CompactionTxn | None = None
    sent: bool = False


class _PoolAllocator:
    """`compaction.BlockAllocator` over vLLM's BlockPool (ids <-> KVCacheBlock objects)."""

    def __init__(self, block_pool: Any) -> None:
        self.pool = block_pool

    def allocate(self, n: int) -> list[int]:
        if n > self.pool.get_num_free_blocks():
            raise RuntimeError(f"{n} free blocks needed, {self.pool.get_num_free_blocks()} free")
        return [b.block_id for b in self.pool.get_new_blocks(n)]

    def free(self, block_ids) -> None:
        self.pool.free_blocks([self.pool.blocks[i] for i in block_ids])


class SchedulerState:
    """KVzip bookkeeping of one EngineCore."""

    def __init__(self, config: KVzipConfig, policy: TriggerPolicy, vllm_config: Any,
                 budget: ScoringBudget | None = None, meter: HitMeter | None = None) -> None:
        self.config = config
        self.gate = ScoringGate(budget or ScoringBudget())  # scoring: low priority, in slices (slicing.py)
        # hit counting (with the retention meter), job queue, retries (shared with SGLang)
        self.admission = Admission(policy, meter=meter or HitMeter())
        self.tracker, self.queue = self.admission.tracker, self.admission.queue
        self.vllm_config = vllm_config
        self.kvcm: Any = None
        self.pool: Any = None
        self.block_size = 0
        self.block_bytes = 0
        self.jobs: dict[int, _Job] = {}
        # scoring request id -> (its job's id, the prefix blocks it reads), until the request ends in vLLM
        # (also after its job ended: its repeat-input blocks are evicted then)
        self.scoring_requests: dict[str, tuple[int, int]] = {}
        self.compacted: dict[Hashable, CompactedPrefix] = {}
        self.offsets: dict[str, CompactedPrefix] = {}  # request id -> the prefix it reads
        self.to_add: list[Any] = []  # scoring Requests to hand to the scheduler
        self.new_targets: dict[str, ScoringTarget] = {}
        self.commands: list[CompactCommand] = []
        self.drop: list[int] = []
        self.drop_stores: list[int] = []
        self.n_layers = 0
        self.n_kv_heads = 0
        self.stats = KVzipStats()
        self.room_wait = RoomWait()  # how long the queued job has found no room while nothing ran
        self.disabled: str | None = None
        self.covered: dict[Hashable, Hashable] = {}  # block hash in a compacted / in-flight prefix -> its key
        self._tokenizer: Any = None
        self.head_scores: tuple[tuple[float, ...], ...] | None = None
        if config.scorer == "kvzip_head":  # at start-up: a missing or mismatched file is a config error
            from kvzip_plugin.head_scores import load_head_scores

            scores = load_head_scores(vllm_config.model_config.hf_config, config.head_scores_path)
            self.head_scores = tuple(tuple(float(x) for x in row) for row in scores.tolist())

    # ------------------------------------------------------------ binding

    def bind(self, kv_cache_manager: Any) -> None:
        """Wrap this KVCacheManager instance's `get_computed_blocks` and `allocate_slots`."""
        self.kvcm = kv_cache_manager
        self.pool = kv_cache_manager.block_pool
        groups = kv_cache_manager.kv_cache_config.kv_cache_groups
        spec = groups[0].kv_cache_spec
        if not hasattr(spec, "num_kv_heads"):  # e.g. a Mamba group first (the connector refuses such models)
            self.disabled = "kv_cache_spec"
            return
        self.block_size = spec.block_size
        self.block_bytes = spec.page_size_bytes * len(groups[0].layer_names)
        self.n_layers, self.n_kv_heads = len(groups[0].layer_names), int(spec.num_kv_heads)
        if getattr(self.pool, "hash_block_size", self.block_size) != self.block_size:
            # request.block_hashes would not be one hash per block: the prefix keys below assume it
            self.disabled = "hash_block_size"
            return
        if getattr(kv_cache_manager, _WRAPPED, False):
            return
        get_computed, allocate = kv_cache_manager.get_computed_blocks, kv_cache_manager.allocate_slots
        kv_cache_manager.get_computed_blocks = (
            lambda request, *args, **kwargs: self._get_computed_blocks(get_computed, request, *args, **kwargs))
        kv_cache_manager.allocate_slots = (
            lambda request, *args, **kwargs: self._allocate_slots(allocate, request, *args, **kwargs))
        record = getattr(kv_cache_manager, "record_prefix_cache_stats", None)
        if record is not None:  # vLLM's prefix-cache counters describe client requests only
            kv_cache_manager.record_prefix_cache_stats = (
                lambda request, *args, **kwargs: None if is_scoring_request(request.request_id)
                else record(request, *args, **kwargs))
        setattr(kv_cache_manager, _WRAPPED, True)

    # ------------------------------------------------------------ detection

    def observe(self, request: Any, num_local_computed: int) -> None:
        """A new request hit `num_local_computed` cached tokens: count the hit, maybe queue a job."""
        if self.disabled or is_scoring_request(request.request_id) or not self.block_size:
            return
        if getattr(request, _OBSERVED, False):  # looked up again at every step while it waits: count it once
            return
        setattr(request, _OBSERVED, True)
        if self.admission.note_prompt(self._prompt_digest(request)):  # the same prompt again: not sharing
            return
        n_blocks = num_local_computed // self.block_size
        if n_blocks == 0 or len(request.block_hashes) < n_blocks:
            return
        key = request.block_hashes[n_blocks - 1]
        queued = next((h for h in request.block_hashes[:n_blocks] if self.queue.job_for(h) is not None), None)
        if queued is not None:  # its job waits or runs: the hit still weighs for it (retention.py)
            self.admission.note_queued_hit(queued)
        if not self.admission.eligible(key):
            return
        # a prefix that contains a compacted or in-flight one is served by it; one inside it is a
        # shorter hit on the same document (its own blocks were evicted): not worth another job
        if key in self.covered or any(h in self.compacted or self.queue.job_for(h) is not None
                                      for h in request.block_hashes[:n_blocks]):
            return
        length = n_blocks * self.block_size
        offer = self.admission.offer(key, length, request.cache_salt)
        if offer.candidate is None:
            return
        job, candidate = offer.job, offer.candidate
        self.stats.jobs["submitted" if job else "rejected"] += 1
        if job is not None:
            self.jobs[job.job_id] = _Job(job, list(request.all_token_ids[:length]), request)
            self._cover(request.block_hashes[:n_blocks], key)
            logger.info("kvzip-plugin: job %d queued for a %d-token prefix hit by %d requests",
                        job.job_id, length, candidate.hits)

    def _prompt_digest(self, request: Any) -> Hashable:
        """The whole prompt: its last full block's chained hash (covers every block before it, the cache
        salt and LoRA) and the tokens after it."""
        hashes = request.block_hashes
        n = len(hashes)
        return (hashes[-1] if n else request.cache_salt, tuple(request.all_token_ids[n * self.block_size:]))

    # ------------------------------------------------------------ per schedule() call

    def before_schedule(self, scheduler: Any) -> None:
        """Start queued jobs, hand their scoring requests to the scheduler, send compactions. With slicing
        on, one scoring request at a time (the next once the previous one ended in vLLM), so a step holds
        at most one scoring prefill chunk (`slicing.scoring_step` caps it)."""
        while self._can_start(scheduler) and (job := self.queue.start_next()) is not None:
            self._start(self.jobs[job.job_id])
        if self.gate.budget.step_tokens == 0:
            for req in self.to_add:
                scheduler.add_request(req)
            self.to_add = []
        elif self.to_add and not any(rid in scheduler.requests for rid in self.scoring_requests):
            scheduler.add_request(self.to_add.pop(0))
        for j in list(self.jobs.values()):
            if j.job.status is JobStatus.SCORING and not j.pending:
                self._prepare_compaction(j)
            elif j.job.status is JobStatus.COMPACTING and j.job.seconds_in(JobStatus.COMPACTING) > ACK_TIMEOUT_S:
                self._end(j, JobStatus.FAILED, f"no acknowledgement from the workers in {ACK_TIMEOUT_S} s")

    def _cover(self, chain, key: Hashable) -> None:
        for h in chain:
            self.covered[h] = key

    def _uncover(self, key: Hashable) -> None:
        for h in [h for h, k in self.covered.items() if k == key]:
            del self.covered[h]

    def _can_start(self, scheduler: Any) -> bool:
        """Jobs yield to traffic: start one only when no request waits for admission and the pool has
        room for its scoring input and destination blocks without evicting much: free blocks (vLLM's free
        queue, cached ones included) less the evictable blocks of the compacted prefixes the job must not
        displace (`retention.py`: its candidate is not hit more than `--kv-compression-displace-factor` times
        as often); those then move to the tail of the free queue, so the job's allocations evict colder blocks
        first. A job that finds no room while no request runs (nothing will free any) is cancelled after
        `NO_ROOM_WAIT_S`, its prefix backed off."""
        if len(scheduler.waiting) > 0:
            return False
        pending = self.queue.peek()
        if pending is None:
            self.room_wait.clear()
            return False
        need = 2 * (pending.candidate.num_tokens // self.block_size) + 2
        now = time.monotonic()
        cand = pending.candidate.key
        free = self.pool.get_num_free_blocks()
        # the kept prefixes matter only when the pool would have room with them (not looked at in the steps
        # a queued job spends waiting for room)
        kept = [b for p in self.compacted.values() if p.alive() and self.admission.keeps(p.key, cand, now)
                for b in p.blocks if b.ref_cnt == 0] if free >= need else []
        if free - len(kept) >= need:
            self.room_wait.clear()
            queue = self.pool.free_block_queue
            for b in kept:  # most recently used now: vLLM's allocations take colder cached blocks first
                queue.remove(b)
                queue.append(b)
            return True
        if self.room_wait.expired(now, running=bool(scheduler.running)) and (job := self.queue.start_next()):
            wait = self.admission.no_room_backoff_s(job.candidate.key)
            kept_note = (f" (of which {len(kept)} hold compacted prefixes kept: this one is not hit more than "
                         f"{self.admission.meter.displace_factor:g}x as often)" if kept else "")
            self._end(self.jobs[job.job_id], JobStatus.CANCELLED,
                      f"no room in the KV pool to score it: it needs {need} blocks, {free} are free or "
                      f"cached{kept_note}; no new job for it for {wait:.0f} s", no_room=True)
        return False

    def _start(self, j: _Job) -> None:
        bs, L = self.block_size, len(j.prefix_ids)
        try:
            hashes = j.request.block_hashes[:L // bs]
            blocks = [self.pool.get_cached_block(h, [0]) for h in hashes]
            if any(b is None for b in blocks):
                raise RuntimeError("the prefix was evicted before its job started")
            j.src_blocks = [b[0] for b in blocks]
            self.pool.touch(j.src_blocks)  # pinned until commit or rollback
            if self.head_scores is not None:  # kvzip_head: no scoring pass, compaction next step
                j.n_protected = protected_tokens(j.prefix_ids, self._get_tokenizer(), self.config)
                logger.info("kvzip-plugin: job %d: %d tokens (%d protected), head-level scores (no scoring pass)",
                            j.job.job_id, L, j.n_protected)
                return
            # a prompt shorter than max_model_len leaves room for the one generated token
            plan = plan_scoring(j.prefix_ids, self._get_tokenizer(), self.config,
                                self.vllm_config.model_config.max_model_len - 1)
            j.n_protected = plan.n_protected
            from vllm import SamplingParams
            from vllm.v1.request import Request

            reqs = []
            for chunk, target in zip(plan.chunks, plan.targets(j.job.job_id, L, self.config.score_softmax),
                                     strict=True):
                rid = f"{SCORING_PREFIX}{j.job.job_id}-{chunk.index}"
                reqs.append(Request(request_id=rid, prompt_token_ids=j.prefix_ids + list(chunk.input_ids),
                                    sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
                                    pooling_params=None, lora_request=j.request.lora_request,
                                    cache_salt=j.request.cache_salt, block_hasher=j.request._block_hasher))
                j.targets[rid] = target
            for req in reqs:  # only once every chunk is valid: a failed start adds nothing
                j.pending.add(req.request_id)
                self.scoring_requests[req.request_id] = (j.job.job_id, L // bs)
            self.to_add.extend(reqs)
            self.new_targets.update(j.targets)
            logger.info("kvzip-plugin: job %d scoring %d tokens (%d protected) in %d chunk(s)",
                        j.job.job_id, L, j.n_protected, len(plan.chunks))
        except Unservable as exc:  # the same prefix would fail again: never retried
            self._end(j, JobStatus.FAILED, str(exc), unservable=True)
        except Exception as exc:
            self._end(j, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def _prepare_compaction(self, j: _Job) -> None:
        L, structure, ratio = len(j.prefix_ids), self.config.structure, self.config.ratio
        if structure == "head":
            n_blocks = physical_budget(L, j.n_protected, ratio, self.block_size) // self.block_size
        else:
            n_blocks = max_store_blocks(L, j.n_protected, ratio, self.block_size, self.n_layers, self.n_kv_heads,
                                        structure)
        txn = CompactionTxn(_PoolAllocator(self.pool), n_blocks)
        try:
            txn.prepare()
        except RuntimeError as exc:  # no room now; the job stays scoring-done and retries next step
            logger.debug("kvzip-plugin: job %d waits for blocks: %s", j.job.job_id, exc)
            return
        j.txn = txn
        j.job.advance(JobStatus.COMPACTING)
        self.commands.append(CompactCommand(j.job.job_id, tuple(b.block_id for b in j.src_blocks),
                                            tuple(txn.dst_block_ids), j.n_protected, structure, ratio,
                                            self.head_scores))

    def build_meta(self, scheduler_output: Any) -> KVzipConnectorMetadata:
        meta = KVzipConnectorMetadata(scoring=self.new_targets, compact=self.commands, drop_jobs=self.drop,
                                      drop_stores=self.drop_stores)
        self.new_targets, self.commands, self.drop, self.drop_stores = {}, [], [], []
        scheduled = scheduler_output.num_scheduled_tokens
        for rid in scheduled:
            prefix = self.offsets.get(rid)
            if prefix is not None:
                meta.offsets[rid] = prefix.logical_length - prefix.physical_length
                meta.stores[rid] = prefix.store_id
        return meta

    # ------------------------------------------------------------ outcomes

    def request_finished(self, request: Any, block_ids: list[int]) -> None:
        rid = request.request_id
        self.offsets.pop(rid, None)
        scoring = self.scoring_requests.pop(rid, None)
        if scoring is None:
            return
        job_id, n_prefix_blocks = scoring
        # the repeat input's blocks must not serve later lookups (a rerun would skip its queries), also
        # when its job has already ended
        self.pool.evict_blocks({b for b in block_ids[n_prefix_blocks:] if b})
        j = self.jobs.get(job_id)  # None once the job ended (job ids are never reused)
        if j is None:
            return
        j.pending.discard(rid)
        if request.is_finished() and request.status.name != "FINISHED_LENGTH_CAPPED" and \
                request.status.name != "FINISHED_STOPPED":
            self._end(j, JobStatus.FAILED, f"scoring request {rid} ended as {request.status.name}")

    def on_worker_results(self, results: list[Any]) -> None:
        for r in results:
            j = self.jobs.get(r.job_id)
            if j is None or j.job.status is not JobStatus.COMPACTING:
                continue
            if not r.ok:
                self._end(j, JobStatus.FAILED, r.error)
                continue
            try:
                j.txn.shrink(r.n_blocks)  # the reservation's unused tail goes back to the pool
                j.txn.commit(functools.partial(self._publish, j, r.head_pages))
            except Exception as exc:
                self._end(j, JobStatus.FAILED, f"publish: {exc}")
                continue
            L, P = len(j.prefix_ids), len(j.txn.dst_block_ids) * self.block_size
            self.stats.prefixes_compressed += 1
            self.stats.achieved_ratios.append(P / L)
            self.stats.compaction_seconds.append(r.seconds)
            self.stats.scoring_seconds.append(r.scoring_seconds)
            if r.prefill_seconds_estimate > 0:
                self.stats.scoring_to_prefill.append(r.scoring_seconds / r.prefill_seconds_estimate)
            self._end(j, JobStatus.COMMITTED)
            g = self.gate
            logger.info("kvzip-plugin: job %d committed (%s): %d -> %d token slots (%d blocks saved, %s); scoring "
                        "slice now %d tokens beside decoding clients (%s), %d in idle steps; %d steps held for "
                        "client work so far (%d forced slices)",
                        j.job.job_id, self.config.structure, L, P, (L - P) // self.block_size,
                        "head pages" if r.head_pages else "vLLM's block table", g.step_tokens,
                        "sharing their steps" if g.share_decode else "no room: scoring waits for idle steps",
                        g.idle_tokens, g.held_steps, g.forced)

    def _publish(self, j: _Job, head_pages: bool, dst_block_ids: list[int]) -> None:
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        key = j.job.candidate.key
        L = len(j.prefix_ids)
        blocks = [self.pool.blocks[i] for i in dst_block_ids]
        hashes = []
        for idx, block in enumerate(blocks):
            digest = hashlib.sha256(b"kvzip-v1|" + bytes(key) + f"|{L}|{len(blocks)}|{idx}".encode()).digest()
            h = make_block_hash_with_group_id(digest, 0)
            block.set_block_hash(h, self.block_size)
            self.pool.cached_block_hash_to_block.insert(h, block)
            hashes.append(h)
        self.compacted[key] = CompactedPrefix(key, L, len(blocks) * self.block_size, blocks, hashes,
                                              store_id=j.job.job_id, head_pages=head_pages)
        self.pool.free_blocks(blocks)  # ref 0, hashed: LRU tail of the free queue, like any cached block
        self.pool.evict_blocks({b.block_id for b in j.src_blocks})

    def _end(self, j: _Job, status: JobStatus, error: str | None = None, unservable: bool = False,
             no_room: bool = False) -> None:
        if j.txn is not None and status is not JobStatus.COMMITTED:
            j.txn.rollback()
        if j.src_blocks:
            self.pool.free_blocks(j.src_blocks)  # unpin (after evict_blocks on commit)
            j.src_blocks = []
        unsent = [r.request_id for r in self.to_add
                  if self.scoring_requests.get(r.request_id, (None,))[0] == j.job.job_id]
        for rid in unsent:  # scoring requests never handed to vLLM: nothing to score for a job that ended
            self.scoring_requests.pop(rid, None)
        self.to_add = [r for r in self.to_add if r.request_id not in unsent]
        outcome = self.admission.finish(j.job, status, error, unservable=unservable, no_room=no_room)
        self.jobs.pop(j.job.job_id, None)
        self.drop.append(j.job.job_id)
        self.stats.jobs[outcome] += 1
        if status is not JobStatus.COMMITTED:
            self._uncover(j.job.candidate.key)
            logger.warning("kvzip-plugin: job %d %s: %s", j.job.job_id, status.value, error)

    # ------------------------------------------------------------ adoption (wrapped KVCacheManager)

    def _lookup(self, request: Any, max_hit: int | None = None) -> CompactedPrefix | None:
        if self.disabled or not self.compacted or is_scoring_request(request.request_id):
            return None
        if not self.kvcm.prefix_cache_lookup_enabled(request):  # e.g. prompt logprobs: recompute all
            return None
        hashes = request.block_hashes
        max_hit = request.num_tokens - 1 if max_hit is None else min(max_hit, request.num_tokens - 1)
        limit = min(len(hashes), max_hit // self.block_size)
        for i in range(limit, 0, -1):
            prefix = self.compacted.get(hashes[i - 1])
            if prefix is None:
                continue
            if prefix.alive():
                return prefix
            self._forget(prefix)  # vLLM evicted it: the document may be compressed again
        return None

    def _forget(self, prefix: CompactedPrefix) -> None:
        del self.compacted[prefix.key]
        self._uncover(prefix.key)
        self.tracker.reopen(prefix.key)
        self.drop_stores.append(prefix.store_id)  # the workers drop its head-page layout

    def _get_computed_blocks(self, original, request, *args, **kwargs):
        self.offsets.pop(request.request_id, None)
        prefix = self._lookup(request, kwargs.get("max_cache_hit_length", args[0] if args else None))
        if prefix is None:
            return original(request, *args, **kwargs)
        self.offsets[request.request_id] = prefix
        blocks = self.kvcm.create_kv_cache_blocks((list(prefix.blocks),))
        return blocks, prefix.logical_length, 0

    def _allocate_slots(self, original, request, num_new_tokens, num_new_computed_tokens=0,
                        new_computed_blocks=None, *args, **kwargs):
        prefix = self.offsets.get(request.request_id)
        if prefix is None:
            return original(request, num_new_tokens, num_new_computed_tokens, new_computed_blocks, *args, **kwargs)
        offset = prefix.logical_length - prefix.physical_length
        adopting = num_new_computed_tokens > 0
        if adopting:
            num_new_computed_tokens -= offset
        kwargs["delay_cache_blocks"] = True  # its own blocks were computed on the compressed context
        logical = request.num_computed_tokens
        if logical:
            request.num_computed_tokens = logical - offset
        try:
            out = original(request, num_new_tokens, num_new_computed_tokens, new_computed_blocks, *args, **kwargs)
        finally:
            request.num_computed_tokens = logical
        if adopting and out is not None:
            self.stats.compressed_hits += 1
            self.admission.note_compressed_hit(prefix.key)  # weighs against displacing it (retention.py)
        return out

    # ------------------------------------------------------------ stats

    def take_stats(self) -> KVzipStats | None:
        live = [p for p in self.compacted.values() if p.alive()]
        saved = sum((p.logical_length - p.physical_length) // self.block_size for p in live)
        self.stats.blocks_saved = saved
        self.stats.bytes_saved = saved * self.block_bytes
        self.stats.jobs_queued = self.queue.queued
        self.stats.jobs_running = self.queue.running
        out, self.stats = self.stats, KVzipStats()
        return out

    def before_reset(self, scheduler: Any, reset_running_requests: bool) -> None:
        """vLLM is about to reset its prefix cache (`Scheduler.reset_prefix_cache`). A reset succeeds only
        when no block is in use; in-flight jobs hold some (pinned source blocks, reserved destination
        blocks, their scoring requests' blocks). When the reset goes ahead anyway (running requests are
        preempted, or no client request holds blocks), the jobs are cancelled first and release all of
        it, so the reset succeeds exactly as it does without the plugin. When client requests hold blocks
        the reset fails as it would without the plugin, and the jobs go on."""
        if not self.jobs:
            return
        clients = any(not is_scoring_request(r.request_id) for r in scheduler.running)
        if clients and not reset_running_requests:
            return
        from vllm.v1.request import RequestStatus

        scoring = [rid for j in self.jobs.values() for rid in j.pending if rid in scheduler.requests]
        for j in list(self.jobs.values()):
            self._end(j, JobStatus.CANCELLED, "prefix cache reset")
        self._drop_unsent()
        if scoring:  # their blocks go back to the pool (their outputs never reached a client)
            scheduler.finish_requests(scoring, RequestStatus.FINISHED_ABORTED)

    def reset(self) -> None:
        """The connector's reset (vLLM calls it after its prefix-cache reset, successful or not): forget
        the compacted prefixes vLLM dropped (all of them after a successful reset, none after a failed
        one). Jobs are not touched: `before_reset` cancelled them when the reset could go ahead."""
        for prefix in [p for p in self.compacted.values() if not p.alive()]:
            self._forget(prefix)

    def shut_down(self, reason: str) -> None:
        """A worker cannot compact (`reason`, a fallback reason): end every job (blocks unpinned,
        reservations returned), observe and adopt nothing more. Compacted prefixes cannot exist (no worker
        ever compacted), so nothing else is held."""
        self.disabled = reason
        for j in list(self.jobs.values()):
            self._end(j, JobStatus.FAILED, f"a worker disabled KV compression ({reason})", unservable=True)
        self._drop_unsent()

    def _drop_unsent(self) -> None:
        """Forget what was not yet handed to vLLM or the workers (every job has ended)."""
        for req in self.to_add:
            self.scoring_requests.pop(req.request_id, None)
        self.to_add, self.commands, self.new_targets = [], [], {}

    def has_pending_work(self) -> bool:
        return bool(self.to_add or self.commands or self.queue.queued or any(
            j.job.status is JobStatus.COMPACTING for j in self.jobs.values()))

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                                            trust_remote_code=mc.trust_remote_code)
        return self._tokenizer


