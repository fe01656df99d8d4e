# SPDX-License-Identifier: Apache-2.0
"""`--kv-compression kvzip` compressing inside the real vLLM engine (CPU, tiny random Llama).

Scenarios run in fresh processes (run_kvzip.py); the shared prefix is 6 full blocks (192 tokens)
and the trigger is lowered to 64 tokens / 2 hits, so the second request queues a job, the
scoring requests and the compaction run while it decodes, and later requests adopt the
compacted prefix. Structures: `head` (vLLM's own block table and kernel) and `pair` /
`layer_budget` (head pages and the plugin's attention; `pair` is the default).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.hf.attention import install  # noqa: E402
from kvzip_plugin.store import place_runs, select_runs  # noqa: E402
from tests.integrations.reference import check_against_reference  # noqa: E402
from tests.integrations.vllm.run_kvzip import BLOCK_SIZE, MAX_TOKENS  # noqa: E402
from tests.integrations.vllm.spawn import spawn  # noqa: E402

L = 6 * BLOCK_SIZE
TRIGGER = {"KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS": "64", "KVZIP_KV_COMPRESSION_MIN_HITS": "2",
           # scoring unsliced unless a test asks: the scenarios' expectations (which requests adopt a compacted
           # prefix) assume a job commits within the request that queued it; the sliced tests set their own
           "KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS": "0"}


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
    return scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_DUMP_DIR=str(dump_dir),
                    KVZIP_KV_COMPRESSION_STRUCTURE="head")


@pytest.fixture(scope="module", params=[("pair", 0.5), ("layer_budget", 0.5)], ids=["pair", "layer_budget"])
def kvzip_nonuniform(request, tiny_model_dir, tmp_path_factory):
    structure, ratio = request.param
    dump = tmp_path_factory.mktemp(f"kvzip_dump_{structure}")
    res = scenario(tiny_model_dir, "sequential", "kvzip", ratio, KVZIP_DUMP_DIR=str(dump),
                   KVZIP_KV_COMPRESSION_STRUCTURE=structure)
    return structure, res, torch.load(next(iter(sorted(dump.glob("job-*.pt")))))


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    install(model.eval())  # KVzipCache's per-head physical slots need KVzip's attention wrapper
    return model


def _check_against_reference(model, prefix, keep, n_protected, requests, suffixes) -> list[float]:
    """The adopted requests (offset set) against transformers on the same kept pairs, logprobs within 2e-3."""
    pairs = [(r, sfx) for r, sfx in zip(requests, suffixes, strict=True) if r["offset"] is not None]
    return check_against_reference(model, prefix, L, n_protected, keep, [r for r, _ in pairs], [s for _, s in pairs],
                                   2e-3)


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


def test_engine_series_describe_client_requests_only(kvzip_seq, none_seq):
    """vLLM's own prefix-cache counters and request gauges (what `vllm:prefix_cache_hits_total`,
    `vllm:prefix_cache_queries_total`, `vllm:num_requests_running` / `_waiting` export) read the same with
    KVzip as without it: the scoring requests are not counted (before the fix, one 3,968-token prefix's
    scoring requests added ~290K "hit" tokens to the counters)."""
    kvzip, none = kvzip_seq["engine_stats"], none_seq["engine_stats"]
    assert kvzip_seq["kvzip"]["finished"]["committed"] == 1  # a scoring request ran beside r1
    assert none["prefix_requests"] == len(none_seq["requests"])
    assert kvzip == none, (kvzip, none)


def test_a_prompt_sent_again_is_not_a_shared_prefix(tiny_model_dir):
    """Admission means "shared": the same prompt sent twice hits its whole prefix but queues no job (before,
    `vllm bench serve`'s repeated prompt 0 became a job mid-run); another prompt continuing it does."""
    res = scenario(tiny_model_dir, "repeat", "kvzip", 0.5)
    first, again, _ = res["requests"]
    assert again["num_cached_tokens"] >= 6 * 32  # vLLM's prefix cache served the repeat
    assert res["kvzip_after_repeat"]["jobs_live"] == 0 and sum(res["kvzip_after_repeat"]["finished"].values()) == 0
    assert res["kvzip"]["finished"]["committed"] == 1


def test_outputs_on_compacted_prefix_equal_transformers_reference(kvzip_seq, dump_dir, reference_model):
    (dump_file,) = sorted(Path(dump_dir).glob("job-*.pt"))
    dump = torch.load(dump_file)
    keep = dump["keep"]  # [layers, H_kv, L]
    assert dump["prefix_len"] == L and dump["structure"] == "head"
    assert set(keep.sum(-1).flatten().tolist()) == {L // 2}
    assert len({tuple(keep[0, h].tolist()) for h in range(keep.shape[1])}) > 1  # heads keep different tokens
    gaps = _check_against_reference(reference_model, kvzip_seq["prefix"], keep, dump["n_protected"],
                                     kvzip_seq["requests"], kvzip_seq["suffixes"])
    assert gaps and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def test_nonuniform_prefix_holds_exactly_its_head_pages(kvzip_nonuniform, none_seq):
    structure, res, dump = kvzip_nonuniform
    state = res["kvzip"]
    assert state["structure"] == structure and state["finished"] == {"committed": 1, "failed": 0, "cancelled": 0}
    assert state["prefix_attention"] == "vllm_cpu_kernel"  # CPU default (KVZIP_PREFIX_ATTENTION=auto)
    (prefix,) = state["compacted"]
    keep = dump["keep"]
    lengths = keep.sum(-1)
    assert dump["structure"] == structure and len(set(lengths.flatten().tolist())) > 1  # runs differ in length
    if structure == "layer_budget":
        assert all(len(set(row.tolist())) == 1 for row in lengths)  # one count per layer
    n_blocks = place_runs(lengths, BLOCK_SIZE).n_blocks
    assert prefix["head_pages"] and prefix["P"] == n_blocks * BLOCK_SIZE < L and len(prefix["blocks"]) == n_blocks
    adopted = _adopted(res)
    assert [r["id"] for r in adopted] == ["r2", "r3", "r4", "r5"]
    for r, base in zip(res["requests"], none_seq["requests"], strict=True):
        assert r["num_cached_tokens"] == base["num_cached_tokens"]
        if r["offset"] is not None:  # the store's blocks, then its own: fewer than the full prefix's
            assert r["offset"] == L - n_blocks * BLOCK_SIZE
            assert r["blocks"] == base["blocks"] - (L - n_blocks * BLOCK_SIZE) // BLOCK_SIZE
    # nothing referenced once idle; the only cached blocks are the store's (originals evicted, reservation trimmed)
    assert res["pool"]["referenced"] == [] and res["pool"]["cached"] == n_blocks
    assert res["pool"]["free"] == none_seq["pool"]["free"]


def test_nonuniform_outputs_equal_transformers_reference(kvzip_nonuniform, reference_model):
    """Requests decode one at a time on the store: their steps skip vLLM's own forward (every row is on the store,
    the plugin writes every output row) and still equal transformers on the same kept pairs."""
    structure, res, dump = kvzip_nonuniform
    assert res["kvzip"]["forwards_skipped"] > 0
    gaps = _check_against_reference(reference_model, res["prefix"], dump["keep"], dump["n_protected"],
                                    res["requests"], res["suffixes"])
    assert len(gaps) == 4 and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def test_pair_through_the_triton_kernel_equals_transformers(tiny_model_dir, tmp_path, reference_model):
    """The CUDA path of head-page attention (the Triton kernel reading vLLM's blocks in place), forced on
    CPU under Triton's interpreter: the same outputs as transformers on the same kept pairs."""
    pytest.importorskip("triton")
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_DUMP_DIR=str(tmp_path),
                   KVZIP_KV_COMPRESSION_STRUCTURE="pair", KVZIP_PREFIX_ATTENTION="triton", TRITON_INTERPRET="1")
    assert res["kvzip"]["finished"]["committed"] == 1 and res["kvzip"]["compacted"][0]["head_pages"]
    assert res["kvzip"]["prefix_attention"] == "KernelRuns"
    dump = torch.load(next(iter(sorted(tmp_path.glob("job-*.pt")))))
    gaps = _check_against_reference(reference_model, res["prefix"], dump["keep"], dump["n_protected"],
                                    res["requests"], res["suffixes"])
    assert len(gaps) == 4


def test_head_level_scorer_compacts_without_a_scoring_pass(tiny_model_dir, tmp_path, reference_model):
    """`--kv-compression-scorer kvzip_head`: no scoring request runs; the store keeps the top half of the
    (layer, KV head) spans whole (by the head-score file) and the others only the protected tokens rounded
    up to a page with their most recent context; outputs equal transformers on the same kept pairs."""
    from transformers import AutoConfig

    from kvzip_plugin.head_scores import save_head_scores

    path = tmp_path / "heads.json"
    save_head_scores(path, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), AutoConfig.from_pretrained(tiny_model_dir),
                     "tiny-llama", "test")
    dump = tmp_path / "dump"
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_KV_COMPRESSION_SCORER="kvzip_head",
                   KVZIP_KV_COMPRESSION_HEAD_SCORES=str(path), KVZIP_DUMP_DIR=str(dump))
    assert res["kvzip"]["finished"]["committed"] == 1
    assert "head-level scores (no scoring pass)" in res["log"] and "chunk(s)" not in res["log"]
    job = torch.load(next(iter(sorted(dump.glob("job-*.pt")))))
    keep, n_p = job["keep"], job["n_protected"]
    assert bool(keep[0, 0].all()) and bool(keep[1, 1].all())  # the two best heads keep everything
    page = -(-n_p // 32) * 32
    for layer, head in ((0, 1), (1, 0)):
        kept = keep[layer, head].nonzero().flatten().tolist()
        assert kept == list(range(n_p)) + list(range(L - (page - n_p), L))  # protected + most recent
    assert len(_adopted(res)) == 4
    _check_against_reference(reference_model, res["prefix"], keep, n_p, res["requests"], res["suffixes"])


TP2 = {"KVZIP_TEST_TP": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1"}
"""Tensor parallelism over two CPU workers, one core each (vLLM CPU binds a worker's threads per NUMA node,
and this machine has one: the binding is given)."""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not {0, 1} <= os.sched_getaffinity(0),
                    reason="TP=2 on the CPU engine binds one worker to core 0 and one to core 1")
@pytest.mark.parametrize("scorer", ["kvzip", "kvzip_head"])
def test_tensor_parallel_ranks_compact_their_own_heads(tiny_model_dir, tmp_path, reference_model, kvzip_seq, dump_dir,
                                                       scorer):
    """TP=2: each of the two workers holds one of the tiny model's two KV heads. Each rank scores its own
    head (the same scores as one worker gives that head), selects its pairs with its own `pair` threshold
    (each rank keeps the ratio of its own pairs), and both lay the store out in head pages, the layout the
    scheduler publishes for every rank; outputs equal transformers on the union of the ranks' kept pairs.
    `kvzip_head`: each rank takes its own column of the head-score file."""
    env = {**TP2, "KVZIP_KV_COMPRESSION_STRUCTURE": "pair", "KVZIP_DUMP_DIR": str(tmp_path / "dump")}
    if scorer == "kvzip_head":
        from transformers import AutoConfig

        from kvzip_plugin.head_scores import save_head_scores

        path = tmp_path / "heads.json"
        save_head_scores(path, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), AutoConfig.from_pretrained(tiny_model_dir),
                         "tiny-llama", "test")
        env |= {"KVZIP_KV_COMPRESSION_SCORER": "kvzip_head", "KVZIP_KV_COMPRESSION_HEAD_SCORES": str(path)}
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, **env)
    state = res["kvzip"]
    assert state["finished"] == {"committed": 1, "failed": 0, "cancelled": 0}
    ranks = sorted((torch.load(f) for f in (tmp_path / "dump").glob("job-*-rank*.pt")), key=lambda d: d["tp_rank"])
    assert [d["tp_rank"] for d in ranks] == [0, 1]
    assert all(d["keep"].shape == (2, 1, L) for d in ranks)  # one KV head per rank
    n_p = ranks[0]["n_protected"]
    for d in ranks:  # each rank's own threshold over its own scores
        assert torch.equal(d["keep"], select_runs(d["scores"], n_p, 0.5, "pair", BLOCK_SIZE))
    keep = torch.cat([d["keep"] for d in ranks], dim=1)  # [layers, 2 KV heads, L]
    if scorer == "kvzip":
        (one_worker,) = sorted(Path(dump_dir).glob("job-*.pt"))  # TP=1, the same prefix and scoring pass
        torch.testing.assert_close(torch.cat([d["scores"] for d in ranks], dim=1), torch.load(one_worker)["scores"],
                                   rtol=1e-3, atol=1e-5)
    else:  # the best head of each rank's column keeps its span whole
        assert "chunk(s)" not in res["log"] and bool(keep[0, 0].all()) and bool(keep[1, 1].all())
    (prefix,) = state["compacted"]
    n_blocks = max(place_runs(d["keep"].sum(-1), BLOCK_SIZE).n_blocks for d in ranks)
    assert prefix["head_pages"] and prefix["P"] == n_blocks * BLOCK_SIZE < L
    assert len(_adopted(res)) == 4
    gaps = _check_against_reference(reference_model, res["prefix"], keep, n_p, res["requests"], res["suffixes"])
    assert len(gaps) == 4 and max(gaps) > 1e-2  # the comparison can fail: the full cache gives other logprobs


def test_mixed_steps_stay_correct(tiny_model_dir, tmp_path_factory, reference_model):
    """Requests on a compacted `pair` prefix, a request on a prefix whose scoring requests share its
    steps, and a plain request, in the same batches."""
    dump = tmp_path_factory.mktemp("kvzip_dump_mixed")
    res = scenario(tiny_model_dir, "mixed", "kvzip", 0.5, KVZIP_DUMP_DIR=str(dump))
    base = scenario(tiny_model_dir, "mixed", "none")
    assert res["kvzip"]["finished"]["committed"] == 2 and res["scoring_steps_with_a"] >= 1
    by_id = {r["id"]: r for r in res["requests"]}
    assert by_id["a1"]["offset"] is not None and by_id["a2"]["offset"] is not None
    job_a = torch.load(dump / "job-0.pt")
    a = res["prefixes"]["a"]
    sfx = {"a1": res["suffixes"][2], "a2": res["suffixes"][3]}
    for rid in ("a1", "a2"):
        _check_against_reference(reference_model, a, job_a["keep"], job_a["n_protected"], [by_id[rid]], [sfx[rid]])
    for r, b in zip(res["requests"], base["requests"], strict=True):
        if r["id"] in ("b1", "p1"):  # not on a compacted prefix: what vLLM alone gives (batch effects ~1e-6)
            assert r["offset"] is None and r["tokens"] == b["tokens"]
            assert max(abs(x - y) for x, y in zip(r["logprobs"], b["logprobs"], strict=True)) < 1e-4


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_rows_on_two_compacted_prefixes_decode_together_correctly(tiny_model_dir, tmp_path, reference_model,
                                                                  backend):
    """Two `pair` stores' requests and a plain request in the same decode steps (CPU default: every row on
    every store in one call of vLLM's CPU kernel; `torch`: the step's decode rows on every store in one
    pass): each request equals transformers on its own prefix's kept pairs."""
    res = scenario(tiny_model_dir, "stores", "kvzip", 0.5, KVZIP_DUMP_DIR=str(tmp_path),
                   KVZIP_PREFIX_ATTENTION=backend)
    assert res["kvzip"]["finished"]["committed"] == 2 and res["steps_on_both"] >= MAX_TOKENS // 2
    assert res["kvzip"]["prefix_attention"] == {"auto": "vllm_cpu_kernel", "torch": "torch"}[backend]
    by_id = {r["id"]: r for r in res["requests"]}
    sfx = {"a1": res["suffixes"][2], "b1": res["suffixes"][3], "a2": res["suffixes"][4]}
    for job, name, rids in ((0, "a", ("a1", "a2")), (1, "b", ("b1",))):
        dump = torch.load(tmp_path / f"job-{job}.pt")
        assert all(by_id[rid]["offset"] is not None for rid in rids)
        gaps = _check_against_reference(reference_model, res["prefixes"][name], dump["keep"], dump["n_protected"],
                                        [by_id[rid] for rid in rids], [sfx[rid] for rid in rids])
        assert len(gaps) == len(rids)
    assert by_id["p1"]["offset"] is None  # the plain request keeps vLLM's kernel (checked against `none` in mixed)


def test_many_requests_on_one_prefix_take_the_cascade_correctly(tiny_model_dir, tmp_path, reference_model):
    """33 requests decoding on one `pair` prefix take the cascade (each run read once for all of them), a late
    request on it prefills through vLLM's kernel in the same steps, a plain request beside: each request on the
    prefix equals transformers on its kept pairs."""
    from tests.integrations.vllm.run_kvzip import CROWD

    # the test prefix's runs are short (the kernel reads those from cache: `auto` keeps it), so force the cascade
    res = scenario(tiny_model_dir, "crowd", "kvzip", 0.5, KVZIP_DUMP_DIR=str(tmp_path), KVZIP_CPU_CASCADE="always")
    assert res["kvzip"]["finished"]["committed"] == 1 and res["cascade_steps"] >= MAX_TOKENS // 2
    assert res["mixed_steps"] >= 1  # the late request's prefill (and p1) beside the cascade
    dump = torch.load(tmp_path / "job-0.pt")
    on_a = [r for r in res["requests"] if r["id"] != "p1"]
    assert len(on_a) == CROWD + 1 and all(r["offset"] is not None for r in on_a)
    gaps = _check_against_reference(reference_model, res["prefixes"]["a"], dump["keep"], dump["n_protected"], on_a,
                                    [res["suffixes"][r["id"]] for r in on_a])
    assert len(gaps) == CROWD + 1


@pytest.fixture(scope="module")
def sliced_runs(tiny_model_dir, tmp_path_factory):
    """The `sliced` scenario with scoring slices of 32 tokens, and with slicing off (0). The sliced run allows
    any slowdown, so slices share the decoding clients' steps whatever this machine's step times (the gate's
    timing rules are tested in tests/core/test_slicing.py)."""
    out = {}
    for step in (32, 0):
        dump = tmp_path_factory.mktemp(f"kvzip_sliced_{step}")
        res = scenario(tiny_model_dir, "sliced", "kvzip", 0.5, KVZIP_DUMP_DIR=str(dump),
                       KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS=str(step),
                       KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN="1000")
        out[step] = (res, torch.load(next(iter(sorted(dump.glob("job-*.pt"))))))
    return out


def test_scoring_runs_in_slices_after_client_prefills(sliced_runs):
    """Issue 17: a job's scoring never shares a step with a client prefill (held), and beside decoding
    clients it adds at most the step budget; the job still commits."""
    res, _ = sliced_runs[32]
    steps = res["steps"]
    assert res["kvzip"]["finished"]["committed"] == 2 and res["late_added"]
    with_clients = [st for st in steps if st["scoring"] and st["clients"]]
    assert len(with_clients) >= 3  # scoring went on beside the decoding clients, in several slices
    assert all(st["scoring"] <= 32 for st in with_clients)
    assert all(st["scoring"] == 0 for st in steps if st["client_prefill"])  # client prefills first
    assert any("c2" in st["client_prefill"] for st in steps)  # the late request was admitted mid-job
    assert res["gate"]["held_steps"] >= 1 and res["gate"]["forced"] == 0
    assert res["pool"]["referenced"] == []
    # without slicing, a scoring prefill runs whole beside the decoding clients
    full, _ = sliced_runs[0]
    assert max(st["scoring"] for st in full["steps"] if st["clients"]) > 32


def test_scoring_alone_runs_in_idle_slices(sliced_runs):
    """A job on an otherwise idle server scores in slices of at most the step tokens (vLLM would run the
    scoring prefill whole, and a request arriving meanwhile would wait for all of it): the step's token
    budget is lowered to the gate's idle slice."""
    res, _ = sliced_runs[32]
    alone = [st["scoring"] for st in res["alone_steps"] if st["scoring"] and not st["clients"]]
    assert len(alone) >= 4 and max(alone) <= 32, alone
    assert res["pool"]["referenced"] == []
    full, _ = sliced_runs[0]
    whole = [st["scoring"] for st in full["alone_steps"] if st["scoring"] and not st["clients"]]
    assert whole and max(whole) > 32, whole


def test_sliced_scoring_keeps_the_same_pairs(sliced_runs):
    """Scores do not depend on the slicing (each repeat query sees the same keys): the same kept pairs."""
    (_, sliced), (_, whole) = sliced_runs[32], sliced_runs[0]
    assert torch.equal(sliced["keep"], whole["keep"])
    torch.testing.assert_close(sliced["scores"], whole["scores"], rtol=1e-5, atol=1e-6)


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


def test_a_worker_that_cannot_compact_turns_the_whole_engine_off(tiny_model_dir, none_seq):
    """The worker rejects its KV layout (as on vLLM 0.33 CUDA before the 4-D views were supported): the
    scheduler is told once, starts no scoring pass, holds nothing, and the engine serves as `none`."""
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_FAULT_INJECTION="kv_layout")
    state = res["kvzip"]
    assert state["disabled"] == "kv_layout"
    assert state["jobs_live"] == 0 and state["compacted"] == [] and not any(state["finished"].values())
    assert res["log"].count("reported by a worker") == 1
    assert "scoring" not in "".join(line for line in res["log"].splitlines() if "kvzip-plugin: job" in line)
    assert [r["tokens"] for r in res["requests"]] == [r["tokens"] for r in none_seq["requests"]]
    assert res["pool"] == none_seq["pool"]


def test_two_cache_salts_never_share_compacted_blocks(tiny_model_dir):
    res = scenario(tiny_model_dir, "salts", "kvzip", 0.5)
    a, b = res["requests"]["a"], res["requests"]["b"]
    assert len(res["kvzip_after_a"]["compacted"]) == 1 and [r["id"] for r in _adopted({"requests": a})]
    assert b[0]["num_cached_tokens"] == 0  # other salt: not even the original blocks are shared
    assert _adopted({"requests": b}) == []
    compacted = res["kvzip"]["compacted"]
    block_sets = [set(p["blocks"]) for p in compacted]
    assert all(x.isdisjoint(y) for i, x in enumerate(block_sets) for y in block_sets[i + 1:])


@pytest.mark.parametrize("step_tokens", ["0", "256"], ids=["unsliced", "sliced"])
def test_no_block_leaks_after_random_requests_aborts_and_compactions(tiny_model_dir, step_tokens):
    """Also with sliced scoring: held scoring requests keep their rows, so vLLM never admits past max_num_seqs
    (it asserted `len(self.running) <= max_num_running_reqs` before the hold lowered its admission bound)."""
    res = scenario(tiny_model_dir, "churn", "kvzip", 0.5, KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS=step_tokens)
    state, pool = res["kvzip"], res["pool"]
    assert state["finished"]["committed"] >= 1 and res["aborted"] >= 5  # compactions and aborts happened
    assert state["jobs_live"] == 0 and state["offsets"] == {}
    assert pool["referenced"] == [] and pool["free"] == pool["num_blocks"] - 1  # all but the null block
    assert math.isfinite(res["finished"])


def test_reset_with_running_requests_cancels_the_job_and_succeeds(tiny_model_dir, none_seq):
    """`/reset_prefix_cache?reset_running_requests=true&reset_external=true` while a job scores: before the
    fix vLLM raised "Failed to reset KV cache even when all the running requests are preempted" (HTTP 500)
    because the job pinned its source blocks. Now the job is cancelled and rolled back first, the reset
    succeeds as without the plugin, the preempted client request still gets its answer."""
    res = scenario(tiny_model_dir, "cancel", "kvzip", 0.5, KVZIP_TEST_RESET="running")
    state = res["kvzip"]
    assert res["jobs_before_reset"] == 1 and res["reset"] is True, res["reset"]
    assert state["finished"]["cancelled"] == 1 and state["finished"]["committed"] == 0
    assert state["compacted"] == [] and state["jobs_live"] == 0
    assert res["pool"]["referenced"] == [] and res["pool"]["free"] == res["pool"]["num_blocks"] - 1
    r0, r2 = res["requests"]
    assert r0["tokens"] == none_seq["requests"][0]["tokens"] and r2["tokens"] == none_seq["requests"][2]["tokens"]
    assert res["r1_tokens"] == none_seq["requests"][1]["tokens"]
    assert r2["offset"] is None
    assert "job 0 cancelled: prefix cache reset" in res["log"]


def test_a_refused_reset_leaves_the_job_and_the_compacted_prefix(tiny_model_dir, none_seq):
    """`reset_external=true` alone while a client request runs: vLLM refuses the reset (success false, as
    without the plugin). The plugin's state follows what vLLM did: before the fix it cancelled the job
    and forgot every compacted prefix anyway (each document was then compressed again)."""
    res = scenario(tiny_model_dir, "cancel", "kvzip", 0.5, KVZIP_TEST_RESET="refused")
    state = res["kvzip"]
    assert res["jobs_before_reset"] == 1 and res["reset"] is False, res["reset"]
    assert state["finished"]["committed"] == 1 and state["finished"]["cancelled"] == 0
    assert len(state["compacted"]) == 1 and state["compacted"][0]["alive"]
    assert res["requests"][1]["offset"] is not None  # r2 is served by the compacted prefix
    assert res["r1_tokens"] == none_seq["requests"][1]["tokens"]
    assert res["pool"]["referenced"] == []


def test_unsupported_engine_runs_uncompressed(tiny_model_dir, none_seq):
    """Fail closed: without vLLM's prefix caching KVzip cannot share a compacted prefix."""
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_TEST_PREFIX_CACHING="0")
    assert res["kvzip"]["disabled"] == "prefix_caching_disabled" and res["kvzip"]["compacted"] == []
    assert res["log"].count("KV compression disabled on this engine (prefix_caching_disabled)") == 1  # one line
    assert [r["tokens"] for r in res["requests"]] == [r["tokens"] for r in none_seq["requests"]]
    assert _adopted(res) == []


def test_a_trigger_no_prefix_can_reach_turns_kvzip_off_with_one_line(tiny_model_dir, none_seq):
    """`--kv-compression-min-prefix-tokens` not below the context length: no prefix could ever be compressed,
    so the engine says so once at start (and counts the fallback) instead of starting silently."""
    res = scenario(tiny_model_dir, "sequential", "kvzip", 0.5, KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS="1024")
    assert res["kvzip"]["disabled"] == "min_prefix_tokens_above_context_length"
    line = "KV compression disabled on this engine (min_prefix_tokens_above_context_length)"
    assert res["log"].count(line) == 1, res["log"][-3000:]
    assert "--kv-compression-min-prefix-tokens 1024 is not below the context length 1024" in res["log"]
    assert [r["tokens"] for r in res["requests"]] == [r["tokens"] for r in none_seq["requests"]]
