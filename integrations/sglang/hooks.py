# SPDX-License-Identifier: Apache-2.0
"""Runtime hooks of KVzip in SGLang's scheduler process, applied through SGLang's `HookRegistry` when the
first `KVzipRadixCache` is built (so other processes, and servers without `--kv-compression kvzip`, are
never patched):

* `Scheduler.on_idle` (AFTER): pump the jobs when no batch runs (`KVzipRadixCache.kvzip_pump`);
* `Scheduler.maybe_sleep_on_idle` (AROUND): with `--sleep-on-idle`, an idle scheduler does not sleep (up to
  1 s, until a request arrives) while KVzip has a job queued or running or has not yet published the metrics
  and state of the last batch (`KVzipRadixCache.kvzip_busy`), so neither is delayed by it;
* `ForwardBatch.init_new` (AFTER): logical positions of requests on compacted prefixes (`+ L - P`), and the
  capture plan of scoring rows (`KVzipRadixCache.on_forward_batch`);
* `SchedulerOutputStreamer.stream_output` (AROUND): outputs of the internal `kvzip-score-*` requests are dropped;
  requests on compacted prefixes are reported with their logical `prompt_tokens` / `cached_tokens`;
* `Scheduler.send_abort_output` (AROUND): no abort message for internal scoring requests (the
  TokenizerManager does not know them);
* `QueueCount.from_reqs` (AROUND): SGLang's request gauges (`sglang:num_running_reqs`,
  `sglang:num_queue_reqs`) count client requests only, not the internal scoring requests;
* `Scheduler.get_next_batch_to_run`, `Scheduler._should_defer_prefill`, `PrefillAdder.add_one_req`,
  `PrefillAdder.add_chunked_req`, `SchedulePolicy.shortest_prefill_chunk_limit` (AROUND): scoring prefills in
  slices between decode steps
  (`slicing.py`);
* the graph runners' `can_run_graph` (AROUND, `graphs.RUNNERS`): no graph replay for a batch with scoring
  rows or requests on head-page entries (`graphs.py`);
* `TorchNativeAttnBackend._run_sdpa_forward_extend` / `_run_sdpa_forward_decode` (AROUND), SGLang's CPU
  backend: scoring rows attend over their new rows only, so a scoring slice costs its tokens, not a whole
  prefill; rows on head-page entries, whose output the plugin writes after the layer, are not computed
  (`native_backend.py`).

Each hook looks the cache up at call time and does nothing without an active one.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvzip_plugin.integrations.sglang import graphs, native_backend

logger = logging.getLogger("sglang.kvzip_plugin")

TARGETS = {
    "on_idle": "sglang.srt.managers.scheduler.Scheduler.on_idle",
    "sleep_on_idle": "sglang.srt.managers.scheduler.Scheduler.maybe_sleep_on_idle",
    "init_new": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "stream_output": "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output",
    "send_abort_output": "sglang.srt.managers.scheduler.Scheduler.send_abort_output",
    "queue_count": "sglang.srt.observability.metrics_collector.QueueCount.from_reqs",
    "next_batch": "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
    "defer_prefill": "sglang.srt.managers.scheduler.Scheduler._should_defer_prefill",
    "add_one_req": "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
    "add_chunked_req": "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
    "chunk_limit": "sglang.srt.managers.schedule_policy.SchedulePolicy.shortest_prefill_chunk_limit",
    "native_extend": native_backend.EXTEND_TARGET,
    "native_decode": native_backend.DECODE_TARGET,
}

_lock = threading.Lock()
_installed: list[bool] = []


def _active(tree_cache: Any):
    """`tree_cache` if it is a KVzip cache that is not disabled, else None."""
    from kvzip_plugin.integrations.sglang.radix_cache import KVzipRadixCache

    if isinstance(tree_cache, KVzipRadixCache) and not tree_cache.kvzip_disabled:
        return tree_cache
    return None


def _cache_of(scheduler: Any):
    return _active(getattr(scheduler, "tree_cache", None))


def _after_on_idle(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    cache = _cache_of(scheduler)
    if cache is not None:
        cache.kvzip_pump(scheduler, idle=True)
    return None


def _around_sleep_on_idle(original, scheduler: Any, *args: Any, **kwargs: Any):
    cache = _cache_of(scheduler)
    if cache is not None and cache.kvzip_busy():
        return None
    return original(scheduler, *args, **kwargs)


def _after_init_new(result: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    from kvzip_plugin.integrations.sglang.radix_cache import active_cache

    cache = active_cache()
    if cache is not None and result is not None:
        cache.on_forward_batch(result, batch)
    return None


def _around_stream_output(original, streamer: Any, reqs, *args: Any, **kwargs: Any):
    from kvzip_plugin.integrations.sglang.adoption import logical_view, physical_view
    from kvzip_plugin.integrations.sglang.radix_cache import active_cache
    from kvzip_plugin.integrations.sglang.scheduling import is_scoring_rid

    if active_cache() is None:
        return original(streamer, reqs, *args, **kwargs)
    kept = [r for r in reqs if not is_scoring_rid(r.rid)]
    if not kept:
        return None
    saved = logical_view(kept)
    try:
        return original(streamer, kept, *args, **kwargs)
    finally:
        physical_view(saved)


def _around_send_abort_output(original, scheduler: Any, abort_req: Any, req: Any, *args: Any, **kwargs: Any):
    from kvzip_plugin.integrations.sglang.scheduling import is_scoring_rid

    if req is not None and is_scoring_rid(getattr(req, "rid", None)):
        return None
    return original(scheduler, abort_req, req, *args, **kwargs)


def _around_queue_count(original, cls: Any, reqs, *args: Any, **kwargs: Any):
    from kvzip_plugin.integrations.sglang.scheduling import is_scoring_rid

    return original(cls, [r for r in reqs if not is_scoring_rid(getattr(r, "rid", None))], *args, **kwargs)


def _slicing(tree_cache: Any):
    cache = _active(tree_cache)
    return None if cache is None else cache.slicing


def _around_next_batch(original, scheduler: Any, *args: Any, **kwargs: Any):
    cache = _cache_of(scheduler)
    if cache is None or cache.slicing is None:
        return original(scheduler, *args, **kwargs)
    return cache.slicing.round(original, scheduler, *args, **kwargs)


def _around_defer_prefill(original, scheduler: Any, *args: Any, **kwargs: Any):
    cache = _cache_of(scheduler)
    if cache is None or cache.slicing is None:
        return original(scheduler, *args, **kwargs)
    return cache.slicing.defer_prefill(original, scheduler, *args, **kwargs)


def _around_add_one_req(original, adder: Any, *args: Any, **kwargs: Any):
    slicing = _slicing(getattr(adder, "tree_cache", None))
    if slicing is None:
        return original(adder, *args, **kwargs)
    return slicing.add_one_req(original, adder, *args, **kwargs)


def _around_add_chunked_req(original, adder: Any, *args: Any, **kwargs: Any):
    slicing = _slicing(getattr(adder, "tree_cache", None))
    if slicing is None:
        return original(adder, *args, **kwargs)
    return slicing.add_chunked_req(original, adder, *args, **kwargs)


def _around_chunk_limit(original, policy: Any, *args: Any, **kwargs: Any):
    slicing = _slicing(getattr(policy, "tree_cache", None))
    if slicing is None:
        return original(policy, *args, **kwargs)
    return slicing.chunk_limit(original, policy, *args, **kwargs)


def install() -> None:
    """Register and apply the hooks (once per process)."""
    with _lock:
        if _installed:
            return
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(TARGETS["on_idle"], _after_on_idle, HookType.AFTER)
        HookRegistry.register(TARGETS["sleep_on_idle"], _around_sleep_on_idle, HookType.AROUND)
        HookRegistry.register(TARGETS["init_new"], _after_init_new, HookType.AFTER)
        HookRegistry.register(TARGETS["stream_output"], _around_stream_output, HookType.AROUND)
        HookRegistry.register(TARGETS["send_abort_output"], _around_send_abort_output, HookType.AROUND)
        HookRegistry.register(TARGETS["queue_count"], _around_queue_count, HookType.AROUND)
        HookRegistry.register(TARGETS["next_batch"], _around_next_batch, HookType.AROUND)
        HookRegistry.register(TARGETS["defer_prefill"], _around_defer_prefill, HookType.AROUND)
        HookRegistry.register(TARGETS["add_one_req"], _around_add_one_req, HookType.AROUND)
        HookRegistry.register(TARGETS["add_chunked_req"], _around_add_chunked_req, HookType.AROUND)
        HookRegistry.register(TARGETS["chunk_limit"], _around_chunk_limit, HookType.AROUND)
        HookRegistry.register(TARGETS["native_extend"], native_backend.around_extend, HookType.AROUND)
        HookRegistry.register(TARGETS["native_decode"], native_backend.around_decode, HookType.AROUND)
        for target in graphs.RUNNERS:
            HookRegistry.register(target, graphs.around_can_run_graph, HookType.AROUND)
        HookRegistry.apply_hooks()
        missing = [t for t in (*TARGETS.values(), *graphs.RUNNERS) if t not in HookRegistry._patched]
        if missing:
            raise RuntimeError(f"hooks not applied: {missing}")
        _installed.append(True)
        logger.info("kvzip-plugin: scheduler hooks applied")
