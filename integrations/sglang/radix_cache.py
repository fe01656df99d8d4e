# SPDX-License-Identifier: Apache-2.0
"""`KVzipRadixCache`: SGLang 0.5.23's default tree cache (`UnifiedRadixCache`) plus KVzip compaction of hot
shared prefixes (GitHub issue 7, step 2; DESIGN.md beside this file has the hook points).

Life of a hot prefix (logical length L tokens, page-aligned), all on the scheduler thread:

1. Detection (`match_prefix`): every new request's tree hit is reported once to `PrefixTracker`, keyed by
   (namespace, L, digest of the L tokens). A hot prefix becomes a `CompressionJob`.
2. Scoring (`kvzip_pump`, from `flush_pending_backups` after every batch and from the `on_idle` hook): a job
   locks the prefix's tree path (originals pinned) and adds internal requests `kvzip-score-<job>-<chunk>`
   to the scheduler's waiting queue, one per reconstruction chunk: prefix + "repeat the previous context"
   input, max_new_tokens=1, `skip_radix_cache_insert`. Their prefix is a tree hit, so only the repeat
   input is computed, as ordinary prefill; `capture.ScoreCapture` scores it inside the attention layers.
   Their outputs never reach the TokenizerManager (`hooks.py` filters them).
3. Compaction: once every scoring request finished, the runs each (layer, KV head) keeps are chosen for the
   structure (`store.select_runs`) and P slots are allocated (`CompactionTxn`): with one run length P
   (`head`, ratio 1.0) slot s of every head holds its s-th kept token; otherwise the runs go to head pages
   (`kvzip_plugin.paged_store`, read by `attention.py`). They are copied layer by layer (keys and values),
   and a `CompactedPrefix` entry owning the P slots is published beside the tree (the tree never holds a
   P-slot value under L keys). The job's tree lock is released: the original L slots go back to SGLang's
   LRU eviction. Failure or cancellation frees the new slots and leaves the tree as it was.
4. Adoption (`match_prefix`): a request whose tokens start with a live compacted prefix matches it
   instead of the tree: `prefix_len = P`, `last_node` = the entry's handle (locked through `lock`/`unlock`
   like a tree node, so admission pins it), `prefix_device_indices` = the entry's slots. Its
   `origin_input_ids` become physical (`tokens[:P] + tokens[L:]`, the logical ones are kept on the
   request) so that every SGLang length (prefix_len, extend_end, seq_lens) is a row length; the
   `ForwardBatch.init_new` hook adds `L - P` to its positions (RoPE sees logical positions), the output
   hook reports logical `prompt_tokens` / `cached_tokens`. It is never inserted into the tree.
5. Accounting: unpinned entries count as evictable, pinned ones as protected (SGLang's pool invariant
   `available + evictable + protected == total` holds); `_evict` frees least recently used unpinned entries
   once the tree has nothing left to evict.

Imports SGLang at module level: import this module only inside an SGLang process (or a test that has
SGLang importable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from array import array
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvzip_plugin.integrations.sglang import KVCompressionSettings
from kvzip_plugin.integrations.sglang.attention import PagedAttention, PagedRow
from kvzip_plugin.integrations.sglang.capture import ScoreCapture
from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefParams,
    EvictParams,
    EvictResult,
    MatchPrefixParams,
    MatchResult,
    TreeLock,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvzip_plugin import envs
from kvzip_plugin.admission import Admission
from kvzip_plugin.compaction import CompactionTxn, apply_compaction, plan_compaction
from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.head_scores import head_level_scores, load_head_scores
from kvzip_plugin.jobs import CompressionJob, JobStatus
from kvzip_plugin.metrics import KVzipStats, ScoringClock
from kvzip_plugin.paged_store import PagedStore, write_store
from kvzip_plugin.scoring.plan import SCORING_OVERHEAD, Unservable, plan_scoring, protected_tokens
from kvzip_plugin.settings import DEFAULT_STRUCTURE
from kvzip_plugin.store import place_runs, select_runs, uniform_tokens

logger = logging.getLogger("sglang.kvzip_plugin")

SCORING_PREFIX = "kvzip-score-"
ADOPT_ATTR = "_kvzip_adoption"
SEEN_ATTR = "_kvzip_observed"
MAX_RUNTIME_FAILURES = 5  # unexpected errors before KVzip is disabled in this process
MAX_ALLOC_WAIT_PUMPS = 200  # pumps a scored job may wait for free slots before it fails
_MIN_CHUNK = 16  # shortest scoring chunk (vLLM: the core default, 32)
STATS_INTERVAL_S = 1.0

_active: list[weakref.ReferenceType] = []


def active_cache() -> KVzipRadixCache | None:
    """The KVzipRadixCache of this (scheduler) process, if any."""
    cache = _active[-1]() if _active else None
    return cache if cache is not None and not cache.kvzip_disabled else None


def is_scoring_rid(rid: Any) -> bool:
    return isinstance(rid, str) and rid.startswith(SCORING_PREFIX)


class CompactedNode:
    """Stands for a compacted prefix where SGLang expects a tree node id (`req.last_node`, `TreeLock.node`):
    locking it pins the entry."""

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
    namespace: tuple[Any, Any]  # (extra_key, cache_salt)
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


@dataclass
class Adoption:
    """Kept on a request served by a compacted prefix (`req._kvzip_adoption`)."""

    entry: CompactedPrefix
    logical_ids: array  # the request's own origin_input_ids
    skip_insert: bool  # its skip_radix_cache_insert before adoption
    counted: bool = False

    @property
    def offset(self) -> int:
        return self.entry.offset


@dataclass
class _Job:
    job: CompressionJob
    tokens: array
    namespace: tuple[Any, Any]
    lora_id: Any
    n_protected: int = 0
    lock: TreeLock | None = None
    node: Any = None
    reqs: dict[str, Any] = field(default_factory=dict)  # pending scoring Req objects
    scoring_started: float = 0.0
    clock: ScoringClock = field(default_factory=ScoringClock)  # forward time of its scoring requests
    txn: CompactionTxn | None = None
    waits: int = 0
    scores: torch.Tensor | None = None  # [layers, H_kv, n_context], taken from the capture at compaction
    keep: torch.Tensor | None = None  # [layers, H_kv, L] what it keeps (rounded to whole pages)
    tokens_kept: torch.Tensor | None = None  # [layers, H_kv, P] when every run has one length P
    n_pages: int = 0  # pages the compacted entry owns
    layout: Any = None  # store.HeadPageLayout when the runs differ in length


class _SlotAllocator:
    """`compaction.BlockAllocator` over SGLang's token allocator (page ids <-> slots)."""

    def __init__(self, cache: KVzipRadixCache) -> None:
        self.cache = cache
        self.allocator = cache.token_to_kv_pool_allocator
        self.page = cache.page_size

    def allocate(self, n: int) -> list[int]:
        tokens = n * self.page
        if self.allocator.available_size() < tokens:
            self.cache.evict(EvictParams(num_tokens=tokens - self.allocator.available_size()))
        slots = self.allocator.alloc(tokens) if self.allocator.available_size() >= tokens else None
        if slots is None:
            raise RuntimeError(f"{tokens} free KV slots needed, {self.allocator.available_size()} free")
        return (slots[:: self.page] // self.page).tolist()

    def free(self, block_ids) -> None:
        if len(block_ids):
            self.allocator.free(self.cache._page_slots(block_ids))


class KVzipRadixCache(UnifiedRadixCache):
    """The unified radix tree SGLang builds by default, plus KVzip compaction of hot shared prefixes.
    `settings` come from `--kv-compression*` / `KVZIP_KV_COMPRESSION*` (None = defaults); `tp_worker` and
    `server_args` are the scheduler's (None in unit tests: nothing is captured, no job can score)."""

    def __init__(self, params: CacheInitParams, settings: KVCompressionSettings | None = None,
                 tp_worker: Any = None, server_args: Any = None) -> None:
        self.kvzip_disabled: str | None = "initialising"  # reset() may run inside super().__init__
        super().__init__(params)
        self.kvzip_settings = settings or KVCompressionSettings()
        defaults = KVzipConfig()
        structure = self.kvzip_settings.structure or DEFAULT_STRUCTURE
        self.kvzip_config = defaults.model_copy(update={
            "ratio": self.kvzip_settings.ratio or defaults.ratio, "structure": structure,
            "scorer": self.kvzip_settings.scorer or "kvzip", "head_scores_path": self.kvzip_settings.head_scores})
        policy = TriggerPolicy()
        self.kvzip_trigger = TriggerPolicy(
            min_prefix_tokens=self.kvzip_settings.min_prefix_tokens or policy.min_prefix_tokens,
            min_hits=self.kvzip_settings.min_hits or policy.min_hits,
        )
        self.admission = Admission(self.kvzip_trigger)  # hit counting, job queue, retries (shared with vLLM)
        self.tracker, self.queue = self.admission.tracker, self.admission.queue
        self.jobs: dict[int, _Job] = {}
        self.compacted: dict[tuple[Any, Any], list[CompactedPrefix]] = {}
        self.scoring_len: dict[str, int] = {}  # scoring rid -> prefix length its match is capped at
        self.stats = KVzipStats()
        self.prom: Any = None
        self.prom_labels: list[str] = []
        self._stats_flushed = 0.0
        self._entry_ids = 0
        self._runtime_failures = 0
        self._scheduler: Any = None
        self._tokenizer: Any = None
        self._dirty = True
        self._decode_step: tuple[float, int, int] | None = None
        # an extend batch with scoring rows: (start, {job: its tokens}, batch tokens, {job: capture s at start})
        self._scoring_step: tuple[float, dict[int, int], int, dict[int, float]] | None = None
        self._dumps = 0
        self.server_args = server_args
        self.tp_worker = tp_worker
        self.capture: ScoreCapture | None = None
        self.paged: PagedAttention | None = None
        self.kv_pool = params.token_to_kv_pool_allocator.get_kvcache()
        self.bytes_per_token = 0
        self.head_scores: torch.Tensor | None = None  # [layers, H_kv] for the kvzip_head scorer
        if self.kvzip_config.scorer == "kvzip_head" and tp_worker is not None:  # a bad file is a config error
            self.head_scores = load_head_scores(tp_worker.model_runner.model_config.hf_config,
                                                self.kvzip_config.head_scores_path)
        reason = unsupported_runtime_reason(self, server_args, tp_worker)
        if reason is None:
            try:
                self._init_capture()
            except Exception as exc:
                reason = ("capture_setup", f"attention layers cannot be wrapped: {exc!r}")
        if reason is None:
            try:
                from kvzip_plugin.integrations.sglang import hooks

                hooks.install()
            except Exception as exc:
                reason = ("hooks", f"the scheduler hooks cannot be applied: {exc!r}")
        self._init_kvzip_metrics(params)
        self.kvzip_disabled = None
        if reason is not None:
            self._disable(*reason)
        else:
            _active.append(weakref.ref(self))
            self._find_scheduler()
        logger.info(
            "kvzip-plugin: KVzipRadixCache built (pid %d): ratio=%s min_prefix_tokens=%d min_hits=%d "
            "page_size=%d tree_core=%s kv_pool=%s disable=%s structure=%s; compression %s",
            os.getpid(), self.kvzip_config.ratio, self.kvzip_trigger.min_prefix_tokens, self.kvzip_trigger.min_hits,
            params.page_size, type(self.tree_core).__name__, type(self.kv_pool).__name__, self.disable,
            self.kvzip_config.structure,
            "active" if not self.kvzip_disabled else f"disabled ({self.kvzip_disabled})",
        )

    # ------------------------------------------------------------------ setup

    def _init_capture(self) -> None:
        from sglang.srt.layers.radix_attention import RadixAttention

        model = self.tp_worker.model_runner.model
        layers = [m for m in model.modules() if isinstance(m, RadixAttention)]
        if not layers:
            raise RuntimeError("the model has no RadixAttention layer")
        ids = [layer.layer_id for layer in layers]
        if len(set(ids)) != len(ids):
            raise RuntimeError("RadixAttention layers share a layer_id")
        self.capture = ScoreCapture(layers, self.kv_pool, self.req_to_token_pool.req_to_token,
                                    self.kvzip_config.score_query_block)
        self.capture.wrap()
        if self.kvzip_config.structure != "head":  # runs of different lengths: the plugin's attention reads them
            self.paged = PagedAttention(layers, self.kv_pool, self.req_to_token_pool.req_to_token, self.page_size)
            self.capture.paged = self.paged
        k = self.kv_pool._get_key_buffer(layers[0].layer_id)
        self.bytes_per_token = 2 * len(layers) * k.shape[1] * k.shape[2] * k.element_size()

    def _init_kvzip_metrics(self, params: CacheInitParams) -> None:
        if not params.enable_metrics:
            return
        try:
            self.prom, self.prom_labels = make_prom_metrics(served_model_name(self.server_args))
        except Exception as exc:  # metrics must never take the cache down
            logger.warning("kvzip-plugin: sglang:kvzip_* metrics unavailable: %r", exc)

    def init_metrics_collector(self):
        """SGLang's radix-cache metrics, labelled `cache_type="UnifiedRadixCache"` as without the plugin
        (the base class would use this subclass's name), so dashboards are the same with and without it."""
        from sglang.srt.layers.dp_attention import is_dp_attention_enabled
        from sglang.srt.observability.metrics_collector import RadixCacheMetricsCollector, radix_cache_metric_labels
        from sglang.srt.runtime_context import get_observability, get_parallel

        try:
            from sglang.srt.observability.metrics_collector import STAT_LOGGER_ROLE_RADIX_CACHE, resolve_collector_class
        except ImportError:  # pragma: no cover - other layouts of the module
            from sglang.srt.mem_cache.base_prefix_cache import STAT_LOGGER_ROLE_RADIX_CACHE, resolve_collector_class

        labels = radix_cache_metric_labels("UnifiedRadixCache", get_parallel(), is_dp_attention_enabled())
        if get_observability().extra_metric_labels:
            labels.update(get_observability().extra_metric_labels)
        cls = resolve_collector_class(STAT_LOGGER_ROLE_RADIX_CACHE, RadixCacheMetricsCollector)
        self.metrics_collector = cls(labels=labels)

    def _disable(self, code: str, message: str) -> None:
        """Fail closed: one log line, one fallback count; the cache behaves as SGLang's default from now on."""
        if self.kvzip_disabled:
            return
        self.kvzip_disabled = code
        logger.warning("kvzip-plugin: %s; KV compression disabled, SGLang's default tree cache behaviour is used",
                       message)
        self.stats.fallbacks[code] = self.stats.fallbacks.get(code, 0) + 1
        for j in list(getattr(self, "jobs", {}).values()):
            self._end(j, JobStatus.CANCELLED, "KV compression disabled")
        self._flush_stats(force=True)

    def _find_scheduler(self) -> None:
        """The scheduler building this cache (it is on the call stack); else the on_idle hook sets it."""
        import sys

        frame: Any = sys._getframe(1)
        while frame is not None:
            obj = frame.f_locals.get("self")
            if obj is not None and hasattr(obj, "_add_request_to_queue") and hasattr(obj, "waiting_queue"):
                self._scheduler = weakref.ref(obj)
                return
            frame = frame.f_back

    def bind_scheduler(self, scheduler: Any) -> None:
        if self._scheduler is None or self._scheduler() is not scheduler:
            self._scheduler = weakref.ref(scheduler)

    # ------------------------------------------------------------------ accounting (SGLang's pool invariant)

    def _entries(self):
        for entries in self.compacted.values():
            yield from entries

    def _compacted_tokens(self, pinned: bool) -> int:
        return sum(e.physical_length for e in self._entries() if (e.refs > 0) == pinned)

    def evictable_size(self) -> int:
        return super().evictable_size() + self._compacted_tokens(False)

    def protected_size(self) -> int:
        return super().protected_size() + self._compacted_tokens(True)

    def full_evictable_size(self) -> int:
        return super().full_evictable_size() + self._compacted_tokens(False)

    def full_protected_size(self) -> int:
        return super().full_protected_size() + self._compacted_tokens(True)

    def _evict(self, params: EvictParams, available_size_targets=None, *, allocation_reclaim_satisfied=None):
        result = super()._evict(params, available_size_targets,
                                allocation_reclaim_satisfied=allocation_reclaim_satisfied)
        need = params.num_tokens - result.num_tokens_evicted
        if need > 0 and self.compacted:
            if allocation_reclaim_satisfied is not None and allocation_reclaim_satisfied():
                return result
            freed = self._evict_compacted(need)
            if freed:
                result = EvictResult(result.num_tokens_evicted + freed, result.swa_num_tokens_evicted,
                                     result.mamba_num_evicted)
        return result

    def _evict_compacted(self, need: int) -> int:
        """Free least recently used unpinned compacted prefixes until `need` tokens are freed."""
        freed = 0
        for entry in sorted((e for e in self._entries() if e.refs == 0), key=lambda e: e.last_access):
            if freed >= need:
                break
            freed += entry.physical_length
            self._drop_entry(entry, free=True, reason="evicted")
        return freed

    def _drop_entry(self, entry: CompactedPrefix, free: bool, reason: str) -> None:
        entries = self.compacted.get(entry.namespace, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self.compacted[entry.namespace]
        if entry.alive and free:
            self.token_to_kv_pool_allocator.free(entry.slots)
        entry.alive = False
        self.tracker.reopen(entry.key)  # the document may be compressed again
        self._dirty = True
        logger.info("kvzip-plugin: compacted prefix %d (%d -> %d tokens) %s", entry.entry_id,
                    entry.logical_length, entry.physical_length, reason)

    def reset(self) -> None:
        super().reset()
        if getattr(self, "kvzip_disabled", "initialising") == "initialising":
            return
        # SGLang flushes the cache (`/flush_cache`, fully idle): its allocator is cleared right after, so
        # nothing is freed one by one; jobs are cancelled, compacted prefixes forgotten.
        for j in list(self.jobs.values()):
            j.lock = None  # the tree was reset: no lock left to release
            self._end(j, JobStatus.CANCELLED, "prefix cache reset")
        for entry in list(self._entries()):
            self._drop_entry(entry, free=True, reason="dropped (prefix cache reset)")
        self.compacted.clear()

    # ------------------------------------------------------------------ compacted nodes as tree handles

    def lock(self, node_id, skip_lock_components=()):
        if isinstance(node_id, CompactedNode):
            entry = node_id.entry
            if not entry.alive:
                raise RuntimeError(f"kvzip-plugin: compacted prefix {entry.entry_id} locked after it was dropped")
            entry.refs += 1
            entry.last_access = time.monotonic()
            return TreeLock(node_id, DecLockRefParams())
        return super().lock(node_id, skip_lock_components)

    def unlock(self, lock) -> None:
        if lock is not None and isinstance(lock.node, CompactedNode):
            entry = lock.node.entry
            entry.refs -= 1
            assert entry.refs >= 0, f"compacted prefix {entry.entry_id} unlocked more than locked"
            entry.last_access = time.monotonic()
            return
        super().unlock(lock)

    def prefix_device_indices(self, req) -> torch.Tensor:
        node = req.last_node
        if isinstance(node, CompactedNode):
            assert node.entry.alive, f"request {req.rid} reads dropped compacted prefix {node.entry.entry_id}"
            assert req.prefix_len <= node.entry.physical_length
            return node.entry.slots[: req.prefix_len]
        return super().prefix_device_indices(req)

    def dfs_weight_order(self, node_handles):
        root = self.root_node_handle()
        return super().dfs_weight_order([root if isinstance(n, CompactedNode) else n for n in node_handles])

    def is_root(self, node) -> bool:
        if isinstance(node, CompactedNode):
            return False
        return super().is_root(node)

    # ------------------------------------------------------------------ matching: detection and adoption

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        if req is None or self.kvzip_disabled or self.disable:
            return super().match_prefix(params)
        if is_scoring_rid(req.rid):
            cap = self.scoring_len.get(req.rid)
            if cap is not None:  # only the repeat input is computed (and scored)
                params.key.limit = cap if params.key.limit is None else min(cap, params.key.limit)
            return super().match_prefix(params)
        try:
            entry = self._adoptable(req, params.key)
            if entry is not None:
                return self._adopt(req, entry)
            params = self._unadopt(req, params)
        except Exception as exc:
            self._runtime_error("match", exc)
            params = self._unadopt(req, params)
        result = super().match_prefix(params)
        if not getattr(req, SEEN_ATTR, False):
            setattr(req, SEEN_ATTR, True)
            try:
                self._observe(req, params.key, result)
            except Exception as exc:
                self._runtime_error("detection", exc)
        return result

    @staticmethod
    def _namespace(key: RadixKey) -> tuple[Any, Any]:
        return (key.extra_key, key.cache_salt)

    def _logical_tokens(self, req, key: RadixKey) -> tuple[array, int]:
        """The request's logical token ids and the key's logical length."""
        info: Adoption | None = getattr(req, ADOPT_ATTR, None)
        if info is None:
            return key.token_ids, len(key)
        return info.logical_ids + req.output_ids, len(key) + info.offset

    def _adoptable(self, req, key: RadixKey) -> CompactedPrefix | None:
        if not self.compacted or key.is_bigram:
            return None
        entries = self.compacted.get(self._namespace(key))
        if not entries:
            return None
        if (req.multimodal_inputs is not None or req.input_embeds is not None
                or req.positional_embed_overrides is not None or req.session is not None
                or getattr(req, "beam_group", None) is not None or req.is_dllm()):
            return None
        tokens, n = self._logical_tokens(req, key)
        info: Adoption | None = getattr(req, ADOPT_ATTR, None)
        start = req.logprob_start_len
        if info is not None and start >= 0:
            start += info.offset
        best = None
        for entry in entries:
            L = entry.logical_length
            if L > n or (req.return_logprob and 0 <= start < L):  # input logprobs inside the prefix
                continue
            if best is not None and L <= best.logical_length:
                continue
            if tokens[:L] == entry.tokens:
                best = entry
        return best

    def _adopt(self, req, entry: CompactedPrefix) -> MatchResult:
        info: Adoption | None = getattr(req, ADOPT_ATTR, None)
        if info is not None and info.entry is not entry:
            self._set_logical(req)
            info = None
        if info is None:
            logical = req.origin_input_ids
            info = Adoption(entry, logical, bool(req.skip_radix_cache_insert))
            L, P = entry.logical_length, entry.physical_length
            req.origin_input_ids = array("q", entry.tokens[:P]) + logical[L:]
            req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
            if req.logprob_start_len >= 0:
                req.logprob_start_len -= entry.offset
            req.skip_radix_cache_insert = True  # its row is physical: never inserted under logical keys
            setattr(req, ADOPT_ATTR, info)
        entry.last_access = time.monotonic()
        h = entry.handle
        return self.tree_core.empty_match_result._replace(
            device_prefix_len=entry.physical_length, last_device_node=h, last_host_node=h, best_match_node=h,
            full_kv_hit_length=entry.physical_length, cache_actions=[])

    def _set_logical(self, req) -> None:
        """Undo an adoption (the entry was dropped, or another one fits): logical ids back on the request."""
        info: Adoption | None = getattr(req, ADOPT_ATTR, None)
        if info is None:
            return
        req.origin_input_ids = info.logical_ids
        req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
        if req.logprob_start_len >= 0:
            req.logprob_start_len += info.offset
        req.skip_radix_cache_insert = info.skip_insert
        delattr(req, ADOPT_ATTR)

    def _unadopt(self, req, params: MatchPrefixParams) -> MatchPrefixParams:
        info: Adoption | None = getattr(req, ADOPT_ATTR, None)
        if info is None:
            return params
        offset = info.offset
        self._set_logical(req)
        key = params.key
        limit = None if key.limit is None else key.limit + offset
        return MatchPrefixParams(key=RadixKey(token_ids=req.full_untruncated_fill_ids, extra_key=key.extra_key,
                                              limit=limit, cache_salt=key.cache_salt),
                                 cow_mamba=params.cow_mamba, req=req)

    def _digest_key(self, namespace, tokens: array) -> Hashable:
        return (namespace, len(tokens), hashlib.blake2b(tokens.tobytes(), digest_size=16).digest())

    def _observe(self, req, key: RadixKey, result: MatchResult) -> None:
        """A new request hit `result.device_prefix_len` cached tokens: count the hit, maybe queue a job."""
        L = result.device_prefix_len // self.page_size * self.page_size
        if L < self.kvzip_trigger.min_prefix_tokens or key.is_bigram:
            return
        if (req.multimodal_inputs is not None or req.input_embeds is not None
                or req.positional_embed_overrides is not None):
            return
        namespace = self._namespace(key)
        tokens = key.token_ids[:L]
        ckey = self._digest_key(namespace, tokens)
        if not self.admission.eligible(ckey) or self._covered(namespace, tokens):
            return
        offer = self.admission.offer(ckey, L, key.cache_salt)
        if offer.candidate is None:
            return
        job, candidate = offer.job, offer.candidate
        self.stats.jobs["submitted" if job else "rejected"] += 1
        if job is not None:
            self.jobs[job.job_id] = _Job(job, array("q", tokens), namespace, getattr(req, "lora_id", None))
            self._dirty = True
            logger.info("kvzip-plugin: job %d queued for a %d-token prefix hit by %d requests", job.job_id, L,
                        candidate.hits)

    def _covered(self, namespace, tokens: array) -> bool:
        """A prefix that contains a compacted or in-flight one, or lies inside one, is not compressed again."""
        n = len(tokens)
        others = [e.tokens for e in self.compacted.get(namespace, [])]
        others += [j.tokens for j in self.jobs.values() if j.namespace == namespace]
        for other in others:
            m = min(n, len(other))
            if tokens[:m] == other[:m]:
                return True
        return False

    # ------------------------------------------------------------------ the pump (scheduler thread)

    def flush_pending_backups(self) -> None:
        super().flush_pending_backups()
        if self._decode_step is not None:  # the end of a pure-decode batch (its results are processed)
            t0, compressed, full = self._decode_step
            self._decode_step = None
            elapsed = time.perf_counter() - t0
            self.stats.decode_step_seconds_compressed.extend([elapsed] * compressed)
            self.stats.decode_step_seconds_full.extend([elapsed] * full)
        if self._scoring_step is not None:  # the end of an extend batch that ran scoring rows
            t0, tokens, total, capture_at_start = self._scoring_step
            self._scoring_step = None
            elapsed = time.perf_counter() - t0
            for job_id, n in tokens.items():
                j = self.jobs.get(job_id)
                if j is not None:
                    j.clock.add_step(elapsed, self._capture_seconds(job_id) - capture_at_start.get(job_id, 0.0), n,
                                     total)
        self.kvzip_pump()

    def _capture_seconds(self, job_id: int) -> float:
        scores = self.capture.jobs.get(job_id) if self.capture is not None else None
        return scores.kernel_seconds if scores is not None else 0.0

    def kvzip_pump(self, scheduler: Any = None, idle: bool = False) -> None:
        """Drive the jobs: notice finished scoring requests, commit compactions, start queued jobs, publish
        metrics. Called after every batch and when idle. Never raises."""
        if self.kvzip_disabled:
            return
        if scheduler is not None:
            self.bind_scheduler(scheduler)
        sched = self._scheduler() if self._scheduler is not None else None
        try:
            if sched is not None:
                self._check_scoring(sched)
            for j in list(self.jobs.values()):
                if j.job.status is JobStatus.SCORING and j.reqs == {} and j.scoring_started:
                    self._compact(j)
            if sched is not None:
                while self._can_start(sched) and (job := self.queue.start_next()) is not None:
                    self._start(self.jobs[job.job_id], sched)
        except Exception as exc:
            self._runtime_error("pump", exc)
        self._flush_stats(force=idle and self._dirty)  # the first idle pump after work publishes everything
        if idle and self._dirty:
            self._dump_state(sched)
        elif not idle:
            self._dirty = True  # a batch ran: the next idle pump dumps the state again

    def _runtime_error(self, where: str, exc: Exception) -> None:
        self._runtime_failures += 1
        logger.exception("kvzip-plugin: unexpected error in %s (%d/%d): %r", where, self._runtime_failures,
                         MAX_RUNTIME_FAILURES, exc)
        if self._runtime_failures >= MAX_RUNTIME_FAILURES:
            self._disable("runtime_errors", f"{self._runtime_failures} unexpected errors")

    def _can_start(self, sched: Any) -> bool:
        """Jobs yield to traffic: start one only when no request waits for admission and the pool has
        room for its scoring input and its destination slots."""
        if len(sched.waiting_queue) > 0 or getattr(sched, "chunked_req", None) is not None:
            return False
        pending = self.queue.peek()
        if pending is None:
            return False
        L = pending.candidate.num_tokens
        room = self.token_to_kv_pool_allocator.available_size() + super().evictable_size()
        return room >= 2 * L + SCORING_OVERHEAD + self.kvzip_config.carry_tokens

    def _start(self, j: _Job, sched: Any) -> None:
        L = len(j.tokens)
        try:
            key = RadixKey(token_ids=j.tokens, extra_key=j.namespace[0], cache_salt=j.namespace[1])
            match = super().match_prefix(MatchPrefixParams(key=key))
            if match.device_prefix_len < L:
                raise _Cancelled("the prefix was evicted before its job started")
            j.node = match.last_device_node
            j.lock = super().lock(j.node)  # pinned until commit or rollback
            if self.head_scores is not None:  # kvzip_head: no scoring pass, compacted at the next pump
                j.n_protected = protected_tokens(j.tokens, self._get_tokenizer(sched), self.kvzip_config)
                if self.head_scores.shape[1] != self.kv_pool.head_num:
                    raise Unservable(f"head scores for {self.head_scores.shape[1]} KV heads, this rank holds "
                                     f"{self.kv_pool.head_num} (TP > 1 is not supported by kvzip_head)")
                j.scores = head_level_scores(self.head_scores, L - j.n_protected)
                j.keep, j.tokens_kept, j.n_pages, j.layout = self._runs(j, j.scores)
                j.scoring_started = time.perf_counter()
                self._dirty = True
                logger.info("kvzip-plugin: job %d: %d tokens (%d protected), head-level scores (no scoring pass)",
                            j.job.job_id, L, j.n_protected)
                return
            max_len = int(getattr(sched, "max_req_input_len", None) or sched.model_config.context_len) - 1
            plan = plan_scoring(j.tokens, self._get_tokenizer(sched), self.kvzip_config, max_len,
                                min_chunk=_MIN_CHUNK)
            j.n_protected = plan.n_protected
            if envs.fault_injection() == "scoring":
                raise RuntimeError("fault injected (KVZIP_FAULT_INJECTION=scoring)")
            reqs, targets = [], {}
            for chunk, target in zip(plan.chunks, plan.targets(j.job.job_id, L, self.kvzip_config.score_softmax),
                                     strict=True):
                rid = f"{SCORING_PREFIX}{j.job.job_id}-{chunk.index}"
                reqs.append(self._scoring_req(sched, rid, array("q", j.tokens) + array("q", chunk.input_ids), j))
                targets[rid] = target
            assert self.capture is not None
            self.capture.add_targets(targets)
            for req in reqs:  # only once every chunk is valid
                j.reqs[req.rid] = req
                self.scoring_len[req.rid] = L
            j.scoring_started = time.perf_counter()
            for req in reqs:
                sched._add_request_to_queue(req)
            self._dirty = True
            logger.info("kvzip-plugin: job %d scoring %d tokens (%d protected) in %d chunk(s)", j.job.job_id, L,
                        j.n_protected, len(plan.chunks))
        except _Cancelled as exc:
            self._end(j, JobStatus.CANCELLED, str(exc))
        except Unservable as exc:  # the same prefix would fail again: never retried
            self._end(j, JobStatus.FAILED, str(exc), unservable=True)
        except Exception as exc:
            self._end(j, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def _scoring_req(self, sched: Any, rid: str, ids: array, j: _Job):
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

    def _check_scoring(self, sched: Any) -> None:
        waiting = {id(r) for r in sched.waiting_queue}
        for j in list(self.jobs.values()):
            if j.job.status is not JobStatus.SCORING:
                continue
            for rid, req in list(j.reqs.items()):
                if req.finished() and not req.kv.holds_kv:
                    del j.reqs[rid]
                    self.scoring_len.pop(rid, None)
                    reason = type(req.finished_reason).__name__
                    if reason != "FINISH_LENGTH":
                        self._end(j, JobStatus.CANCELLED, f"scoring request {rid} ended with {reason}")
                        break
                elif not req.kv.holds_kv and id(req) not in waiting and not req.finished():
                    # taken out of the waiting queue without running (e.g. /abort_request abort_all)
                    self._end(j, JobStatus.CANCELLED, f"scoring request {rid} was aborted")
                    break

    def _runs(self, j: _Job, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int, object | None]:
        """What the job keeps: keep `[layers, H_kv, L]`, the kept tokens `[layers, H_kv, P]` when every run
        has the same length P (SGLang's own kernel reads them; always for `head`), the pages the entry
        needs, and otherwise the head-page layout."""
        cfg = self.kvzip_config
        keep = select_runs(scores.cpu(), j.n_protected, cfg.ratio, cfg.structure, self.page_size)
        tokens = uniform_tokens(keep)
        if tokens is not None:
            return keep, tokens, tokens.shape[-1] // self.page_size, None
        layout = place_runs(keep.sum(-1), self.page_size)
        return keep, None, layout.n_blocks, layout

    def _compact(self, j: _Job) -> None:
        L = len(j.tokens)
        page = self.page_size
        assert self.capture is not None
        capture = self.capture
        if j.keep is None:
            job_scores = capture.jobs.get(j.job.job_id)
            if job_scores is None:
                self._end(j, JobStatus.FAILED, "no scores were captured for this job")
                return
            j.scores = job_scores.scores
            j.keep, j.tokens_kept, j.n_pages, j.layout = self._runs(j, j.scores)
        if j.txn is None:
            txn = CompactionTxn(_SlotAllocator(self), j.n_pages)
            try:
                txn.prepare()
            except RuntimeError as exc:  # no room now: retry at the next pump (bounded)
                j.waits += 1
                if j.waits >= MAX_ALLOC_WAIT_PUMPS:
                    self._end(j, JobStatus.FAILED, f"no free KV slots for the compacted prefix: {exc}")
                return
            j.txn = txn
        j.job.advance(JobStatus.COMPACTING)
        t0 = time.perf_counter()
        capture.drop_job(j.job.job_id)
        P = j.n_pages * page
        try:
            if envs.fault_injection() == "compaction":
                raise RuntimeError("fault injected (KVZIP_FAULT_INJECTION=compaction)")
            src = self.tree_core.collect_full_device_indices(j.node, self.root_node_handle(j.namespace[0]))
            if len(src) != L:
                raise RuntimeError(f"the prefix's tree path holds {len(src)} slots, expected {L}")
            dst = self._page_slots(j.txn.dst_block_ids)
            src_pages = (src[::page] // page).tolist()
            store = None
            if j.layout is None:  # every run the same length: slot s of every head = its s-th kept token
                plan = plan_compaction(j.tokens_kept, src_pages, j.txn.dst_block_ids, page)
                for idx, layer in enumerate(capture.layers):
                    for buf in (self.kv_pool._get_key_buffer(layer.layer_id),
                                self.kv_pool._get_value_buffer(layer.layer_id)):
                        apply_compaction(buf, plan.src_slots[idx], plan.dst_slots)
            else:
                assert self.paged is not None
                write_store(j.keep, j.layout, src_pages, j.txn.dst_block_ids, self.paged.views)
                store = PagedStore.build(j.layout, j.txn.dst_block_ids)
            if dst.is_cuda:  # forwards on other streams read the new slots once the entry is published
                torch.cuda.synchronize(dst.device)
            entry_holder: list[CompactedPrefix] = []
            j.txn.commit(lambda _ids: entry_holder.append(self._publish(j, dst, P, store)))
            self._dump_job(j, j.keep, j.scores, src, dst, P)
        except Exception as exc:
            self._end(j, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - t0
        self.stats.prefixes_compressed += 1
        self.stats.achieved_ratios.append(P / L)
        self.stats.compaction_seconds.append(seconds)
        # forward time of the scoring requests (as vLLM reports it); the wall time also holds the traffic's
        # batches that ran in between
        self.stats.scoring_seconds.append(j.clock.seconds if j.clock.tokens else t0 - j.scoring_started)
        ratio = j.clock.scoring_to_prefill(L)
        if ratio is not None:
            self.stats.scoring_to_prefill.append(ratio)
        self._end(j, JobStatus.COMMITTED)
        logger.info("kvzip-plugin: job %d committed (%s): %d -> %d tokens (%d slots saved, %s) in %.3f s",
                    j.job.job_id, self.kvzip_config.structure, L, P, L - P,
                    "head pages" if store is not None else "SGLang's own slots", seconds)

    def _publish(self, j: _Job, slots: torch.Tensor, P: int, store: PagedStore | None = None) -> CompactedPrefix:
        self._entry_ids += 1
        entry = CompactedPrefix(self._entry_ids, j.job.candidate.key, j.namespace, array("q", j.tokens), slots,
                                len(j.tokens), P, store=store)
        self.compacted.setdefault(j.namespace, []).append(entry)
        return entry

    def _page_slots(self, page_ids) -> torch.Tensor:
        device = self.token_to_kv_pool_allocator.device
        pages = torch.as_tensor(list(page_ids), dtype=torch.int64, device=device)
        if self.page_size == 1:
            return pages
        return (pages[:, None] * self.page_size + torch.arange(self.page_size, device=device)).flatten()

    def _end(self, j: _Job, status: JobStatus, error: str | None = None, unservable: bool = False) -> None:
        if j.txn is not None and status is not JobStatus.COMMITTED:
            j.txn.rollback()
        if j.lock is not None:
            super().unlock(j.lock)  # the originals go back to LRU eviction
            j.lock = None
        if self.capture is not None:
            self.capture.drop_job(j.job.job_id)
        for rid in list(j.reqs):
            self.scoring_len.pop(rid, None)
        sched = self._scheduler() if self._scheduler is not None else None
        if status is not JobStatus.COMMITTED and sched is not None and j.reqs:
            # scoring requests still queued are taken out; running ones finish on their own (ignored)
            ids = {id(r) for r in j.reqs.values()}
            sched.waiting_queue[:] = [r for r in sched.waiting_queue if id(r) not in ids]
        j.reqs = {}
        outcome = self.admission.finish(j.job, status, error, unservable=unservable)
        self.jobs.pop(j.job.job_id, None)
        self._dirty = True
        self.stats.jobs[outcome] += 1
        if status is not JobStatus.COMMITTED:
            logger.warning("kvzip-plugin: job %d %s: %s", j.job.job_id, status.value, error)

    # ------------------------------------------------------------------ batches (ForwardBatch.init_new hook)

    def on_forward_batch(self, ret: Any, batch: Any) -> None:
        """Logical positions for requests on compacted prefixes; the capture plan of scoring rows."""
        reqs = getattr(batch, "reqs", None)
        if not reqs:
            return
        mode = ret.forward_mode
        offsets = None
        compressed = 0
        for i, req in enumerate(reqs):
            info: Adoption | None = getattr(req, ADOPT_ATTR, None)
            compressed += info is not None
            if info is not None and info.offset:
                if offsets is None:
                    offsets = [0] * len(reqs)
                offsets[i] = info.offset
            if info is not None and not info.counted:
                info.counted = True
                self.stats.compressed_hits += 1
        # decode step time per request, on compacted vs full prefixes (until the batch's results are processed)
        self._decode_step = (time.perf_counter(), compressed, len(reqs) - compressed) if mode.is_decode() else None
        self._scoring_step = None
        if self.scoring_len and mode.is_extend() and not mode.is_decode():
            owner = {rid: job_id for job_id, j in self.jobs.items() for rid in j.reqs}
            lens = list(getattr(ret, "extend_seq_lens_cpu", None) or [])
            tokens: dict[int, int] = {}
            for req, n in zip(reqs, lens, strict=False):
                job_id = owner.get(req.rid)
                if job_id is not None:
                    tokens[job_id] = tokens.get(job_id, 0) + int(n)
            if tokens:
                self._scoring_step = (time.perf_counter(), tokens, int(sum(lens)),
                                      {job_id: self._capture_seconds(job_id) for job_id in tokens})
        if offsets is not None:
            off = torch.tensor(offsets, dtype=ret.positions.dtype, device=ret.positions.device)
            if mode.is_decode():
                ret.positions = ret.positions + off
            elif mode.is_extend():
                lens = torch.tensor(ret.extend_seq_lens_cpu, device=ret.positions.device)
                ret.positions = ret.positions + torch.repeat_interleave(off, lens)
            else:  # pragma: no cover - refused at start (speculative decoding)
                raise RuntimeError(f"kvzip-plugin: forward mode {mode} on a compacted prefix")
        if self.paged is not None:
            self.paged.arm(ret, self._paged_rows(ret, reqs, mode))
        if self.capture is not None:
            plan = None
            if self.capture.targets and mode.is_extend() and not mode.is_decode():
                plan = self.capture.plan(reqs, list(ret.extend_prefix_lens_cpu), list(ret.extend_seq_lens_cpu))
            self.capture.arm(getattr(ret, "extend_seq_lens_cpu", None), plan)

    @staticmethod
    def _paged_rows(ret: Any, reqs: list[Any], mode: Any) -> list[PagedRow]:
        """The batch's requests on head-page entries, for `attention.PagedAttention`."""
        entries = [(i, info.entry.store) for i, req in enumerate(reqs)
                   if (info := getattr(req, ADOPT_ATTR, None)) is not None and info.entry.store is not None]
        if not entries:
            return []
        if mode.is_decode():
            seq_lens = ret.seq_lens.tolist()
            return [PagedRow(store, int(reqs[i].kv.req_pool_idx), i, 1, int(seq_lens[i])) for i, store in entries]
        if not mode.is_extend():  # pragma: no cover - refused at start (speculative decoding)
            raise RuntimeError(f"kvzip-plugin: forward mode {mode} on a compacted prefix")
        lens, prefix = list(ret.extend_seq_lens_cpu), list(ret.extend_prefix_lens_cpu)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + int(n))
        return [PagedRow(store, int(reqs[i].kv.req_pool_idx), starts[i], int(lens[i]), int(prefix[i]) + int(lens[i]))
                for i, store in entries]

    # ------------------------------------------------------------------ outputs (OutputStreamer hook)

    @staticmethod
    def logical_view(reqs: list[Any]) -> list[tuple[Any, Any, int, int]]:
        """Show requests on compacted prefixes with their logical prompt and cached-token counts while
        SGLang reports them; returns what `physical_view` restores."""
        saved = []
        for req in reqs:
            info: Adoption | None = getattr(req, ADOPT_ATTR, None)
            if info is None:
                continue
            saved.append((req, req.origin_input_ids, req.cached_tokens, req.cached_tokens_device))
            req.origin_input_ids = info.logical_ids
            if req.cached_tokens:
                req.cached_tokens += info.offset
            if req.cached_tokens_device:
                req.cached_tokens_device += info.offset
        return saved

    @staticmethod
    def physical_view(saved) -> None:
        for req, ids, cached, cached_device in saved:
            req.origin_input_ids, req.cached_tokens, req.cached_tokens_device = ids, cached, cached_device

    # ------------------------------------------------------------------ stats, metrics, dumps

    def _blocks_saved(self) -> tuple[int, int]:
        saved = sum(e.offset for e in self._entries())
        return saved // self.page_size, saved * self.bytes_per_token

    def _flush_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_flushed < STATS_INTERVAL_S:
            return
        self._stats_flushed = now
        blocks, nbytes = self._blocks_saved()
        self.stats.blocks_saved, self.stats.bytes_saved = blocks, nbytes
        self.stats.jobs_queued, self.stats.jobs_running = self.queue.queued, self.queue.running
        stats, self.stats = self.stats, KVzipStats()
        if self.prom is not None:
            try:
                self.prom.observe(stats, self.prom_labels)
            except Exception as exc:  # pragma: no cover
                logger.warning("kvzip-plugin: metrics update failed: %r", exc)

    def state(self, sched: Any = None) -> dict:
        """The cache's KVzip state (for the dump and the tests)."""
        allocator = self.token_to_kv_pool_allocator
        entries = list(self._entries())
        free = None
        try:
            pages = allocator.get_all_free_pages()
            if pages is not None:
                free = set(pages.tolist())
        except Exception:  # pragma: no cover - allocators without a page list
            free = None
        overlap = None
        if free is not None:
            overlap = sum(int(s) // self.page_size in free for e in entries for s in e.slots.tolist())
        fully_idle = None
        if sched is not None and hasattr(sched, "is_fully_idle"):
            try:
                fully_idle = bool(sched.is_fully_idle())
            except Exception:  # pragma: no cover
                fully_idle = None
        self._dumps += 1
        return {
            "pid": os.getpid(),
            "seq": self._dumps,
            "fully_idle": fully_idle,
            "disabled": self.kvzip_disabled,
            "total": int(allocator.size),
            "available": int(allocator.available_size()),
            "tree_evictable": int(super().evictable_size()),
            "tree_protected": int(super().protected_size()),
            "compacted": [{"id": e.entry_id, "L": e.logical_length, "P": e.physical_length, "refs": e.refs,
                           "slots": e.slots.tolist()} for e in entries],
            "compacted_slots_in_free_pool": overlap,
            "jobs_live": len(self.jobs),
            "finished": {s.value: n for s, n in self.queue.finished.items()},
            "scoring_targets": len(self.capture.targets) if self.capture is not None else 0,
        }

    def _dump_state(self, sched: Any = None) -> None:
        out = envs.dump_dir()
        self._dirty = False
        if out is None:
            return
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            tmp = Path(out) / f".state-{os.getpid()}.json"
            tmp.write_text(json.dumps(self.state(sched)))
            tmp.replace(Path(out) / "state.json")
        except Exception as exc:  # pragma: no cover
            logger.warning("kvzip-plugin: state dump failed: %r", exc)

    def _dump_job(self, j: _Job, tokens: torch.Tensor, scores: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  P: int) -> None:
        out = envs.dump_dir()
        if out is None:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"job_id": j.job.job_id, "keep": tokens.cpu(), "structure": self.kvzip_config.structure,
                    "head_pages": j.layout is not None, "scores": scores.cpu(),
                    "n_protected": j.n_protected, "prefix_len": len(j.tokens), "physical_length": P,
                    "prefix_ids": list(j.tokens), "src_slots": src.cpu(), "dst_slots": dst.cpu()},
                   Path(out) / f"job-{j.job.job_id}.pt")

    def _get_tokenizer(self, sched: Any) -> Any:
        if self._tokenizer is None:
            tok = getattr(sched, "tokenizer", None)
            if tok is None:
                from transformers import AutoTokenizer

                args = self.server_args or sched.server_args
                tok = AutoTokenizer.from_pretrained(args.tokenizer_path, trust_remote_code=args.trust_remote_code)
            self._tokenizer = tok
        return self._tokenizer


class _Cancelled(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------
# fail-closed checks and metrics
# ---------------------------------------------------------------------------------------------------------


def unsupported_runtime_reason(cache: Any, server_args: Any, tp_worker: Any) -> tuple[str, str] | None:
    """Why KVzip cannot run inside this cache (code, message), checked once the pools and the model exist."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if cache.disable:
        return "radix_cache_disabled", "the radix cache is disabled"
    if server_args is not None:
        if getattr(server_args, "speculative_algorithm", None):
            return "speculative_decoding", "speculative decoding is not supported"
        if int(getattr(server_args, "pp_size", 1) or 1) > 1:
            return "pipeline_parallel", "pipeline parallelism is not supported"
        if getattr(server_args, "enable_session_radix_cache", False) or getattr(
                server_args, "enable_streaming_session", False):
            return "sessions", "session radix caches / streaming sessions are not supported"
        if getattr(server_args, "enable_unified_cache_external_linker", False):
            return "external_linker", "the unified-cache external linker is not supported"
        if getattr(server_args, "enable_lmcache", False) or getattr(server_args, "enable_flexkv", False):
            return "external_kv_store", "LMCache / FlexKV are not supported"
        if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
            return "disaggregation", "prefill/decode disaggregation is not supported"
        structure = getattr(getattr(cache, "kvzip_config", None), "structure", "head")
        if structure != "head" and getattr(server_args, "device", None) not in (None, "cpu") and not getattr(
                server_args, "disable_cuda_graph", False):
            # a replayed graph runs the backend's kernel alone: the head-page attention would be skipped
            return "cuda_graphs", (f"the {structure} structure is served by the plugin's attention, which a CUDA "
                                   "graph replay skips: use --disable-cuda-graph or --kv-compression-structure head")
        if getattr(server_args, "device", None) not in (None, "cpu") and prefill_graphs_on(server_args):
            # a replayed prefill graph runs only RadixAttention._eager_attention: the score capture around
            # RadixAttention.forward would see nothing, or part of a job's chunks (cuda-review.md §2)
            return "prefill_cuda_graphs", ("SGLang replays prefill batches from CUDA graphs, which skip the plugin's "
                                           "score capture: use --disable-prefill-cuda-graph (or "
                                           "--cuda-graph-backend-prefill disabled)")
    kv_pool = cache.kv_pool
    if type(kv_pool) is not MHATokenToKVPool:
        return "kv_pool", f"KV pool {type(kv_pool).__name__} is not supported (plain MHATokenToKVPool only)"
    if getattr(kv_pool, "use_hnd", False) or getattr(kv_pool, "layout", "NHD") not in ("NHD", None):
        return "kv_pool", "the HND KV layout is not supported"
    if getattr(kv_pool, "store_dtype", kv_pool.dtype) != kv_pool.dtype:
        return "kv_pool", "quantized KV caches are not supported"
    if tp_worker is None:
        return "no_model", "no model worker was given to the cache"
    model_config = getattr(getattr(tp_worker, "model_runner", None), "model_config", None)
    if model_config is not None and getattr(model_config, "model_is_mrope", False):
        return "mrope", "models with multimodal rotary positions (mrope) are not supported"
    from sglang.srt.layers.radix_attention import RadixAttention

    for module in tp_worker.model_runner.model.modules():
        if isinstance(module, RadixAttention):
            if (module.sliding_window_size or -1) > 0:
                return "sliding_window", "sliding-window attention layers are not supported"
            if module.logit_cap and module.logit_cap > 0:
                return "logit_cap", "attention logit soft-capping is not supported"
            if module.is_cross_attention or module.qk_head_dim != module.v_head_dim:
                return "attention_layout", "cross attention / MLA-style head sizes are not supported"
    return None


def prefill_graphs_on(server_args: Any) -> bool:
    """Whether SGLang (0.5.23) may replay prefill batches from CUDA graphs: the resolved
    `cuda_graph_config.prefill.backend` when present, else the flags as SGLang resolves them (an explicit
    `--cuda-graph-backend-prefill` wins over `--disable-prefill-cuda-graph` / `--disable-cuda-graph`;
    the default on CUDA is `breakable`)."""
    backend = getattr(getattr(getattr(server_args, "cuda_graph_config", None), "prefill", None), "backend", None)
    if backend is None:
        backend = getattr(server_args, "cuda_graph_backend_prefill", None)
    if backend is None:
        off = getattr(server_args, "disable_cuda_graph", False) or getattr(server_args, "disable_prefill_cuda_graph",
                                                                            False)
        backend = "disabled" if off else "breakable"
    return backend != "disabled"


def served_model_name(server_args: Any) -> str | None:
    """The `model_name` label SGLang puts on its own series (`--served-model-name`, else the model path)."""
    if server_args is None:
        return None
    name = getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", None)
    return None if name is None else str(name)


def make_prom_metrics(model_name: str | None = None) -> tuple[Any, list[str]]:
    """`sglang:kvzip_*` series labelled like SGLang's radix-cache metrics (cache_type, tp/pp/dp rank, extra
    labels), plus `model_name` like SGLang's scheduler series (so dashboards select them the same way).
    Built in the scheduler process after SGLang set PROMETHEUS_MULTIPROC_DIR (`--enable-metrics`), so
    `/metrics` serves them through its multiprocess collector."""
    from sglang.srt.layers.dp_attention import is_dp_attention_enabled
    from sglang.srt.observability.metrics_collector import radix_cache_metric_labels
    from sglang.srt.runtime_context import get_observability, get_parallel

    from kvzip_plugin.metrics import PromMetrics

    labels = radix_cache_metric_labels("UnifiedRadixCache", get_parallel(), is_dp_attention_enabled())
    if model_name is not None:
        labels["model_name"] = model_name
    extra = get_observability().extra_metric_labels
    if extra:
        labels.update(extra)
    names = list(labels)
    return PromMetrics(prefix="sglang:", labelnames=names), [str(labels[n]) for n in names]


def report_fallback(code: str, enable_metrics: bool, model_name: str | None = None) -> None:
    """Count one fallback (`sglang:kvzip_fallbacks_total{reason}`) where no KVzipRadixCache exists (the
    factory built SGLang's default cache). Only with --enable-metrics; never raises."""
    if not enable_metrics:
        return
    try:
        prom, labels = make_prom_metrics(model_name)
        prom.observe(KVzipStats(fallbacks={code: 1}), labels)
    except Exception as exc:  # pragma: no cover
        logger.debug("kvzip-plugin: fallback metric not recorded: %r", exc)
