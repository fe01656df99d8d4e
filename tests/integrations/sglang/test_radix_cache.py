# SPDX-License-Identifier: Apache-2.0
"""`KVzipRadixCache` in this process, on SGLang 0.5.23's real pools, allocator and unified radix tree (no
model, no server): fail-closed checks, the accounting of compacted prefixes (SGLang's pool invariant),
their eviction, adoption (physical ids / logical positions) and its undo. The end-to-end behaviour is in
test_e2e_kvzip.py."""

from __future__ import annotations

import logging
from array import array
from types import SimpleNamespace

import pytest

from tests.integrations.sglang import harness

harness.require_sglang()

import torch  # noqa: E402
from kvzip_plugin.integrations.sglang import adoption  # noqa: E402
from kvzip_plugin.integrations.sglang import radix_cache as rc  # noqa: E402
from kvzip_plugin.integrations.sglang.runtime import unsupported_runtime_reason  # noqa: E402
from kvzip_plugin.integrations.sglang.store import CompactedPrefix  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from kvzip_plugin.metrics import KVzipStats  # noqa: E402


@pytest.fixture()
def pools():
    return harness.cpu_pools(torch.float32, max_context_len=64)


def _cache(pools, server_args=None, core: str = "rust", settings=None) -> rc.KVzipRadixCache:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    kv, alloc, req_to_token = pools
    params = CacheInitParams(disable=False, req_to_token_pool=req_to_token, token_to_kv_pool_allocator=alloc,
                             page_size=1, tree_components=(ComponentType.FULL,), tree_core_backend=core)
    return rc.KVzipRadixCache(params, settings=settings, tp_worker=None, server_args=server_args)


def _live(cache: rc.KVzipRadixCache) -> rc.KVzipRadixCache:
    """Turn the model-less cache's compression on (its match/adoption/accounting paths need no model)."""
    cache.kvzip_disabled = None
    return cache


def _entry(cache, tokens: list[int], P: int) -> CompactedPrefix:
    slots = cache.token_to_kv_pool_allocator.alloc(P)
    entry = CompactedPrefix(99, ("k",), (None, None), array("q", tokens), slots, len(tokens), P)
    cache.entries.add(entry)
    return entry


def _req(ids: list[int], rid: str = "r0", return_logprob: bool = False):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", array("q", ids), SamplingParams(max_new_tokens=4), return_logprob=return_logprob)
    req.logprob_start_len = len(ids) if return_logprob else -1
    return req


def _match(cache, req):
    req.refresh_fill_ids()
    key = RadixKey(token_ids=req.full_untruncated_fill_ids, limit=len(req.full_untruncated_fill_ids) - 1)
    return cache.match_prefix(MatchPrefixParams(key=key, req=req))


# --------------------------------------------------------------------------- fail closed


def test_scoring_step_tokens_sets_the_slicing(pools):
    """The flag shared with vLLM: SGLang slices scoring too (slicing.py), default 256, 0 = off."""
    from kvzip_plugin.settings import make_settings

    assert _cache(pools).slicing.gate.budget.step_tokens == 256
    assert _cache(pools, settings=make_settings(scoring_step_tokens=64)).slicing.gate.budget.step_tokens == 64
    assert _cache(pools, settings=make_settings(scoring_step_tokens=0)).slicing is None


def test_slicing_is_on_for_every_backend(pools):
    """SGLang's CPU backend (torch_native) is sliced like the others: `native_backend.py` computes a scoring
    slice over its new rows only (it used to cost a whole prefill there, and scoring ran unsliced)."""
    from types import SimpleNamespace

    from kvzip_plugin.settings import make_settings

    for backend in ("torch_native", "flashinfer"):
        args = SimpleNamespace(attention_backend=backend, prefill_attention_backend=None)
        assert _cache(pools, server_args=args).slicing.gate.budget.step_tokens == 256
    native = SimpleNamespace(attention_backend="torch_native", prefill_attention_backend=None)
    assert _cache(pools, server_args=native, settings=make_settings(scoring_step_tokens=64)).slicing.gate.budget \
        .step_tokens == 64
    assert _cache(pools, server_args=native, settings=make_settings(scoring_step_tokens=0)).slicing is None


def test_without_a_model_worker_the_cache_is_sglangs_default(pools, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang.kvzip_plugin"):
        cache = _cache(pools)
    assert cache.kvzip_disabled == "no_model" and rc.active_cache() is not cache
    lines = [r.getMessage() for r in caplog.records if "KV compression disabled" in r.getMessage()]
    assert lines == ["kvzip-plugin: no model worker was given to the cache; KV compression disabled, SGLang's "
                     "default tree cache behaviour is used"]
    # behaves as UnifiedRadixCache: insert, match, evict
    _, alloc, _ = pools
    slots = alloc.alloc(6)
    cache.insert(InsertParams(key=RadixKey(array("q", range(10, 16))), value=slots))
    req = _req(list(range(10, 16)) + [1, 2])
    assert _match(cache, req).device_prefix_len == 6 and not hasattr(req, adoption.ADOPT_ATTR)
    assert cache.evict(EvictParams(num_tokens=6)).num_tokens_evicted == 6


def test_fallback_is_one_log_line_and_one_metric(pools):
    observed = []
    cache = _live(_cache(pools))
    cache.metrics.prom = SimpleNamespace(observe=lambda stats, labels: observed.append((stats, labels)))
    cache.metrics.labels = ["UnifiedRadixCache", "0", "0", "0"]
    cache._disable("speculative_decoding", "speculative decoding is not supported")
    cache._disable("other", "ignored: already disabled")
    assert cache.kvzip_disabled == "speculative_decoding"
    assert [s.fallbacks for s, _ in observed] == [{"speculative_decoding": 1}]
    assert isinstance(observed[0][0], KVzipStats)


def test_job_gauges_are_published_when_they_change():
    """The other series are published once a second at most; the job gauges at every change, so that a job
    shorter than that interval still shows on `kvzip_jobs_queued` / `kvzip_jobs_running`."""
    from kvzip_plugin.integrations.sglang.metrics import MetricsPublisher

    observed = []
    pub = MetricsPublisher(enable_metrics=False, model_name=None)
    pub.prom = SimpleNamespace(observe=lambda stats, labels: observed.append((stats.jobs_queued, stats.jobs_running)))
    for queued, running in [(0, 0), (0, 0), (1, 0), (0, 1), (0, 1), (0, 0), (0, 0)]:
        pub.flush(0, 0, queued, running)  # all within one interval
    assert observed == [(0, 0), (1, 0), (0, 1), (0, 0)]
    pub.flush(0, 0, 0, 0, force=True)
    assert observed[-1] == (0, 0) and len(observed) == 5


@pytest.mark.parametrize(("server_args", "code"), [
    ({"speculative_algorithm": "EAGLE"}, "speculative_decoding"),
    ({"pp_size": 2}, "pipeline_parallel"),
    ({"tp_size": 2}, "tensor_parallel"),
    ({"tp_size": 1}, "no_model"),
    ({"enable_session_radix_cache": True}, "sessions"),
    ({"enable_streaming_session": True}, "sessions"),
    ({"enable_unified_cache_external_linker": True}, "external_linker"),
    ({"enable_lmcache": True}, "external_kv_store"),
    ({"disaggregation_mode": "prefill"}, "disaggregation"),
    ({"device": "cuda"}, "no_model"),  # graphs on: their replays are declined for KVzip's batches (graphs.py)
    ({"device": "cuda", "disable_cuda_graph": True}, "no_model"),  # (the next check: no model in this test)
    ({"device": "npu"}, "device_graphs"),  # runners whose replays the plugin does not decline
    ({"device": "npu", "disable_cuda_graph": True, "disable_prefill_cuda_graph": True}, "no_model"),
    ({"device": "cuda", "enable_dp_attention": True}, "dp_attention_graphs"),
    ({"device": "cpu"}, "no_model"),
    ({}, "no_model"),
])
def test_unsupported_runtime_features(pools, server_args, code):
    cache = _cache(pools, server_args=SimpleNamespace(**server_args))
    assert cache.kvzip_disabled == code


def test_graphs_stay_on_for_every_structure_on_cuda(pools):
    """Decode and prefill graphs (SGLang's CUDA defaults) no longer turn KVzip off: the plugin declines the
    replays of its own batches instead (`graphs.py`, tested in test_graphs.py)."""
    cache = _cache(pools, server_args=SimpleNamespace(device="cuda"))
    for structure in ("pair", "layer_budget", "head"):
        cache.kvzip_config = cache.kvzip_config.model_copy(update={"structure": structure})
        for args in ({}, {"cuda_graph_backend_prefill": "breakable"},
                     {"cuda_graph_config": SimpleNamespace(prefill=SimpleNamespace(backend="full"))}):
            assert unsupported_runtime_reason(cache, SimpleNamespace(device="cuda", **args), None)[0] == "no_model"


def test_unsupported_kv_pool(pools):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    cache = _cache(pools)

    class OtherPool(MHATokenToKVPool):
        pass

    cache.kv_pool = object.__new__(OtherPool)
    assert unsupported_runtime_reason(cache, None, None)[0] == "kv_pool"


def test_a_trigger_no_prefix_can_reach_is_refused(pools):
    """min_prefix_tokens (default 1024) not below the model's context length: nothing could ever be compressed."""
    cache = _cache(pools)

    def worker(context_len):
        return SimpleNamespace(model_runner=SimpleNamespace(
            model_config=SimpleNamespace(context_len=context_len, model_is_mrope=False), model=torch.nn.Module()))

    code, message = unsupported_runtime_reason(cache, None, worker(1024))
    assert code == "min_prefix_tokens_above_context_length"
    assert message == ("--kv-compression-min-prefix-tokens 1024 is not below the context length 1024: no prefix can "
                       "ever be compressed")
    assert unsupported_runtime_reason(cache, None, worker(1025)) is None


# --------------------------------------------------------------------------- accounting and eviction


def test_compacted_prefixes_are_evictable_or_protected_and_evicted_last(pools):
    _, alloc, _ = pools
    cache = _live(_cache(pools))
    free0 = alloc.available_size()
    tree_slots = alloc.alloc(8)
    cache.insert(InsertParams(key=RadixKey(array("q", range(100, 108))), value=tree_slots))
    entry = _entry(cache, list(range(200, 208)), 4)
    assert cache.evictable_size() == 8 + 4 and cache.protected_size() == 0
    lock = cache.lock(entry.handle)  # a request admitted on the compacted prefix pins it
    assert cache.evictable_size() == 8 and cache.protected_size() == 4
    assert alloc.available_size() + cache.evictable_size() + cache.protected_size() == free0
    assert cache.evict(EvictParams(num_tokens=12)).num_tokens_evicted == 8  # the tree only: the entry is pinned
    assert entry.alive
    cache.unlock(lock)
    assert cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 4  # then the compacted prefix
    assert not entry.alive and not cache.entries and alloc.available_size() == free0
    with pytest.raises(RuntimeError, match="after it was dropped"):
        cache.lock(entry.handle)


def test_reset_drops_compacted_prefixes(pools):
    _, alloc, _ = pools
    cache = _live(_cache(pools))
    free0 = alloc.available_size()
    entry = _entry(cache, list(range(300, 306)), 3)
    cache.reset()
    assert not cache.entries and not entry.alive and alloc.available_size() == free0


# --------------------------------------------------------------------------- adoption


def test_adoption_uses_physical_ids_and_is_undone_when_the_prefix_goes(pools):
    _, alloc, _ = pools
    cache = _live(_cache(pools))
    prefix = list(range(100, 108))
    tree_slots = alloc.alloc(8)
    cache.insert(InsertParams(key=RadixKey(array("q", prefix)), value=tree_slots))
    entry = _entry(cache, prefix, 4)
    req = _req(prefix + [1, 2, 3], return_logprob=True)
    result = _match(cache, req)
    # matched the compacted prefix, not the (longer-lived) tree copy: P slots, its handle as last node
    assert result.device_prefix_len == 4 and result.last_device_node is entry.handle
    info = getattr(req, adoption.ADOPT_ATTR)
    assert info.offset == 4 and list(info.logical_ids) == prefix + [1, 2, 3]
    assert list(req.origin_input_ids) == prefix[:4] + [1, 2, 3]  # row position == fill index
    assert list(req.full_untruncated_fill_ids) == list(req.origin_input_ids)
    assert list(req.origin_input_ids_unpadded) == prefix + [1, 2, 3]  # detokenization keeps the logical ids
    assert req.logprob_start_len == 7 and req.skip_radix_cache_insert  # 11 logical - offset 4
    req.prefix_len, req.last_node = result.device_prefix_len, result.last_device_node
    assert torch.equal(cache.prefix_device_indices(req), entry.slots)
    assert cache.dfs_weight_order([entry.handle, cache.root_node_handle()]) == [0, 1]
    # a second match (the request waited another round) is idempotent
    assert _match(cache, req).device_prefix_len == 4 and list(req.origin_input_ids) == prefix[:4] + [1, 2, 3]
    # the compacted prefix is evicted before the request is admitted: back to logical ids and the tree
    cache.entries.drop(entry, free=True, reason="evicted")
    again = _match(cache, req)
    assert again.device_prefix_len == 8 and not hasattr(req, adoption.ADOPT_ATTR)
    assert list(req.origin_input_ids) == prefix + [1, 2, 3] and req.logprob_start_len == 11
    assert not req.skip_radix_cache_insert


def test_input_logprobs_inside_the_prefix_are_not_adopted(pools):
    cache = _live(_cache(pools))
    prefix = list(range(100, 108))
    _entry(cache, prefix, 4)
    req = _req(prefix + [1, 2], return_logprob=True)
    req.logprob_start_len = 2  # input logprobs of prefix tokens: needs the full prefix
    assert _match(cache, req).device_prefix_len == 0 and not hasattr(req, adoption.ADOPT_ATTR)


def test_a_prompt_sent_again_is_not_a_shared_prefix(pools):
    """Admission counts a hit only for a prompt not seen before: the same prompt again hits its whole prefix
    in the tree but queues no job; another prompt continuing the prefix does (with the request that cached
    it, 2 hits)."""
    from kvzip_plugin.integrations.sglang.scheduling import Jobs

    from kvzip_plugin.detection import TriggerPolicy

    _, alloc, _ = pools
    cache = _live(_cache(pools))
    cache.kvzip_trigger = TriggerPolicy(min_prefix_tokens=8, min_hits=2)
    cache.jobs = Jobs(cache)
    prompt = list(range(100, 108)) + [1, 2]
    assert _match(cache, _req(prompt, rid="a")).device_prefix_len == 0  # computed: it caches the prompt
    cache.insert(InsertParams(key=RadixKey(array("q", prompt)), value=alloc.alloc(len(prompt))))
    assert _match(cache, _req(prompt, rid="a-again")).device_prefix_len == 9  # a hit, but the same prompt
    assert cache.jobs.live == {}
    assert _match(cache, _req(list(range(100, 108)) + [3, 4], rid="b")).device_prefix_len == 8
    (job,) = cache.jobs.live.values()
    assert len(job.tokens) == 8 and job.job.candidate.hits == 2


def _queued_job_in_a_pool(free: int, entry_slots: int):
    """A 256-slot pool: one queued job on an 8-token prefix (its prompt, 10 tokens, in the tree), a compacted
    entry of `entry_slots` unpinned slots, `free` slots free and the rest held (by requests, as it were)."""
    from kvzip_plugin.integrations.sglang.scheduling import Jobs

    from kvzip_plugin.detection import TriggerPolicy

    pools = harness.cpu_pools(torch.float32, max_context_len=64, size=256)
    _, alloc, _ = pools
    cache = _live(_cache(pools))
    cache.kvzip_trigger = TriggerPolicy(min_prefix_tokens=8, min_hits=2)
    cache.jobs = Jobs(cache)
    prompt = list(range(100, 108)) + [1, 2]
    _match(cache, _req(prompt, rid="a"))
    cache.insert(InsertParams(key=RadixKey(array("q", prompt)), value=alloc.alloc(len(prompt))))
    _match(cache, _req(list(range(100, 108)) + [3, 4], rid="b"))  # the second hit queues the job
    assert cache.jobs.admission.queue.peek() is not None
    if entry_slots:
        _entry(cache, list(range(300, 340)), entry_slots)
    alloc.alloc(alloc.available_size() - free)  # held elsewhere
    return cache


def _sched(running: bool = False):
    return SimpleNamespace(waiting_queue=[], chunked_req=None,
                           running_batch=SimpleNamespace(is_empty=lambda: not running))


def test_a_job_counts_unpinned_compacted_prefixes_as_room(pools):
    """Scoring a prefix of 8 needs 2 x 8 + SCORING_OVERHEAD + carry = 88 slots. 50 free + 10 in the tree are
    not enough; with a 40-slot unpinned compacted prefix (SGLang evicts it like any unlocked node, and counts
    it as evictable) they are: the job starts instead of waiting for ever (a tight pool, issue 17)."""
    cache = _queued_job_in_a_pool(free=50, entry_slots=40)
    assert cache.tree_evictable_size() == 10 and cache.evictable_size() == 50
    assert cache.jobs._can_start(_sched())


def test_a_job_does_not_displace_a_compacted_prefix_hit_as_often_as_its_candidate(pools, monkeypatch, caplog):
    """The same pool as above, but the compacted prefix has served 2 hits (its candidate has 3, not more than
    twice as many): it is kept
    (retention.py), so 50 free + 10 in the tree < 88 and the job waits; the cancel's reason names what was kept.
    Once the entry's hits have decayed below the candidate's, it is room again and the job starts. A colder
    entry beside a kept one is room, and the start makes the kept one the most recently used (SGLang's
    `_evict` then takes the colder one first)."""
    from kvzip_plugin.integrations.sglang import scheduling

    from kvzip_plugin.retention import HIT_HALF_LIFE_S, NO_ROOM_WAIT_S

    clock = [1000.0]
    monkeypatch.setattr(scheduling.time, "monotonic", lambda: clock[0])
    cache = _queued_job_in_a_pool(free=50, entry_slots=40)
    (entry,) = list(cache.entries)
    meter, cand = cache.jobs.admission.meter, cache.jobs.admission.queue.peek().candidate.key
    assert meter.value(cand, clock[0]) == 2.0
    _match(cache, _req(list(range(100, 108)) + [7, 8], rid="c"))  # a hit on the queued job's prefix counts too
    assert meter.value(cand, clock[0]) == 3.0 and len(cache.jobs.live) == 1
    meter.hit(entry.key, clock[0])
    assert not meter.keeps(entry.key, cand, clock[0])  # 3 > 2 x 1: the entry would be room
    meter.hit(entry.key, clock[0])
    assert not cache.jobs._can_start(_sched())  # 3 <= 2 x 2, kept: 60 < 88
    clock[0] += NO_ROOM_WAIT_S
    with caplog.at_level(logging.WARNING, logger="sglang.kvzip_plugin"):
        assert not cache.jobs._can_start(_sched())
    assert ("it needs 88 token slots, 100 are free or evictable (of which 40 in 1 compacted prefixes kept: this one "
            "is not hit more than 2x as often)") in caplog.text
    assert cache.stats.jobs["cancelled"] == 1 and entry in list(cache.entries)  # nothing evicted

    # a new job on another prefix of the same pool: the entry's 2 hits are an hour old, the candidate's new
    cache2 = _queued_job_in_a_pool(free=50, entry_slots=40)
    (old,) = list(cache2.entries)
    meter2, cand2 = cache2.jobs.admission.meter, cache2.jobs.admission.queue.peek().candidate.key
    meter2.hit(old.key, clock[0] - 6 * HIT_HALF_LIFE_S, n=2)
    assert not meter2.keeps(old.key, cand2, clock[0])
    assert cache2.jobs._can_start(_sched())
    # a kept entry beside a colder one: only the colder one is room (50 free + 10 tree + 40 cold = 100 >= 88,
    # the kept 40 not counted), and the start makes the kept one the most recently used
    cache3 = _queued_job_in_a_pool(free=90, entry_slots=40)
    (cold,) = list(cache3.entries)
    hot = _entry(cache3, list(range(400, 440)), 40)
    hot.key, hot.last_access, cold.last_access = ("hot",), clock[0] - 100, clock[0] - 50
    cache3.jobs.admission.meter.hit(("hot",), clock[0], n=5)
    assert cache3.jobs._can_start(_sched()) and hot.last_access == clock[0] > cold.last_access
    cache3.evict_tokens(50)  # SGLang's eviction: the tree's 10, then the least recently used entry: the cold one
    assert list(cache3.entries) == [hot]


def test_a_job_without_room_is_cancelled_after_the_bounded_wait(pools, monkeypatch, caplog):
    """No room (30 free + 10 evictable < 88) and nothing running that could free any: the job waits
    `NO_ROOM_WAIT_S`, then is cancelled with the sizes in its reason (counted, logged) rather than staying
    queued for ever. While requests run it keeps waiting (they free slots when they end)."""
    from kvzip_plugin.integrations.sglang import scheduling

    from kvzip_plugin.retention import NO_ROOM_WAIT_S

    cache = _queued_job_in_a_pool(free=30, entry_slots=0)
    clock = [1000.0]
    monkeypatch.setattr(scheduling.time, "monotonic", lambda: clock[0])
    assert not cache.jobs._can_start(_sched())  # starts the wait
    clock[0] += NO_ROOM_WAIT_S - 1
    assert not cache.jobs._can_start(_sched()) and cache.jobs.admission.queue.peek() is not None
    clock[0] += 2
    assert not cache.jobs._can_start(_sched(running=True))  # a request runs: the wait starts afresh
    assert cache.jobs.admission.queue.peek() is not None
    clock[0] += NO_ROOM_WAIT_S + 1
    assert not cache.jobs._can_start(_sched())
    clock[0] += NO_ROOM_WAIT_S
    with caplog.at_level(logging.WARNING, logger="sglang.kvzip_plugin"):
        assert not cache.jobs._can_start(_sched())
    assert cache.jobs.admission.queue.peek() is None and cache.jobs.live == {}
    assert cache.stats.jobs["cancelled"] == 1
    assert "no room in the KV pool to score it: it needs 88 token slots, 40 are free or evictable" in caplog.text
    # the prefix is backed off (the next try would wait out the bound and be cancelled again): new hits on it
    # queue nothing until the back-off has passed, then they do
    from kvzip_plugin.admission import NO_ROOM_BACKOFF_S

    assert f"no new job for it for {NO_ROOM_BACKOFF_S:.0f} s" in caplog.text
    for i in range(3):
        _match(cache, _req(list(range(100, 108)) + [5, i], rid=f"c{i}"))
    assert cache.jobs.admission.queue.peek() is None
    clock[0] += NO_ROOM_BACKOFF_S
    for i in range(3):
        _match(cache, _req(list(range(100, 108)) + [6, i], rid=f"d{i}"))
    assert cache.jobs.admission.queue.peek() is not None


def test_logical_positions_and_capture_plan(pools):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    cache = _live(_cache(pools))
    entry = _entry(cache, list(range(100, 108)), 4)
    adopted, plain = _req(list(range(100, 108)) + [1, 2]), _req([5, 6, 7], rid="r1")
    _match(cache, adopted)
    batch = SimpleNamespace(reqs=[plain, adopted])
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, positions=torch.tensor([3, 6]))
    cache.on_forward_batch(decode, batch)
    assert decode.positions.tolist() == [3, 6 + entry.offset]
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, positions=torch.tensor([0, 1, 2, 4, 5]),
                             extend_seq_lens_cpu=[3, 2], extend_prefix_lens_cpu=[0, 4])
    cache.on_forward_batch(extend, batch)
    assert extend.positions.tolist() == [0, 1, 2, 4 + 4, 5 + 4]
    assert cache.stats.compressed_hits == 1  # counted once per request
