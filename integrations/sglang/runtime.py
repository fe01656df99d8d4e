# SPDX-License-Identifier: Apache-2.0
"""Fail-closed checks of KVzip inside SGLang: why compression cannot run in this server (speculative
decoding, pipeline parallelism, graph replays the plugin cannot decline (`graphs.py` declines those of
SGLang's CUDA and CPU graph runners), a KV pool other than the plain MHA token pool, sliding-window or
soft-capped attention, ...). Checked once,
when `KVzipRadixCache` is built with the pools and the model; a reason turns compression off with one log
line and one fallback count (`radix_cache.KVzipRadixCache._disable`)."""

from __future__ import annotations

from typing import Any


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
        if int(getattr(server_args, "tp_size", 1) or 1) > 1:
            # every TP rank runs its own copy of the scheduler and must form the same batches (SGLang broadcasts
            # the requests and agrees on failures across ranks); the plugin's scoring gate decides on each
            # rank's own step timings, so two ranks could schedule different batches and hang in a collective
            return "tensor_parallel", ("tensor parallelism is not supported on SGLang yet (each rank's scheduler "
                                       "would time its own scoring slices; use --tp-size 1, or vLLM)")
        if getattr(server_args, "enable_session_radix_cache", False) or getattr(
                server_args, "enable_streaming_session", False):
            return "sessions", "session radix caches / streaming sessions are not supported"
        if getattr(server_args, "enable_unified_cache_external_linker", False):
            return "external_linker", "the unified-cache external linker is not supported"
        if getattr(server_args, "enable_lmcache", False) or getattr(server_args, "enable_flexkv", False):
            return "external_kv_store", "LMCache / FlexKV are not supported"
        if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
            return "disaggregation", "prefill/decode disaggregation is not supported"
        device = getattr(server_args, "device", None)
        graphs_on = not getattr(server_args, "disable_cuda_graph", False) or prefill_graphs_on(server_args)
        if device not in (None, "cpu", "cuda") and graphs_on:
            # graphs.py declines the replays of SGLang's CUDA and CPU graph runners only
            return "device_graphs", (f"graph replays on device {device!r} would skip the plugin's score capture and "
                                     "attention: use --disable-cuda-graph --disable-prefill-cuda-graph")
        if getattr(server_args, "enable_dp_attention", False) and graphs_on:
            # a declined replay on one DP rank beside replays on the others is not a tested combination
            return "dp_attention_graphs", ("data-parallel attention with CUDA graphs is not supported: use "
                                           "--disable-cuda-graph --disable-prefill-cuda-graph")
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
    trigger = getattr(cache, "kvzip_trigger", None)
    context_len = getattr(model_config, "context_len", None)
    if trigger is not None and context_len:
        why = trigger.unreachable(int(context_len))
        if why is not None:
            return "min_prefix_tokens_above_context_length", why
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
