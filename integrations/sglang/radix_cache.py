# SPDX-License-Identifier: Apache-2.0
"""`KVzipRadixCache`: SGLang 0.5.23's default tree cache (`UnifiedRadixCache`) plus KVzip compaction of hot
shared prefixes (DESIGN.md beside this file has the hook points).

This class is the seam SGLang calls: it overrides the tree-cache methods and hands each concern to its home,
the same roles as the vLLM glue:

* admission and scoring requests, the life of each job: `scheduling.Jobs` (from `match_prefix`, and the pump
  after every batch and when idle);
* score capture inside the attention layers: `capture.ScoreCapture`;
* the compacted prefixes (slot ownership, accounting, eviction): `store.CompactedEntries`; the copy into
  fresh slots: `compaction.py`;
* requests served by a compacted prefix (physical ids, logical positions and outputs): `adoption.py`;
  the attention over head pages: `attention.PagedAttention`;
* metrics and dumps: `metrics.py`; fail-closed checks: `runtime.py`.

Accounting: unpinned entries count as evictable, pinned ones as protected (SGLang's pool invariant
`available + evictable + protected == total` holds); `_evict` frees least recently used unpinned entries
once the tree has nothing left to evict. Everything runs on the scheduler thread.

Imports SGLang at module level: import this module only inside an SGLang process (or a test that has
SGLang importable).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Any

import torch
from kvzip_plugin.integrations.sglang import KVCompressionSettings, adoption, graphs, native_backend
from kvzip_plugin.integrations.sglang.attention import PagedAttention
from kvzip_plugin.integrations.sglang.capture import ScoreCapture
from kvzip_plugin.integrations.sglang.metrics import MetricsPublisher, StepClock, served_model_name, write_state
from kvzip_plugin.integrations.sglang.runtime import unsupported_runtime_reason
from kvzip_plugin.integrations.sglang.scheduling import Jobs, is_scoring_rid
from kvzip_plugin.integrations.sglang.slicing import Slicing, scoring_budget
from kvzip_plugin.integrations.sglang.store import CompactedEntries, CompactedNode, CompactedPrefix, namespace_of
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

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.head_scores import load_head_scores
from kvzip_plugin.metrics import KVzipStats
from kvzip_plugin.settings import DEFAULT_STRUCTURE

logger = logging.getLogger("sglang.kvzip_plugin")

MAX_RUNTIME_FAILURES = 5  # unexpected errors before KVzip is disabled in this process

_active: list[weakref.ReferenceType] = []


def active_cache() -> KVzipRadixCache | None:
    """The KVzipRadixCache of this (scheduler) process, if any."""
    cache = _active[-1]() if _active else None
    return cache if cache is not None and not cache.kvzip_disabled else None


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
        budget = scoring_budget(self.kvzip_settings, server_args)
        self.slicing = Slicing(budget, self.page_size) if budget.step_tokens > 0 else None
        self.jobs = Jobs(self)
        self.entries = CompactedEntries(self.token_to_kv_pool_allocator.free, self._entry_dropped)
        self.metrics = MetricsPublisher(params.enable_metrics, served_model_name(server_args))
        self.step_clock = StepClock()
        self._runtime_failures = 0
        self._scheduler: Any = None
        self._tokenizer: Any = None
        self._dirty = True
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
        self.jobs.cancel_all("KV compression disabled")
        self._flush_stats(force=True)

    def _runtime_error(self, where: str, exc: Exception) -> None:
        self._runtime_failures += 1
        logger.exception("kvzip-plugin: unexpected error in %s (%d/%d): %r", where, self._runtime_failures,
                         MAX_RUNTIME_FAILURES, exc)
        if self._runtime_failures >= MAX_RUNTIME_FAILURES:
            self._disable("runtime_errors", f"{self._runtime_failures} unexpected errors")

    def _find_scheduler(self) -> None:
        """The scheduler building this cache (it is on the call stack); else the on_idle hook sets it."""
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

    def scheduler(self) -> Any:
        return self._scheduler() if self._scheduler is not None else None

    def tokenizer(self, sched: Any) -> Any:
        """The scheduler's tokenizer (the scoring template and protected tokens need it)."""
        if self._tokenizer is None:
            tok = getattr(sched, "tokenizer", None)
            if tok is None:
                from transformers import AutoTokenizer

                args = self.server_args or sched.server_args
                tok = AutoTokenizer.from_pretrained(args.tokenizer_path, trust_remote_code=args.trust_remote_code)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def stats(self) -> KVzipStats:
        """Statistics gathered since the last metrics flush."""
        return self.metrics.stats

    def mark_dirty(self) -> None:
        """The state changed: the next idle pump publishes the metrics and dumps the state."""
        self._dirty = True

    # ------------------------------------------------------------------ the tree itself (for `Jobs`)

    def tree_match(self, key: RadixKey) -> MatchResult:
        return super().match_prefix(MatchPrefixParams(key=key))

    def tree_lock(self, node: Any) -> TreeLock:
        return super().lock(node)

    def tree_unlock(self, lock: TreeLock) -> None:
        super().unlock(lock)

    def tree_evictable_size(self) -> int:
        return super().evictable_size()

    def evict_tokens(self, n: int) -> None:
        self.evict(EvictParams(num_tokens=n))

    # ------------------------------------------------------------------ accounting (SGLang's pool invariant)

    def evictable_size(self) -> int:
        return super().evictable_size() + self.entries.slots_held(pinned=False)

    def protected_size(self) -> int:
        return super().protected_size() + self.entries.slots_held(pinned=True)

    def full_evictable_size(self) -> int:
        return super().full_evictable_size() + self.entries.slots_held(pinned=False)

    def full_protected_size(self) -> int:
        return super().full_protected_size() + self.entries.slots_held(pinned=True)

    def _evict(self, params: EvictParams, available_size_targets=None, *, allocation_reclaim_satisfied=None):
        result = super()._evict(params, available_size_targets,
                                allocation_reclaim_satisfied=allocation_reclaim_satisfied)
        need = params.num_tokens - result.num_tokens_evicted
        if need > 0 and self.entries:
            if allocation_reclaim_satisfied is not None and allocation_reclaim_satisfied():
                return result
            freed = self.entries.evict(need)
            if freed:
                result = EvictResult(result.num_tokens_evicted + freed, result.swa_num_tokens_evicted,
                                     result.mamba_num_evicted)
        return result

    def _entry_dropped(self, entry: CompactedPrefix) -> None:
        self.jobs.reopen(entry.key)  # the document may be compressed again
        self._dirty = True

    def reset(self) -> None:
        super().reset()
        if getattr(self, "kvzip_disabled", "initialising") == "initialising":
            return
        # SGLang flushes the cache (`/flush_cache`, fully idle): jobs are cancelled (the tree was reset: no
        # lock is left to release), compacted prefixes dropped.
        self.jobs.cancel_all("prefix cache reset", tree_reset=True)
        self.entries.clear(reason="dropped (prefix cache reset)")

    # ------------------------------------------------------------------ compacted nodes as tree handles

    def lock(self, node_id, skip_lock_components=()):
        if isinstance(node_id, CompactedNode):
            self.entries.lock(node_id.entry)
            return TreeLock(node_id, DecLockRefParams())
        return super().lock(node_id, skip_lock_components)

    def unlock(self, lock) -> None:
        if lock is not None and isinstance(lock.node, CompactedNode):
            self.entries.unlock(lock.node.entry)
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
            cap = self.jobs.scoring_len.get(req.rid)
            if cap is not None:  # only the repeat input is computed (and scored)
                params.key.limit = cap if params.key.limit is None else min(cap, params.key.limit)
            return super().match_prefix(params)
        try:
            entry = adoption.adoptable(self.entries.of(namespace_of(params.key)), req, params.key)
            if entry is not None:
                return adoption.adopt(req, entry, self.tree_core.empty_match_result)
            params = adoption.unadopt(req, params)
        except Exception as exc:
            self._runtime_error("match", exc)
            params = adoption.unadopt(req, params)
        result = super().match_prefix(params)
        try:
            self.jobs.observe(req, params.key, result.device_prefix_len)
        except Exception as exc:
            self._runtime_error("detection", exc)
        return result

    # ------------------------------------------------------------------ the pump (scheduler thread)

    def flush_pending_backups(self) -> None:
        super().flush_pending_backups()
        # the end of a batch (its results are processed): decode step time, scoring forward time
        self.step_clock.end_batch(self.stats, {job_id: j.clock for job_id, j in self.jobs.live.items()},
                                  self._capture_seconds)
        self.kvzip_pump()

    def _capture_seconds(self, job_id: int) -> float:
        scores = self.capture.jobs.get(job_id) if self.capture is not None else None
        return scores.kernel_seconds if scores is not None else 0.0

    def kvzip_busy(self) -> bool:
        """Work the next idle pump must do: a job queued or running, or metrics and state not yet published
        since the last batch (SGLang's `--sleep-on-idle` must not delay them)."""
        return self._dirty or self.jobs.pending()

    def kvzip_pump(self, scheduler: Any = None, idle: bool = False) -> None:
        """Drive the jobs: notice finished scoring requests, commit compactions, start queued jobs, publish
        metrics. Called after every batch and when idle. Never raises."""
        if self.kvzip_disabled:
            return
        if scheduler is not None:
            self.bind_scheduler(scheduler)
        sched = self.scheduler()
        try:
            self.jobs.pump(sched)
        except Exception as exc:
            self._runtime_error("pump", exc)
        self._flush_stats(force=idle and self._dirty)  # the first idle pump after work publishes everything
        if idle and self._dirty:
            self._dirty = False
            write_state(self.state(sched))
        elif not idle:
            self._dirty = True  # a batch ran: the next idle pump dumps the state again

    # ------------------------------------------------------------------ batches (ForwardBatch.init_new hook)

    def on_forward_batch(self, ret: Any, batch: Any) -> None:
        """Logical positions for requests on compacted prefixes, the head-page attention's rows, the capture
        plan of scoring rows, and the step clock."""
        reqs = getattr(batch, "reqs", None)
        if not reqs:
            return
        mode = ret.forward_mode
        compressed, new = adoption.shift_positions(ret, reqs)
        self.stats.compressed_hits += len(new)
        for key in new:  # the hits a compacted prefix serves weigh against displacing it (retention.py)
            self.jobs.admission.note_compressed_hit(key)
        # decode step time per request, on compacted vs full prefixes (until the batch's results are processed)
        self.step_clock.clear()
        if mode.is_decode():
            self.step_clock.start_decode(compressed, len(reqs) - compressed)
        elif self.jobs.scoring_len and mode.is_extend():
            lens = list(getattr(ret, "extend_seq_lens_cpu", None) or [])
            tokens = self.jobs.scoring_tokens(reqs, lens)
            if tokens:
                self.step_clock.start_scoring(tokens, int(sum(lens)),
                                              {job_id: self._capture_seconds(job_id) for job_id in tokens})
        paged = plan = None
        if self.paged is not None:
            paged = adoption.paged_rows(ret, reqs)
            self.paged.arm(ret, paged)
        if self.capture is not None:
            if self.capture.targets and mode.is_extend() and not mode.is_decode():
                plan = self.capture.plan(reqs, list(ret.extend_prefix_lens_cpu), list(ret.extend_seq_lens_cpu))
            self.capture.arm(getattr(ret, "extend_seq_lens_cpu", None), plan)
        graphs.mark(ret, bool(paged) or bool(plan))

    # ------------------------------------------------------------------ stats, metrics, dumps

    def _flush_stats(self, force: bool = False) -> None:
        saved = self.entries.tokens_saved()
        queue = self.jobs.admission.queue
        self.metrics.flush(saved // self.page_size, saved * self.bytes_per_token, queue.queued, queue.running,
                           force=force)

    def state(self, sched: Any = None) -> dict:
        """The cache's KVzip state (for the dump and the tests)."""
        allocator = self.token_to_kv_pool_allocator
        free = None
        try:
            pages = allocator.get_all_free_pages()
            if pages is not None:
                free = set(pages.tolist())
        except Exception:  # pragma: no cover - allocators without a page list
            free = None
        overlap = None
        if free is not None:
            overlap = sum(int(s) // self.page_size in free for e in self.entries for s in e.slots.tolist())
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
            "compacted": self.entries.describe(),
            "compacted_slots_in_free_pool": overlap,
            "jobs_live": len(self.jobs.live),
            "finished": {s.value: n for s, n in self.jobs.admission.queue.finished.items()},
            "scoring_targets": len(self.capture.targets) if self.capture is not None else 0,
            "graph_marks": dict(graphs.marks),
            "native_extend_rows": native_backend.rows_computed,
            "native_rows_skipped": native_backend.rows_skipped,
            "slicing": self.slicing.describe() if self.slicing is not None else None,
        }
