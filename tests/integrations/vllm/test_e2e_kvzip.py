# SPDX-License-Identifier: Apache-2.0
"""`--kv-compression kvzip` compressing inside the real vLLM engine (CPU, tiny random Llama).

Scenarios run in fresh processes (run_kvzip.py); the shared prefix is 6 full blocks (192 tokens)
and the trigger is lowered to 64 tokens / 2 hits, so the second request queues a job, the
scoring requests and the compaction run while it decodes, and later requests adopt the
compacted prefix.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.hf.attention import install  # noqa: E402
from tests.integrations.reference import reference_logprobs  # noqa: E402
from tests.integrations.vllm.run_kvzip import BLOCK_SIZE  # noqa: E402
from tests.integrations.vllm.spawn import spawn  # noqa: E402

L = 6 * BLOCK_SIZE
TRIGGER = {"KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS": "64", "KVZIP_KV_COMPRESSION_MIN_HITS": "2"}


def scenario(model_dir: Path, name: str, mode: str, ratio: float = 0.5, **env: str) -> dict:
    if mode == "kvzip":
        env = {"KVZIP_KV_COMPRESSION": "kvzip", "KVZIP_KV_COMPRESSION_RATIO": str(ratio), **TRIGGER, **env}
    return spawn("tests.integrations.vllm.run_kvzip", str(model_dir), name, single_process=True, **env)


@pytest.fixture(scope="module")
def none_seq(tiny_model_dir):
    return scenario(tiny_model_dir, "sequential", "none")


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvzip_dump")


@pytest.fixture(scope="module")
def kvzip_seq(tiny_model_dir, dump_dir):
    return scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_DUMP_DIR=str(dump_dir))


def _adopted(result: dict) -> list[dict]:
    return [r for r in result["requests"] if r["offset"] is not None]


def test_ratio_one_is_token_identical_to_none(tiny_model_dir, none_seq):
    full = scenario(tiny_model_dir, "sequential", "kvzip", 1.0)
    assert full["kvzip"]["finished"]["committed"] == 1
    adopted = _adopted(full)
    assert len(adopted) >= 3 and all(r["offset"] == 0 for r in adopted)  # P == L: same blocks count
    assert [r["tokens"] for r in full["requests"]] == [r["tokens"] for r in none_seq["requests"]]
    for r, base in zip(full["requests"], none_seq["requests"], strict=True):
        if r["offset"] is not None:  # on the compacted prefix: bit-identical
            assert r["logprobs"] == base["logprobs"], r["id"]
        else:  # r1 decodes in the same batches as the scoring requests: other CPU kernel blocking, ~1e-6
            assert max(abs(a - b) for a, b in zip(r["logprobs"], base["logprobs"], strict=True)) < 1e-4


def test_compacted_prefix_is_hit_with_fewer_blocks(kvzip_seq, none_seq):
    state = kvzip_seq["kvzip"]
    assert state["finished"] == {"committed": 1, "failed": 0, "cancelled": 0}
    (prefix,) = state["compacted"]
    assert prefix["L"] == L and prefix["P"] == L // 2 and prefix["alive"]
    adopted = _adopted(kvzip_seq)
    assert [r["id"] for r in adopted] == ["r2", "r3", "r4", "r5"]  # r1 triggered the job while decoding
    for r, base in zip(kvzip_seq["requests"], none_seq["requests"], strict=True):
        assert r["num_cached_tokens"] == base["num_cached_tokens"]  # logical tokens count as cached
        if r["offset"] is not None:
            assert r["offset"] == L // 2
            assert r["blocks"] == base["blocks"] - (L // 2) // BLOCK_SIZE
        else:
            assert r["blocks"] == base["blocks"]
    # requests on the compacted prefix see different KV, so (random model) their outputs change
    assert any(r["tokens"] != b["tokens"] for r, b in zip(kvzip_seq["requests"], none_seq["requests"], strict=True)
               if r["offset"] is not None)
    # nothing referenced once idle; the only cached blocks are the compacted prefix (originals evicted)
    assert kvzip_seq["pool"]["referenced"] == [] and kvzip_seq["pool"]["cached"] == L // 2 // BLOCK_SIZE


def test_outputs_on_compacted_prefix_equal_transformers_reference(kvzip_seq, dump_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    (dump_file,) = sorted(Path(dump_dir).glob("job-*.pt"))
    dump = torch.load(dump_file)
    kept = dump["kept_tokens"]  # [layers, H_kv, P]
    assert dump["prefix_len"] == L and kept.shape[-1] == L // 2
    assert len({tuple(kept[0, h].tolist()) for h in range(kept.shape[1])}) > 1  # heads keep different tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    install(model.eval())  # KVzipCache's per-head physical slots need KVzip's attention wrapper
    prefix = kvzip_seq["prefix"]
    gaps = []
    for r, sfx in zip(kvzip_seq["requests"], kvzip_seq["suffixes"], strict=True):
        if r["offset"] is None:
            continue
        rest = prefix[L:] + sfx  # the partial block and the suffix, at logical positions L, L+1, ...
        ref_lp, ref_argmax = reference_logprobs(model, prefix[:L], dump["n_protected"], kept, rest, r["tokens"])
        assert ref_argmax == r["tokens"], r["id"]
        assert max(abs(a - b) for a, b in zip(ref_lp, r["logprobs"], strict=True)) < 2e-3, r["id"]
        full_lp, _ = reference_logprobs(model, prefix[:L], dump["n_protected"], None, rest, r["tokens"])
        gaps.append(max(abs(a - b) for a, b in zip(full_lp, r["logprobs"], strict=True)))
    assert gaps and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def test_failed_job_leaves_the_cache_as_it_was(tiny_model_dir, none_seq):
    failed = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_FAULT_INJECTION="compaction")
    state = failed["kvzip"]
    assert state["finished"]["committed"] == 0 and state["finished"]["failed"] >= 1
    assert state["compacted"] == [] and state["jobs_live"] == 0 and _adopted(failed) == []
    assert [r["tokens"] for r in failed["requests"]] == [r["tokens"] for r in none_seq["requests"]]
    assert [r["num_cached_tokens"] for r in failed["requests"]] == [r["num_cached_tokens"]
                                                                     for r in none_seq["requests"]]
    assert failed["pool"] == none_seq["pool"]  # same free count, nothing referenced, same cached blocks
    assert "kvzip-plugin: job 0 failed" in failed["log"]


def test_two_cache_salts_never_share_compacted_blocks(tiny_model_dir):
    res = scenario(tiny_model_dir, "salts", "kvzip", 0.5)
    a, b = res["requests"]["a"], res["requests"]["b"]
    assert len(res["kvzip_after_a"]["compacted"]) == 1 and [r["id"] for r in _adopted({"requests": a})]
    assert b[0]["num_cached_tokens"] == 0  # other salt: not even the original blocks are shared
    assert _adopted({"requests": b}) == []
    compacted = res["kvzip"]["compacted"]
    block_sets = [set(p["blocks"]) for p in compacted]
    assert all(x.isdisjoint(y) for i, x in enumerate(block_sets) for y in block_sets[i + 1:])


def test_no_block_leaks_after_random_requests_aborts_and_compactions(tiny_model_dir):
    res = scenario(tiny_model_dir, "churn", "kvzip", 0.5)
    state, pool = res["kvzip"], res["pool"]
    assert state["finished"]["committed"] >= 1 and res["aborted"] >= 5  # compactions and aborts happened
    assert state["jobs_live"] == 0 and state["offsets"] == {}
    assert pool["referenced"] == [] and pool["free"] == pool["num_blocks"] - 1  # all but the null block
    assert math.isfinite(res["finished"])


def test_cancelled_job_rolls_back(tiny_model_dir, none_seq):
    res = scenario(tiny_model_dir, "cancel", "kvzip", 0.5)
    state = res["kvzip"]
    assert res["jobs_before_reset"] == 1 and res["reset"] is True
    assert state["finished"]["cancelled"] == 1 and state["finished"]["committed"] == 0
    assert state["compacted"] == [] and state["jobs_live"] == 0
    assert res["pool"]["referenced"] == [] and res["pool"]["free"] == res["pool"]["num_blocks"] - 1
    r0, r2 = res["requests"]
    assert r0["tokens"] == none_seq["requests"][0]["tokens"] and r2["tokens"] == none_seq["requests"][2]["tokens"]
    assert r2["offset"] is None
    assert "job 0 cancelled: prefix cache reset" in res["log"]


def test_unsupported_engine_runs_uncompressed(tiny_model_dir, none_seq):
    """Fail closed: without vLLM's prefix caching KVzip cannot share a compacted prefix."""
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_TEST_PREFIX_CACHING="0")
    assert res["kvzip"]["disabled"] == "prefix_caching_disabled" and res["kvzip"]["compacted"] == []
    assert "KV compression disabled on this engine (prefix_caching_disabled)" in res["log"]
    assert [r["tokens"] for r in res["requests"]] == [r["tokens"] for r in none_seq["requests"]]
    assert _adopted(res) == []
