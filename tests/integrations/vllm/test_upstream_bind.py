# SPDX-License-Identifier: Apache-2.0
"""The pytest plugin `upstream_bind.py` (run inside vLLM's own prefix-caching tests by
`scripts/vllm_upstream_tests.sh`): a KVCacheManager built the way vLLM's `test_prefix_caching.py` builds
one gets KVzip's scheduler state bound (instance wrappers, as `KVzipConnector.bind_kv_cache_manager`
does), and a prefix-cache hit through it is the one an unbound manager gives."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request  # noqa: E402

from tests.integrations.vllm import upstream_bind  # noqa: E402

BS = 16


def _spec(block_size: int = BS) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)


def _config(num_blocks: int = 11, block_size: int = BS) -> KVCacheConfig:
    """vLLM's `make_kv_cache_config` (tests/v1/core/test_prefix_caching.py)."""
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layer"], _spec(block_size))])


def _manager(config: KVCacheConfig | None = None, hash_block_size: int = BS) -> KVCacheManager:
    config = config or _config()
    block_size = max(g.kv_cache_spec.block_size for g in config.kv_cache_groups)
    return KVCacheManager(config, max_model_len=8192, scheduler_block_size=block_size,
                          hash_block_size=hash_block_size, enable_caching=True)


def _hybrid(full_block_size: int = BS) -> KVCacheConfig:
    """Full attention + sliding window (vLLM's `make_kv_cache_config_hybrid_model`): the connector refuses it."""
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32, sliding_window=2 * BS)
    return KVCacheConfig(num_blocks=11, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["full"], _spec(full_block_size)), KVCacheGroupSpec(["swa"], swa)])


def _request(rid: str, tokens: list[int]) -> Request:
    """vLLM's `make_request` (same file), no multimodal inputs."""
    params = SamplingParams(max_tokens=17)
    params.update_from_generation_config({}, eos_token_id=100)
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def _scenario(manager: KVCacheManager):
    """vLLM's `test_prefill`, first half: req0 caches 3 full blocks, req1 shares them (one still in use),
    req2 arrives after both finished and hits the freed, still hashed, blocks."""
    init_none_hash(sha256)
    common = [i for i in range(3) for _ in range(BS)]
    out = []
    req0 = _request("0", common + [3] * 7)
    blocks, n, _ = manager.get_computed_blocks(req0)
    out.append((blocks.get_block_ids(), n))
    new = manager.allocate_slots(req0, 55, len(blocks.blocks[0]) * BS, blocks)
    out.append(new.get_block_ids())
    req1 = _request("1", common + [3] * 5)
    blocks, n, _ = manager.get_computed_blocks(req1)
    out.append((blocks.get_block_ids(), n))
    new = manager.allocate_slots(req1, 53 - n, len(blocks.blocks[0]) * BS, blocks)
    out.append(new.get_block_ids())
    out.append([b.ref_cnt for b in blocks.blocks[0]])
    manager.free(req0)
    manager.free(req1)
    req2 = _request("2", common + [4] * 9)
    blocks, n, _ = manager.get_computed_blocks(req2)
    out.append((blocks.get_block_ids(), n))
    out.append(manager.block_pool.free_block_queue.num_free_blocks)
    return out


def test_patch_binds_every_new_manager_and_is_undone():
    original = KVCacheManager.__init__
    plain = _manager()
    with upstream_bind.patched(mode="connector") as counter:
        bound = _manager()
    after = _manager()
    assert KVCacheManager.__init__ is original
    assert upstream_bind.is_bound(bound)
    assert vars(bound)["get_computed_blocks"] is not KVCacheManager.get_computed_blocks
    assert "record_prefix_cache_stats" in vars(bound)
    assert not upstream_bind.is_bound(plain) and not upstream_bind.is_bound(after)
    assert (counter.managers_built, counter.managers_bound) == (1, 1)
    assert not counter.bind_disabled and not counter.connector_refuses


def test_prefix_hit_through_a_bound_manager_is_the_unbound_one():
    expected = _scenario(_manager())
    assert expected[2] == (([1, 2, 3],), 3 * BS)  # the hit the scenario is about (vLLM's test_prefill)
    assert expected[5] == (([1, 2, 3],), 3 * BS)  # after both finished: the freed blocks still hit
    with upstream_bind.patched(mode="connector") as counter:
        manager = _manager()
    assert upstream_bind.is_bound(manager)
    assert _scenario(manager) == expected
    # every lookup and allocation went through the plugin's wrappers, and each lookup was observed
    assert counter.calls["get_computed_blocks"] == 3 and counter.calls["allocate_slots"] == 2
    assert counter.observe_calls == 3 and counter.adoptions == 0


def test_disabled_and_refused_managers_are_counted_apart():
    with upstream_bind.patched(mode="connector") as counter:
        refused = _manager(_hybrid())
    assert counter.connector_refuses == {"hybrid_kv_cache": 1} and counter.skipped_by_mode == 1
    assert counter.managers_built == 1 and counter.managers_bound == 0 and not counter.bind_disabled
    assert not upstream_bind.is_bound(refused)
    with upstream_bind.patched(mode="all") as counter:
        forced = _manager(_hybrid())
        coarse = _manager(_hybrid(full_block_size=2 * BS))  # one hash per half block of the first group
    assert upstream_bind.is_bound(forced) and not upstream_bind.is_bound(coarse)
    assert counter.managers_built == 2 and counter.managers_bound == 1
    assert counter.bind_disabled == {"hash_block_size": 1} and counter.skipped_by_mode == 0
    assert counter.connector_refuses == {"hybrid_kv_cache": 2}


def test_a_mamba_group_first_disables_instead_of_raising():
    """`bind` on a manager whose first group is Mamba (vLLM's own hybrid tests build such managers; the
    connector refuses those models before binding) turns KVzip off for it instead of raising."""
    from vllm.v1.kv_cache_interface import MambaSpec

    mamba = MambaSpec(block_size=BS, shapes=((1,),), dtypes=(torch.float32,))
    config = KVCacheConfig(num_blocks=11, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["mamba"], mamba), KVCacheGroupSpec(["full"], _spec())])
    with upstream_bind.patched(mode="all") as counter:
        manager = _manager(config)
    assert counter.bind_errors == []
    assert counter.bind_disabled == {"kv_cache_spec": 1} and not upstream_bind.is_bound(manager)
