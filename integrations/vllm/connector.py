# SPDX-License-Identifier: Apache-2.0
"""`KVzipConnector`: KVzip compression of shared prefixes as a vLLM V1 KV connector.

vLLM builds one instance per process and role (`KVConnectorFactory.create_connector` passes
`(vllm_config, role, kv_cache_config)`): `SCHEDULER` in EngineCore (`scheduler.py`: detection,
jobs, block allocation, publication, adoption) and `WORKER` in every worker (`worker.py`: score
capture, compaction copy; `runner.py`: physical slots and `seq_lens`). The connector is the
transport between them: `build_connector_meta` -> worker, `build_connector_worker_meta` ->
`update_connector_output`, and stats to the frontend's `/metrics` (`stats.py`).

Selected by `--kv-compression kvzip` (see `kvzip_plugin.integrations.vllm`) or
`--kv-transfer-config '{"kv_connector": "KVzipConnector", "kv_connector_module_path":
"kvzip_plugin.integrations.vllm.connector", "kv_role": "kv_both"}'`.

Fail closed: on a model or feature KVzip does not support here (several KV-cache groups such as
sliding-window or Mamba layers, MLA, speculative decoding, the V2 model runner, a KV layout the
worker cannot address), the connector logs one warning, counts the reason in
`vllm:kvzip_fallbacks_total{reason}` and serves every prefix uncompressed.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionMetadata
from vllm.v1.core.sched.output import SchedulerOutput

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

from kvzip_plugin.integrations.vllm import EXTRA_CONFIG_KEY, KVCompressionSettings, runner, stats
from kvzip_plugin.integrations.vllm.protocol import KVzipConnectorMetadata, KVzipWorkerMetadata
from kvzip_plugin.integrations.vllm.scheduler import SchedulerState, is_scoring_request
from kvzip_plugin.integrations.vllm.slicing import scoring_step
from kvzip_plugin.integrations.vllm.worker import WorkerState

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.detection import TriggerPolicy
from kvzip_plugin.metrics import KVzipStats
from kvzip_plugin.settings import DEFAULT_STRUCTURE

# under the "vllm" logger so the lines get vLLM's handler (INFO shows by default)
logger = init_logger("vllm.kvzip_plugin.connector")

_SCHEDULE_WRAPPED = "__kvzip_schedule__"
WORKER_ONLY_REASONS = ("kv_layout", "attention_layer")
"""Fallback reasons only a worker can see (its KV buffers, its layers): the worker half reports them."""


def unsupported_reason(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None,
                       structure: str = "head") -> str | None:
    """Why KVzip cannot run on this engine, or None. Short snake_case reasons (metric labels).

    `pair` and `layer_budget` prefixes are served by the plugin's attention, which runs in the
    worker's wrapper of each attention layer's `impl.forward`: a CUDA graph that captured the
    attention (`cudagraph_mode` FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE) would replay vLLM's kernel
    for those requests without it, so they need PIECEWISE graphs (attention runs eagerly between the
    graph pieces) or none (`full_cuda_graphs`)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if vllm_config.speculative_config is not None:
        return "speculative_decoding"
    if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
        return "mla"
    if not vllm_config.cache_config.enable_prefix_caching:
        return "prefix_caching_disabled"
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return "pipeline_parallel"
    if vllm_config.use_v2_model_runner:
        return "model_runner_v2"
    if structure != "head":
        mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
        if mode is not None and mode.has_full_cudagraphs():
            return "full_cuda_graphs"
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            return "hybrid_kv_cache"
        spec = groups[0].kv_cache_spec
        if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None):
            return f"kv_cache_spec_{type(spec).__name__}"
    return None


class KVzipConnector(KVConnectorBase_V1):
    """KVzip compression of shared prefixes (scheduler and worker halves)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.get_from_extra_config(EXTRA_CONFIG_KEY, None) or {}
        self.settings: KVCompressionSettings = KVCompressionSettings.from_dict(extra)
        config = KVzipConfig(structure=self.settings.structure or DEFAULT_STRUCTURE,
                             scorer=self.settings.scorer or "kvzip", head_scores_path=self.settings.head_scores,
                             **({"ratio": self.settings.ratio} if self.settings.ratio else {}))
        policy = TriggerPolicy(**{k: v for k, v in (("min_prefix_tokens", self.settings.min_prefix_tokens),
                                                    ("min_hits", self.settings.min_hits)) if v is not None})
        self.disabled = unsupported_reason(vllm_config, kv_cache_config, config.structure)
        unreachable = policy.unreachable(vllm_config.model_config.max_model_len) if vllm_config.model_config else None
        if self.disabled is None and unreachable is not None:
            self.disabled = "min_prefix_tokens_above_context_length"
        self._fallback_reported = False
        self._disabled_sent = False  # worker half: the scheduler was told this worker cannot compact
        self.sched: SchedulerState | None = None
        self.worker: WorkerState | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.sched = SchedulerState(config, policy, vllm_config, self.settings.scoring_budget(),
                                        self.settings.hit_meter())
            self.sched.disabled = self.disabled
            _wrap_schedule()
            _wrap_reset_prefix_cache()
            _wrap_make_stats()
        else:
            self.worker = WorkerState(config.score_query_block, vllm_config.parallel_config.tensor_parallel_size)
            if not self.disabled:
                runner.install(self.worker)
        if not self.disabled:
            logger.info("KVzipConnector (%s): ratio=%s structure=%s, %s", role.name, config.ratio, config.structure,
                        policy)
        elif role == KVConnectorRole.SCHEDULER:  # once per engine (the worker half is built in the same process)
            if self.disabled == "min_prefix_tokens_above_context_length":
                why = unreachable
            elif self.disabled == "full_cuda_graphs":
                why = (f"the {config.structure} structure is served by the plugin's attention, which a full CUDA "
                       "graph would skip; use --compilation-config '{\"cudagraph_mode\": \"PIECEWISE\"}' or "
                       "--kv-compression-structure head")
            else:
                why = "prefixes are served uncompressed"
            logger.warning("kvzip-plugin: KV compression disabled on this engine (%s): %s", self.disabled, why)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Ask vLLM for PIECEWISE CUDA graphs when the structure is served by the plugin's attention.

        `pair` and `layer_budget` prefixes are attended by the worker's wrapper of each attention layer's
        `impl.forward`, which runs eagerly between the pieces of a PIECEWISE graph but is skipped when a
        FULL graph (vLLM's CUDA default FULL_AND_PIECEWISE) replays a decode batch. vLLM calls this in
        `VllmConfig.__post_init__` and lowers a mode with full graphs to PIECEWISE (with a warning), so
        `--kv-compression kvzip` serves those structures on a default GPU server instead of switching
        itself off (`unsupported_reason` "full_cuda_graphs" remains the guard). `head` prefixes are read
        by vLLM's own kernel and keep full graphs."""
        settings = KVCompressionSettings.from_dict((extra_config or {}).get(EXTRA_CONFIG_KEY) or {})
        return (settings.structure or DEFAULT_STRUCTURE) != "head"

    @property
    def requires_kv_delivery(self) -> bool:
        # KVzip hands no KV to another instance (the base says True for kv_both, vllm 0.32 base.py:196)
        return False

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker is None or self.disabled:
            return
        from vllm.config import get_layers_from_vllm_config

        try:
            from vllm.model_executor.layers.attention.attention import Attention
        except ImportError:  # older layout of the attention layer module
            try:
                from vllm.attention.layer import Attention  # type: ignore[no-redef]
            except ImportError:
                self.disabled = "attention_layer"
                logger.warning("kvzip-plugin: vLLM's Attention layer class was not found; KV compression "
                               "disabled on this worker")
                return
        layers = get_layers_from_vllm_config(self._vllm_config, Attention, list(kv_caches))
        self.worker.register(kv_caches, layers, self._vllm_config.cache_config.block_size)
        if self.worker.unsupported:
            self.disabled = "kv_layout"

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, KVzipConnectorMetadata):
            self.worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVzipConnectorMetadata)
        for cmd in meta.compact:
            self.worker.results.append(self.worker.compact(cmd))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.end_step()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.worker is None:
            return None
        if self.disabled:  # tell the scheduler once: it must stop scoring prefixes this worker cannot compact
            if self._disabled_sent:
                return None
            self._disabled_sent = True
            self.worker.results = []
            return KVzipWorkerMetadata(disabled=self.disabled)
        if not self.worker.results:
            return None
        out, self.worker.results = KVzipWorkerMetadata(results=self.worker.results), []
        return out

    # ------------------------------------------------------------------ scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        if self.sched is not None and not self.disabled:
            self.sched.bind(kv_cache_manager)
            if self.sched.disabled:
                self.disabled = self.sched.disabled
                logger.warning("kvzip-plugin: KV compression disabled on this engine (%s); prefixes are served "
                               "uncompressed", self.disabled)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.sched is not None:
            self.sched.observe(request, num_computed_tokens)
        return 0, False  # nothing to load from outside vLLM's own prefix cache

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self.sched is None or self.disabled:
            return KVzipConnectorMetadata()
        return self.sched.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if self.sched is None or not isinstance(meta, KVzipWorkerMetadata) or self.disabled:
            return
        if meta.disabled:  # a worker cannot compact: the whole engine serves uncompressed from now on
            self.disabled = meta.disabled
            self._fallback_reported = True  # the worker counts this fallback (WORKER_ONLY_REASONS)
            self.sched.shut_down(meta.disabled)
            logger.warning("kvzip-plugin: KV compression disabled on this engine (%s, reported by a worker); "
                           "prefixes are served uncompressed", self.disabled)
            return
        self.sched.on_worker_results(meta.results)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.sched is not None and not self.disabled:
            self.sched.request_finished(request, block_ids)
        return False, None

    def has_pending_push_work(self) -> bool:
        # keeps EngineCore stepping until queued scoring and compaction have finished
        return self.sched is not None and not self.disabled and self.sched.has_pending_work()

    def reset_cache(self) -> bool | None:
        if self.sched is not None and not self.disabled:
            self.sched.reset()
        return True

    # ------------------------------------------------------------------ stats (both sides)

    def get_kv_connector_stats(self) -> stats.KVzipConnectorStats | None:
        data = KVzipStats()
        # each engine counts its fallback once: the scheduler half, or the worker half for a reason only
        # the worker can see (its KV layout)
        reporter = self.sched is not None or self.disabled in WORKER_ONLY_REASONS
        if self.disabled and not self._fallback_reported and reporter:
            data.fallbacks[self.disabled] = 1
            self._fallback_reported = True
        if self.sched is not None and not self.disabled:
            data = data.aggregate(self.sched.take_stats())
        if self.worker is not None and not self.disabled:
            data = data.aggregate(self.worker.take_stats())
        if data.is_empty():
            return None
        return stats.KVzipConnectorStats.from_stats(data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> stats.KVzipConnectorStats | None:
        return stats.build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return stats.build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _active_state(scheduler: Any, include_disabled: bool = False) -> SchedulerState | None:
    """The KVzip scheduler state of `scheduler`'s connector, if it is ours (and not disabled)."""
    connector = getattr(scheduler, "connector", None)
    if not isinstance(connector, KVzipConnector) or connector.sched is None:
        return None
    return connector.sched if include_disabled or not connector.disabled else None


def _patch_scheduler(name: str, make: Any) -> None:
    """Replace `Scheduler.<name>` by `make(original)` once per process (vLLM's V1 scheduler class)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = getattr(Scheduler, name)
    if getattr(original, _SCHEDULE_WRAPPED, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _SCHEDULE_WRAPPED, True)
    setattr(Scheduler, name, wrapped)


def _wrap_schedule() -> None:
    """Let the connector add its scoring requests right before each `schedule()`, and run the call under
    this step's scoring decision (held for client prefills, or sliced: `slicing.py`)."""

    def make(original):
        def schedule(self, *args, **kwargs):
            if (state := _active_state(self)) is None:
                return original(self, *args, **kwargs)
            state.before_schedule(self)
            with scoring_step(state.gate, self, bool(self.scheduler_config.enable_chunked_prefill)):
                return original(self, *args, **kwargs)
        return schedule

    _patch_scheduler("schedule", make)


def _wrap_reset_prefix_cache() -> None:
    """Let the connector release what its in-flight jobs hold right before vLLM resets its prefix cache
    (`POST /reset_prefix_cache`, `LLM.reset_prefix_cache()`)."""

    def make(original):
        def reset_prefix_cache(self, reset_running_requests: bool = False, *args, **kwargs):
            if (state := _active_state(self)) is not None:
                state.before_reset(self, reset_running_requests)
            return original(self, reset_running_requests, *args, **kwargs)
        return reset_prefix_cache

    _patch_scheduler("reset_prefix_cache", make)


def _wrap_make_stats() -> None:
    """vLLM's request gauges (`vllm:num_requests_running` / `_waiting`) describe client requests only: the
    connector's scoring requests are taken out of the counts `Scheduler.make_stats` reports (the KV usage
    gauge keeps the blocks they hold: that memory is really in use)."""

    def make(original):
        def make_stats(self, *args, **kwargs):
            stats = original(self, *args, **kwargs)
            if stats is not None and _active_state(self, include_disabled=True) is not None:
                running = sum(is_scoring_request(r.request_id) for r in self.running)
                waiting = sum(is_scoring_request(r.request_id) for r in self.waiting)
                stats.num_running_reqs = max(0, stats.num_running_reqs - running)
                stats.num_waiting_reqs = max(0, stats.num_waiting_reqs - waiting)
            return stats
        return make_stats

    _patch_scheduler("make_stats", make)
