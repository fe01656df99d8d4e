# SPDX-License-Identifier: Apache-2.0
"""Pins every SGLang 0.5.23 internal the kvzip integration uses or will use (DESIGN.md beside
integrations/sglang/__init__.py), by signature, by source text and, where it runs on a CPU without a
model, by behaviour of the real classes (pools, allocator, unified radix tree). A failure here means
SGLang moved: re-read DESIGN.md's hook points before touching the integration."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from array import array

import pytest

from tests.integrations.sglang import harness

harness.require_sglang()

import torch  # noqa: E402


def src(obj) -> str:
    return inspect.getsource(inspect.unwrap(obj))


def params_of(func) -> list[str]:
    return list(inspect.signature(inspect.unwrap(func)).parameters)


def test_version():
    from importlib.metadata import version

    assert version("sglang") == "0.5.23"


# --------------------------------------------------------------------------- plugins, hooks, server args


def test_plugin_loader():
    import sglang.srt.plugins as plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType, _current_plugin_source  # noqa: F401

    assert plugins.GENERAL_PLUGINS_GROUP == "sglang.srt.plugins"
    body = src(plugins.load_plugins)
    assert "func()" in body and "HookRegistry.apply_hooks()" in body and "_current_plugin_source.set" in body
    assert {t.name for t in HookType} == {"BEFORE", "AFTER", "AROUND", "REPLACE"}
    assert params_of(HookRegistry.register)[:3] == ["target", "hook", "hook_type"]
    assert callable(HookRegistry.apply_hooks)


def test_load_plugins_runs_in_every_process():
    import sglang.launch_server as launch
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process
    from sglang.srt.managers.scheduler import run_scheduler_process

    launch_src = inspect.getsource(launch)
    assert launch_src.index("load_plugins()") < launch_src.index("prepare_server_args(sys.argv[1:])")
    init = src(Engine.__init__)
    assert init.index("load_plugins()") < init.index("self.server_args_class(**kwargs)")
    body = src(run_scheduler_process).split("):\n", 1)[1]  # after the signature
    assert body.lstrip().startswith("# Load plugins") and body.index("load_plugins()") < body.index("publish(")
    assert "load_plugins()" in src(run_detokenizer_process)


def test_server_args_hook_targets():
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    for name, kind in (("add_cli_args", staticmethod), ("from_cli_args", classmethod)):
        assert isinstance(ServerArgs.__dict__[name], kind), name
    assert "record_fields(cls)" in src(ServerArgs.from_cli_args)  # unknown Namespace attrs are dropped
    body = src(prepare_server_args)
    assert "ServerArgs.add_cli_args(parser)" in body and "ServerArgs.from_cli_args(raw_args)" in body
    resolve = src(ServerArgs.resolve_once)
    assert '_resolution_finished' in resolve and "self._input_frozen = True" in resolve
    assert "dict(self.__dict__)" in src(ServerArgs.__reduce__)  # private attrs reach the scheduler
    record = ServerArgs(model_path="dummy")
    assert record.radix_cache_backend is None
    record._kvzip_probe = 1  # non-field underscore attributes are allowed before resolution
    assert record.__dict__["_kvzip_probe"] == 1


# --------------------------------------------------------------------------- radix-cache registry


def test_registry_functions():
    from sglang.srt.mem_cache import registry

    assert params_of(registry.register_radix_cache_backend) == ["name", "factory"]
    assert params_of(registry.get_radix_cache_factory) == ["name"]
    assert callable(registry.registered_radix_cache_backends)
    assert params_of(registry.default_radix_cache_factory) == ["ctx"]
    sig = inspect.signature(registry.create_unified_radix_cache)
    assert list(sig.parameters) == ["ctx", "cache_class"]
    assert sig.parameters["cache_class"].kind is inspect.Parameter.KEYWORD_ONLY
    # the class is only called with params: a functools.partial carrying the settings works
    assert "(cache_class or UnifiedRadixCache)(params)" in src(registry.create_unified_radix_cache)
    create = src(registry.create_tree_cache)
    assert "get_memory().radix_cache_backend" in create
    assert "factory = get_radix_cache_factory(name)" in create
    assert '"Tree cache initialized: source=%s impl=%s' in create
    with pytest.raises(ValueError):
        registry.register_radix_cache_backend(" ", lambda ctx: None)


def test_tree_cache_build_context_fields():
    from sglang.srt.mem_cache import kv_cache_builder
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    builder = src(kv_cache_builder.build_kv_cache)
    assert "TreeCacheBuildContext(" in builder and "tree_cache = create_tree_cache(tree_context)" in builder

    names = [f.name for f in dataclasses.fields(TreeCacheBuildContext)]
    assert names == ["server_args", "params", "is_hybrid_swa", "is_hybrid_ssm", "enable_hierarchical_cache",
                     "disable_radix_cache", "tp_worker", "model_config", "tp_size", "tp_rank", "tp_group",
                     "full_tokens_per_layer", "is_dsa"]


def test_cache_init_params_fields():
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    fields = {f.name: f for f in dataclasses.fields(CacheInitParams)}
    for name in ("disable", "req_to_token_pool", "token_to_kv_pool_allocator", "page_size", "enable_metrics",
                 "tree_components", "component_registry_override", "tree_core_backend"):
        assert name in fields, name
    assert fields["tree_core_backend"].kw_only


# --------------------------------------------------------------------------- the unified radix tree


def test_unified_radix_cache_methods():
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    assert issubclass(UnifiedRadixCache, BasePrefixCache)
    assert params_of(UnifiedRadixCache.__init__) == ["self", "params"]
    for name, args in {
        "match_prefix": ["self", "params"], "insert": ["self", "params"], "evict": ["self", "params"],
        "lock": ["self", "node_id"], "unlock": ["self", "lock"], "checkpoint": ["self", "req", "up_to", "kwargs"],
        "flush_pending_backups": ["self"], "prefix_device_indices": ["self", "req"],
        "path_device_indices": ["self", "node"], "evictable_size": ["self"],
        "inc_lock_ref": ["self", "node_id", "skip_lock_components"], "dec_lock_ref": ["self", "node_id"],
    }.items():
        got = params_of(getattr(UnifiedRadixCache, name))
        assert got[: len(args)] == args, (name, got)
    assert "self.cache_controller.start_writing()" in src(UnifiedRadixCache.flush_pending_backups)
    assert "collect_full_device_indices(req.last_node, root)" in src(UnifiedRadixCache.prefix_device_indices)
    assert "self.__class__.__name__" in src(BasePrefixCache.init_metrics_collector)


def test_tree_core_selection_and_nodes():
    from sglang.srt.mem_cache.unified_cache import tree_core_registry as reg
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentData
    from sglang.srt.mem_cache.unified_cache.components.full import FullComponent
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore, UnifiedTreeNode

    assert {"python", "rust"} <= set(reg.registered_tree_core_backends())
    assert "params.tree_core_backend" in src(reg.select_tree_core_backend)
    assert {f.name for f in dataclasses.fields(ComponentData)} >= {"value", "lock_ref", "host_value"}
    node_src = src(UnifiedTreeNode.__init__)
    for attr in ("self.children", "self.parent", "self.key", "self.component_data", "self.hit_count", "self.id"):
        assert attr in node_src, attr
    for name in ("node_by_id", "collect_full_device_indices", "_split_node", "inc_lock_ref", "dec_lock_ref",
                 "match_prefix", "begin_insert", "_inc_hit_count_and_check"):
        assert hasattr(UnifiedTreeCore, name), name
    assert "self.component_evictable_size_" in src(UnifiedTreeCore.reset)
    assert "child_cd.value[split_len:]" in src(FullComponent.redistribute_on_node_split)


@pytest.fixture()
def pools():
    return harness.cpu_pools(torch.bfloat16, max_context_len=32)


def test_kv_pool_layout(pools):
    kv, alloc, req_to_token = pools
    # per-layer [size + page_size, H_kv, D] rows; row 0 is the dummy slot, never allocated
    assert kv.get_key_buffer(0).shape == (65, 2, 8) and kv.get_value_buffer(1).shape == (65, 2, 8)
    assert len(kv.k_buffer) == len(kv.v_buffer) == 2
    assert kv._get_key_buffer(0).data_ptr() == kv.k_buffer[0].data_ptr()
    assert req_to_token.req_to_token.shape == (5, 32) and req_to_token.req_to_token.dtype == torch.int32
    from sglang.srt.mem_cache.memory_pool import KVCache, MHATokenToKVPool

    assert params_of(MHATokenToKVPool.move_kv_cache) == ["self", "tgt_loc", "src_loc"]
    assert params_of(KVCache.set_kv_buffer)[:2] == ["self", "layer"]
    assert alloc.get_kvcache() is kv


def test_allocator_alloc_free(pools):
    _, alloc, _ = pools
    free0 = alloc.available_size()
    slots = alloc.alloc(10)
    assert slots.dtype == torch.int64 and len(slots) == 10 and 0 not in slots.tolist()
    assert alloc.available_size() == free0 - 10
    assert alloc.alloc(10_000) is None
    alloc.free(slots)
    assert alloc.available_size() == free0


def _cache(pools, core: str):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    kv, alloc, req_to_token = pools
    params = CacheInitParams(disable=False, req_to_token_pool=req_to_token, token_to_kv_pool_allocator=alloc,
                             page_size=1, tree_components=(ComponentType.FULL,), tree_core_backend=core)
    return UnifiedRadixCache(params)


@pytest.mark.parametrize("core", ["python", "rust"])
def test_insert_match_split_evict(pools, core):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    _, alloc, _ = pools
    cache = _cache(pools, core)
    assert type(cache.tree_core).__name__ == {"python": "UnifiedTreeCore", "rust": "RustUnifiedTreeCore"}[core]
    free0 = alloc.available_size()
    slots = alloc.alloc(10)
    result = cache.insert(InsertParams(key=RadixKey(array("q", range(100, 110))), value=slots))
    assert result.prefix_len == 0 and cache.evictable_size() == 10
    # a partial match splits the node; the hit's values are the first slots, in order
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [*range(100, 106), 1, 2]))))
    assert match.device_prefix_len == 6
    assert cache.path_device_indices(match.last_device_node).tolist() == slots[:6].tolist()
    # locking protects the path from eviction
    lock = cache.lock(match.last_device_node)
    assert cache.evict(EvictParams(num_tokens=10)).num_tokens_evicted == 4
    cache.unlock(lock)
    assert cache.evict(EvictParams(num_tokens=10)).num_tokens_evicted == 6
    assert alloc.available_size() == free0 and cache.evictable_size() == 0


def test_python_core_value_swap(pools):
    """The step-2 compaction primitive on the Python TreeCore: an unlocked node's FULL value is the
    authoritative slot list (matching and eviction read it), so a node can be moved to fresh slots."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    from kvzip_plugin.compaction import apply_compaction

    kv, alloc, _ = pools
    cache = _cache(pools, "python")
    free0 = alloc.available_size()
    key = RadixKey(array("q", range(200, 208)))
    old = alloc.alloc(8)
    for layer in range(2):
        kv.k_buffer[layer][old] = torch.randn(8, 2, 8).to(kv.k_buffer[layer].dtype)
    cache.insert(InsertParams(key=key, value=old))
    match = cache.match_prefix(MatchPrefixParams(key=key))
    node = cache.tree_core.node_by_id(match.last_device_node)
    data = node.component_data[ComponentType.FULL]
    assert data.lock_ref == 0 and data.value.tolist() == old.tolist() and len(node.key) == 8
    new = alloc.alloc(8)
    before = kv.k_buffer[1][old].clone()
    for layer in range(2):  # head structure: each head its own source slots (here: the identity)
        apply_compaction(kv.k_buffer[layer], old.expand(2, 8), new)
    data.value = new.clone()
    alloc.free(old)
    assert torch.equal(kv.k_buffer[1][new], before)
    again = cache.match_prefix(MatchPrefixParams(key=key))
    assert cache.path_device_indices(again.last_device_node).tolist() == new.tolist()
    assert cache.evict(EvictParams(num_tokens=8)).num_tokens_evicted == 8
    assert alloc.available_size() == free0


# --------------------------------------------------------------------------- scheduler, requests, batches


def test_scheduler_per_batch_hook_and_queue():
    from sglang.srt.managers.scheduler import Scheduler

    assert "self.tree_cache.flush_pending_backups()" in src(Scheduler.process_batch_result)
    loop = src(Scheduler.event_loop_normal)
    assert "self.process_batch_result(batch, result)" in loop and "self.on_idle()" in loop
    assert "self.process_batch_result(" in src(Scheduler.event_loop_overlap)
    assert params_of(Scheduler._add_request_to_queue)[:2] == ["self", "req"]
    assert "self.waiting_queue.append(req)" in src(Scheduler._add_request_to_queue)


def test_request_cursor_and_insert_opt_out():
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.mem_cache import common

    assert "self.extend_end - self.prefix_len" in src(Req.extend_len.fget)
    assert "self.skip_radix_cache_insert" in src(Req.__init__)
    assert "req.prefix_len = match_result.device_prefix_len" in src(common.match_kv_cache)
    assert "if not req.skip_radix_cache_insert:" in src(common.checkpoint_kv_cache)
    assert "checkpoint and not req.skip_radix_cache_insert" in src(common.release_kv_cache)
    extend = src(ScheduleBatch.prepare_for_extend)
    for line in ("input_ids = [r.get_fill_ids()[r.prefix_len :] for r in reqs]",
                 "seq_lens = [r.extend_end for r in reqs]", "prefix_lens = [r.prefix_len for r in reqs]",
                 "extend_lens = [r.extend_len for r in reqs]", "alloc_for_extend("):
        assert line in extend, line
    assert "alloc_for_decode(" in src(ScheduleBatch.prepare_for_decode)


def test_allocation_writes_prefix_then_new_slots():
    from sglang.srt.mem_cache import allocation

    body = src(allocation.write_cache_indices)
    assert "(req_idx, slice(0, prefix_len))" in body and "(req_idx, slice(prefix_len, seq_len))" in body
    assert "batch.tree_cache.prefix_device_indices(req)" in src(allocation._prefix_kv_indices)
    assert "write_cache_indices(" in src(allocation.alloc_for_extend)


def test_forward_batch_positions():
    from sglang.srt.managers.tp_worker import TpModelWorker
    from sglang.srt.model_executor import forward_batch_info as fbi

    assert isinstance(fbi.ForwardBatch.__dict__["init_new"], classmethod)
    assert params_of(fbi.ForwardBatch.__dict__["init_new"].__func__)[:3] == ["cls", "batch", "model_runner"]
    body = src(fbi.ForwardBatch.init_new)
    for line in ("seq_lens=batch.seq_lens", "out_cache_loc=batch.out_cache_loc",
                 "ret.positions = clamp_position(batch.seq_lens)",
                 "positions, ret.extend_start_loc = compute_position(", "extend_prefix_lens = batch.prefix_lens"):
        assert line in body, line
    positions, start = fbi.compute_position_torch(torch.tensor([3, 0]), torch.tensor([2, 3]))
    assert positions.tolist() == [3, 4, 0, 1, 2] and start.tolist() == [0, 2]
    assert "ForwardBatch.init_new(" in src(TpModelWorker.forward_batch_generation)


def test_attention_reads_kv_through_req_to_token():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention

    assert params_of(TorchNativeAttnBackend.forward_extend)[:6] == ["self", "q", "k", "v", "layer", "forward_batch"]
    assert params_of(TorchNativeAttnBackend.forward_decode)[:6] == ["self", "q", "k", "v", "layer", "forward_batch"]
    extend = src(TorchNativeAttnBackend.forward_extend)
    assert "self.token_to_kv_pool.set_kv_buffer(" in extend and "forward_batch.extend_prefix_lens" in extend
    sdpa_extend = src(TorchNativeAttnBackend._run_sdpa_forward_extend)
    assert "req_to_token[req_pool_idx, start_kv:end_kv]" in sdpa_extend
    # native_backend.py: what its AROUND hook takes, and the whole-sequence padding it avoids for scoring rows
    assert params_of(TorchNativeAttnBackend._run_sdpa_forward_extend) == [
        "self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens",
        "extend_prefix_lens", "extend_seq_lens", "encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn",
        "sliding_window_size"]
    assert "per_req_query_redudant[:, prefill_seq_len_q:, :] = per_req_query" in sdpa_extend
    assert "self._run_sdpa_forward_extend(" in extend
    # native_backend.py's decode hook: its arguments, and the KV write coming before the attention it may skip
    assert params_of(TorchNativeAttnBackend._run_sdpa_forward_decode) == [
        "self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens",
        "encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn", "sliding_window_size"]
    decode = src(TorchNativeAttnBackend.forward_decode)
    assert decode.index("self.token_to_kv_pool.set_kv_buffer(") < decode.index("self._run_sdpa_forward_decode(")
    assert extend.index("self.token_to_kv_pool.set_kv_buffer(") < extend.index("self._run_sdpa_forward_extend(")
    assert "for seq_idx in range(seq_lens.shape[0]):" in src(TorchNativeAttnBackend._run_sdpa_forward_decode)
    assert params_of(RadixAttention.forward)[:5] == ["self", "q", "k", "v", "forward_batch"]


# --------------------------------------------------------------------------- metrics


def test_metrics_plumbing():
    from sglang.srt.entrypoints import engine
    from sglang.srt.observability.metrics_collector import RadixCacheMetricsCollector, radix_cache_metric_labels
    from sglang.srt.utils import common

    assert callable(common.set_prometheus_multiproc_dir) and callable(common.add_prometheus_middleware)
    assert "MultiProcessCollector" in src(common.add_prometheus_middleware)
    assert "set_prometheus_multiproc_dir()" in inspect.getsource(engine)
    assert params_of(radix_cache_metric_labels) == ["cache_type", "parallel", "dp_attention_enabled"]
    assert RadixCacheMetricsCollector is not None


def test_tokenizer_manager_ignores_unknown_rids():
    """Outputs of scheduler-internal requests (step 2's scoring requests) are dropped with a warning."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    body = inspect.getsource(TokenizerManager)
    assert "Received output for {rid=} but the state was deleted in TokenizerManager." in body


# --------------------------------------------------------------------------- step 2: what KVzipRadixCache relies on


def test_hook_targets_of_the_compression_path():
    """integrations/sglang/hooks.py: every target resolves, with the signature the hooks unpack."""
    import pkgutil

    from kvzip_plugin.integrations.sglang import hooks

    for target in hooks.TARGETS.values():
        obj_path, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(obj_path), attr), target
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    assert params_of(Scheduler.on_idle) == ["self"]
    assert params_of(Scheduler.send_abort_output)[:3] == ["self", "abort_req", "req"]
    assert params_of(SchedulerOutputStreamer.stream_output)[:4] == ["self", "reqs", "return_logprob", "skip_req"]
    for name in ("is_fully_idle", "init_req_max_new_tokens", "_add_request_to_queue"):
        assert callable(getattr(Scheduler, name)), name
    init = inspect.getsource(Scheduler)
    assert "self.max_req_input_len" in init and "self.waiting_queue" in init and "self.chunked_req" in init


def test_sleep_on_idle_is_one_call_the_hook_can_skip():
    """`--sleep-on-idle` (the test harness's servers use it): the idle scheduler sleeps only in
    `maybe_sleep_on_idle` (a zmq poll of up to 1 s), called at the end of `on_idle`, before the plugin's
    AFTER hook pumps the jobs; the plugin's AROUND hook skips that sleep while a job is queued or running, or
    the last batch's metrics and state are not published yet."""
    from types import SimpleNamespace

    from kvzip_plugin.integrations.sglang import hooks
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.idle_sleeper import IdleSleeper

    assert params_of(Scheduler.maybe_sleep_on_idle) == ["self"]
    assert "self.idle_sleeper.maybe_sleep()" in inspect.getsource(Scheduler.maybe_sleep_on_idle)
    assert "self.poller.poll(1000)" in inspect.getsource(IdleSleeper.maybe_sleep)
    on_idle = inspect.getsource(Scheduler.on_idle)
    assert "self.maybe_sleep_on_idle()" in on_idle
    from sglang.srt.arg_groups.fields.device import Device

    assert "sleep_on_idle" in Device.__struct_fields__  # the flag's home in 0.5.23
    assert "get_device().sleep_on_idle" in inspect.getsource(Scheduler.init_idle_sleeper)

    slept = []
    original = lambda sched: slept.append(sched)  # noqa: E731

    class _Jobs:
        def __init__(self, pending: bool) -> None:
            self._pending = pending

        def pending(self) -> bool:
            return self._pending

    sched = SimpleNamespace(tree_cache=None)
    hooks._around_sleep_on_idle(original, sched)  # no KVzip cache: SGLang's own sleep
    assert slept == [sched]
    from kvzip_plugin.integrations.sglang.radix_cache import KVzipRadixCache

    for pending, dirty, sleeps in ((True, False, 1), (False, True, 1), (False, False, 2)):
        cache = KVzipRadixCache.__new__(KVzipRadixCache)
        cache.kvzip_disabled = False
        cache._dirty = dirty
        cache.jobs = _Jobs(pending)
        hooks._around_sleep_on_idle(original, SimpleNamespace(tree_cache=cache))
        assert len(slept) == sleeps


def test_request_gauges_count_through_queue_count_and_the_hook_drops_scoring_requests():
    """`sglang:num_running_reqs` / `sglang:num_queue_reqs` are `QueueCount.from_reqs(...)` of the running
    batch and the waiting queue; the plugin's AROUND hook (hooks.py) leaves the scoring requests out."""
    from types import SimpleNamespace

    from kvzip_plugin.integrations.sglang import hooks
    from sglang.srt.managers.scheduler_components import metrics_reporter
    from sglang.srt.observability.metrics_collector import QueueCount

    assert isinstance(inspect.getattr_static(QueueCount, "from_reqs"), classmethod)
    assert params_of(QueueCount.from_reqs.__func__)[:3] == ["cls", "reqs", "enable_priority_scheduling"]
    body = inspect.getsource(metrics_reporter)
    assert "self.stats.num_queue_reqs = QueueCount.from_reqs(" in body
    assert "self.stats.num_running_reqs = QueueCount.from_reqs(" in body
    reqs = [SimpleNamespace(rid="kvzip-score-3-0", priority=None), SimpleNamespace(rid="client", priority=None)]
    count = hooks._around_queue_count(QueueCount.from_reqs.__func__, QueueCount, reqs, False)
    assert count.total == 1


def test_outputs_report_origin_input_ids_and_cached_tokens():
    """The output hook shows logical `origin_input_ids` / `cached_tokens` of requests on compacted prefixes
    while SGLang builds their output; detokenization reads `origin_input_ids_unpadded`, which keeps the
    logical ids (the adoption assigns a new `origin_input_ids` array)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler_components import output_streamer

    body = inspect.getsource(output_streamer)
    assert "prompt_tokens.append(len(req.origin_input_ids))" in body
    assert "cached_tokens.append(req.cached_tokens)" in body and '"device": req.cached_tokens_device' in body
    init = src(Req.__init__)
    assert " ".join(init.split()).count(
        "origin_input_ids_unpadded if origin_input_ids_unpadded else self.origin_input_ids") == 1
    assert "self.read_offset = len(self.origin_input_ids_unpadded)" in src(Req.init_incremental_detokenize)
    assert "full_untruncated_fill_ids = self.origin_input_ids + self.output_ids" in src(Req.refresh_fill_ids)


def test_request_prefix_lifecycle():
    """An adopted request: prefix_len = P from match_prefix, cache_protected_len = prefix_len, admission locks
    `req.last_node` (the compacted entry's handle) through `tree_cache.lock`, the prefix slots come from
    `prefix_device_indices`, release frees only `[cache_protected_len, owned)` and unlocks."""
    from sglang.srt.managers import schedule_policy
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.mem_cache import common

    assert "self.kv.cache_protected_len = self.prefix_len" in src(Req.init_next_round_input)
    adder = schedule_policy.PrefillAdder
    assert "req.lock = self.tree_cache.lock(req.last_node)" in src(adder._commit_prefill_admission)
    assert "lock = self.tree_cache.lock(last_node)" in src(schedule_policy.PrefillAdder._lock_node)
    release = src(common.release_kv_cache)
    assert "tree_cache.free_kv_row(req.kv, [(req.kv.cache_protected_len, owned_kv_len)])" in release
    assert "tree_cache.unlock(req.lock)" in release and "tree_cache.on_release(req" in release
    extend = src(ScheduleBatch.prepare_for_extend)
    assert "new_cached = pre_len - req.already_computed" in extend and "req.cached_tokens += new_cached" in extend
    assert "logprob_start_len = len(req.origin_input_ids)" in extend
    assert "self.logprob_start_len" in src(Req._compute_max_prefix_len)
    abort = src(__import__("sglang.srt.managers.scheduler", fromlist=["Scheduler"]).Scheduler.abort_request)
    assert "req = self.waiting_queue.pop(i)" in abort and "self.send_abort_output(" in abort


def test_runners_copy_the_forward_batch():
    """The eager runner runs the model on `dataclasses.replace(...)` of the ForwardBatch init_new returned
    (positions copied into static buffers): the capture plan is matched by `extend_seq_lens_cpu`, a
    non-buffer field the copy carries by reference; positions must be final when init_new returns."""
    from sglang.srt.model_executor import cuda_graph_buffer_registry as reg
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.runner import eager_runner

    assert "dataclasses.replace(forward_batch_template, **replace_kwargs)" in src(
        reg.CudaGraphBufferRegistry.extract_buffer)
    execute_extend = src(eager_runner.EagerRunner._execute_extend)
    assert "forward_batch = self.load_batch(forward_batch, pp_proxy_tensors)" in execute_extend
    names = {f.name for f in dataclasses.fields(ForwardBatch)}
    assert {"extend_seq_lens_cpu", "extend_prefix_lens_cpu", "positions", "forward_mode"} <= names


def test_radix_attention_attributes_and_pool_buffers(pools):
    from sglang.srt.layers.radix_attention import RadixAttention

    layer = RadixAttention(num_heads=4, head_dim=8, scaling=0.35, num_kv_heads=2, layer_id=3)
    for name in ("tp_q_head_num", "tp_k_head_num", "qk_head_dim", "v_head_dim", "scaling", "layer_id",
                 "sliding_window_size", "logit_cap", "is_cross_attention"):
        assert hasattr(layer, name), name
    kv, alloc, _ = pools
    assert kv._get_value_buffer(1).data_ptr() == kv.v_buffer[1].data_ptr()
    assert kv.use_hnd is False  # NHD by default (SGLANG_USE_HND_KVCACHE unset); HND is refused (fail closed)
    free = alloc.get_all_free_pages()
    assert free is not None and len(free) == alloc.available_size()


def test_unified_radix_cache_overridden_methods():
    from sglang.srt.mem_cache.base_prefix_cache import DecLockRefParams, MatchResult, TreeLock
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    assert params_of(UnifiedRadixCache._evict) == ["self", "params", "available_size_targets",
                                                    "allocation_reclaim_satisfied"]
    for name in ("evictable_size", "protected_size", "full_evictable_size", "full_protected_size", "reset",
                 "is_root", "dfs_weight_order", "init_metrics_collector", "on_release"):
        assert callable(getattr(UnifiedRadixCache, name)), name
    assert [f.name for f in dataclasses.fields(TreeLock)][:2] == ["node", "receipt"]
    DecLockRefParams()
    assert {"device_prefix_len", "last_device_node", "last_host_node", "best_match_node", "full_kv_hit_length",
            "cache_actions"} <= set(MatchResult._fields)
    assert "return self.tree_core.empty_match_result" in src(UnifiedRadixCache._match_tree)


def test_prefill_cuda_graph_settings_read_by_the_fail_closed_check():
    """`runtime.prefill_graphs_on` reads these: prefill batches replay from breakable CUDA graphs by
    default on CUDA (only `_eager_attention` runs on replay), and the flags that turn that off."""
    from sglang.srt.model_executor import cuda_graph_config as cgc
    from sglang.srt.server_args import ServerArgs

    assert cgc.Backend.DISABLED == "disabled" and cgc.Backend.BREAKABLE == "breakable"
    assert "Backend.BREAKABLE if is_cuda() else Backend.DISABLED" in inspect.getsource(cgc.default_prefill_backend)
    for name in ("disable_cuda_graph", "disable_prefill_cuda_graph", "cuda_graph_backend_prefill",
                 "cuda_graph_config"):  # ServerArgs is a msgspec Struct: its fields are class attributes
        assert name in ServerArgs.__struct_fields__, name
    assert "prefill" in {f.name for f in dataclasses.fields(cgc.CudaGraphConfig)}


def test_graph_replays_are_decided_by_the_runners_checks_the_plugin_wraps():
    """`graphs.py` declines replays through the runners' `can_run_graph`: SGLang's model runner replays a
    decode batch only when `decode_cuda_graph_runner.can_run_graph(forward_batch)` says so, and a prefill
    batch only when `prefill_cuda_graph_runner.can_run_graph(forward_batch)` does (else the eager runner);
    the batch it asks about is the one `ForwardBatch.init_new` built (where `on_forward_batch` marks it)."""
    from kvzip_plugin.integrations.sglang import graphs
    from sglang.srt.managers.tp_worker import TpModelWorker
    from sglang.srt.model_executor.model_runner import ModelRunner

    raw = inspect.getsource(ModelRunner._forward_raw)
    assert "self.decode_cuda_graph_runner.can_run_graph(forward_batch)" in raw
    assert "self.prefill_cuda_graph_runner.can_run_graph(forward_batch)" in raw
    assert "ret = self.eager_runner.execute(" in raw
    gen = inspect.getsource(TpModelWorker.forward_batch_generation)
    assert "forward_batch = ForwardBatch.init_new(" in gen and "self.model_runner.forward(" in gen
    for target in graphs.RUNNERS:  # importable and a function on its class
        module, cls, meth = target.rsplit(".", 2)
        assert callable(getattr(getattr(importlib.import_module(module), cls), meth)), target


def test_scoring_slicing_hooks():
    """`slicing.py` relies on these (SGLang 0.5.23): the round and its prefill deferral, the adder's chunk
    budget and its one tracked chunked request, and the chunk limit of the chunked request."""
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder, SchedulePolicy
    from sglang.srt.managers.scheduler import Scheduler

    assert list(inspect.signature(Scheduler.get_next_batch_to_run).parameters) == ["self", "running_batch",
                                                                                   "last_batch"]
    assert list(inspect.signature(Scheduler._should_defer_prefill).parameters) == ["self", "running_batch"]
    nxt = inspect.getsource(Scheduler.get_next_batch_to_run)
    assert "elif self._should_defer_prefill(running_batch):" in nxt
    assert "prefill_plan = self.get_new_batch_prefill(running_batch)" in nxt
    raw = inspect.getsource(Scheduler._get_new_batch_prefill_raw)
    assert "chunked_prefill_size = self.chunked_prefill_size" in raw
    assert "adder.chunked_req_limit = self.policy.shortest_prefill_chunk_limit(" in raw
    assert "self.chunked_req = adder.add_chunked_req(self.chunked_req)" in raw
    assert "res = adder.add_one_req(" in raw
    assert "assert self.chunked_req is None" in raw  # one chunked request: why a client waits beside a slice
    assert list(inspect.signature(PrefillAdder.add_one_req).parameters) == ["self", "req", "has_chunked_req",
                                                                           "truncation_align_size"]
    assert list(inspect.signature(SchedulePolicy.shortest_prefill_chunk_limit).parameters) == [
        "self", "chunked_req", "waiting_queue", "budget", "page_size"]
    add = inspect.getsource(PrefillAdder.add_chunked_req)
    assert "_rem_tokens = min(_rem_tokens, self.chunked_req_limit)" in add
    # parking a started scoring request beside a client prefill (`Slicing._park`): add_chunked_req(req) may
    # return `req` having added nothing (SGLang's own early return), the scheduler then keeps it as its chunked
    # request, raises its chunks-in-flight count for the batch formed (put back by `_park`), and does not
    # stash a chunk that computed nothing
    assert list(inspect.signature(PrefillAdder.add_chunked_req).parameters) == ["self", "req"]
    assert add.count("return req") >= 2 and "if _rem_tokens is None:" in add
    assert "self.chunked_req.inflight_middle_chunks += 1" in raw
    assert "if self.chunked_req.extend_end > self.chunked_req.prefix_len:" in nxt
    init = inspect.getsource(PrefillAdder.__init__)
    assert "self.rem_chunk_tokens = rem_chunk_tokens" in init and "self.tree_cache = tree_cache" in init
    assert "self.new_chunked_req" in inspect.getsource(PrefillAdder)
    assert callable(PrefillAdder.ceil_paged_tokens) and AddReqResult.OTHER
    assert "self.tree_cache = tree_cache" in inspect.getsource(SchedulePolicy.__init__)
