# SPDX-License-Identifier: Apache-2.0
"""bench_engine_clients.py's own logic (no server): the clients' arguments, the pool sizes, the thread
setup read from a log, and the kvzip / none comparison over alternating repeats. The servers and clients
themselves run in the CI's smoke tests of `engine_clients.py`."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_engine_clients")


def _args(**kw) -> argparse.Namespace:
    base = dict(engine="vllm", model="/m", prefix_len=1024, suffix_len=64, output_len=32, num_prefixes=4,
                concurrency=8, seed=0, block_size=32, max_model_len=2432, tight_fraction=0.6)
    return argparse.Namespace(**{**base, **kw})


def test_client_arguments_per_engine_and_scenario(bench):
    a = bench.client_argv(_args(), "shared", 32, "http://h:1")
    assert a[a.index("--dataset-name") + 1] == "prefix_repetition"
    assert a[a.index("--prefix-repetition-prefix-len") + 1] == "1024"
    assert a[a.index("--max-concurrency") + 1] == "8" and a[a.index("--num-prompts") + 1] == "32"
    assert a[a.index("--metric-percentiles") + 1] == "50,99,100"  # p100 = the maximum (run_client: max_*_ms)
    assert "--save-detailed" in a  # the per-request lists run_client reads the long inter-token gaps from
    warm = bench.client_argv(_args(), "shared", 12, "http://h:1", concurrency=1)
    assert warm[warm.index("--max-concurrency") + 1] == "1" and warm[warm.index("--seed") + 1] == "0"
    c = bench.client_argv(_args(), "control", 32, "http://h:1")
    assert c[c.index("--dataset-name") + 1] == "random" and c[c.index("--random-input-len") + 1] == "1088"
    s = bench.client_argv(_args(engine="sglang"), "tight", 32, "http://h:1")
    assert s[s.index("--dataset-name") + 1] == "generated-shared-prefix"
    assert s[s.index("--gsp-num-groups") + 1] == "4" and s[s.index("--gsp-prompts-per-group") + 1] == "8"
    assert s[s.index("--warmup-requests") + 1] == "0" and "--num-warmups" not in a  # no unmeasured client warm-up
    r = bench.client_argv(_args(engine="sglang"), "control", 32, "u")
    assert r[r.index("--dataset-name") + 1] == "random-ids" and r[r.index("--max-concurrency") + 1] == "8"


def test_tight_pool_holds_less_than_every_prefix_beside_the_running_requests(bench):
    args = _args()
    prefix_blocks = 4 * 1024 // 32
    own = 8 * 4  # 96 own tokens = 3 blocks + 1 for the block boundary, per running request
    assert bench.pool_blocks(args, "tight") == 77 + own < prefix_blocks + own  # ceil(0.6 x 128) = 77
    assert bench.pool_blocks(args, "shared") == 3 * prefix_blocks + 2 * own
    assert bench.pool_blocks(_args(max_model_len=10_000, tight_fraction=0.1), "tight") == -(-10_000 // 32) + 1


def test_thread_setup_is_the_last_binding_the_server_logged(bench, tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "(EngineCore pid=1) WARNING 12-02 23:03:49 [ompmultiprocessing.py:273] Selected CPU core number (2) ...\n"
        "(EngineCore pid=1) INFO 12-02 23:03:49 [ompmultiprocessing.py:185] \tlocal_world_size=1, reserve_cpu_num=2\n"
        "(EngineCore pid=1) INFO 12-02 23:03:49 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0, 1]\n"
        "(EngineCore pid=1) INFO 12-02 23:03:49 [ompmultiprocessing.py:185] \tlocal_world_size=1, reserve_cpu_num=1\n"
        "(EngineCore pid=1) INFO 12-02 23:03:49 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n")
    with log.open("a") as fh:  # SGLang's argument dump is not a thread setup
        fh.write("[2026-12-03 07:00:00] server_args={'model_path': '/m', 'num_threads': 4, 'torch threads': 2}\n")
    setup = bench.thread_setup(log)
    assert setup == {"reserve_cpu_num": "local_world_size=1, reserve_cpu_num=1",
                     "core ids": "local_rank=0, core ids=[0]"}


def _run(scenario, mode, rep, thr, hits=None, setup=None):
    return {"scenario": scenario, "mode": mode, "repeat": rep, "thread_setup": setup or {"core ids": "[0]"},
            "client": {"completed": 8, "failed": 0, "request_throughput": thr},
            "metrics": {"engine": {}, "kvzip": {"compressed_prefix_hits": hits}}}


def test_comparison_pairs_modes_by_repeat_and_reports_the_spread(bench):
    runs = [_run("shared", "none", 0, 2.0), _run("shared", "kvzip", 0, 1.0, hits=4),
            _run("shared", "kvzip", 1, 3.0, hits=4), _run("shared", "none", 1, 2.0),
            _run("shared", "none", 2, 2.0)]  # an unpaired repeat is left out
    comp = bench.compare(runs)["shared"]
    thr = comp["rows"]["request throughput (req/s)"]
    assert comp["repeats"] == [0, 1] and thr["ratios"] == [0.5, 1.5]
    assert (thr["ratio_median"], thr["ratio_min"], thr["ratio_max"]) == (1.0, 0.5, 1.5)
    assert thr["none_median"] == 2.0 and thr["kvzip_median"] == 2.0
    assert comp["rows"]["kvzip: compressed-prefix hits"]["kvzip_median"] == 4
    assert comp["same_thread_setup"] and comp["failed"] == {"none": 0, "kvzip": 0}
    runs[1]["thread_setup"] = {"core ids": "[0, 1]"}
    assert not bench.compare(runs)["shared"]["same_thread_setup"]
    assert "0.50, 1.50" in bench.markdown({"comparison": bench.compare(runs)})


def test_both_clients_numbers_read_under_one_set_of_names(bench):
    vllm = bench.same_names({"median_itl_ms": 5.0, "p50_itl_ms": 5.0, "p100_itl_ms": 90.0, "p99_e2el_ms": 7.0})
    assert (vllm["max_itl_ms"], vllm["p99_e2el_ms"], vllm["p50_itl_ms"]) == (90.0, 7.0, 5.0)
    sgl = bench.same_names({"median_ttft_ms": 3.0, "median_itl_ms": 4.0, "median_tpot_ms": 6.0,
                            "p99_e2e_latency_ms": 8.0})
    assert (sgl["p50_ttft_ms"], sgl["p50_itl_ms"], sgl["p50_tpot_ms"], sgl["p99_e2el_ms"]) == (3.0, 4.0, 6.0, 8.0)
    assert "max_itl_ms" not in sgl  # SGLang's JSON line has no maximum: n/a, never a made-up number


def test_an_engine_that_logs_no_thread_setup_is_not_called_the_same(bench):
    runs = [_run("shared", m, 0, 1.0, setup={}) for m in ("none", "kvzip")]
    for r in runs:
        r["thread_setup"] = {}
    comp = bench.compare(runs)["shared"]
    assert comp["same_thread_setup"] is None
    assert "not logged by the engine" in bench.markdown({"comparison": {"shared": comp}})


def test_capacity_load_asks_new_questions_on_the_warmed_documents(bench, tmp_path):
    """The `capacity` scenario: each tenant's warm-up questions and measured questions share its document (the
    prefix KVzip compresses), no measured prompt repeats a warm-up one (a repeated prompt is not a shared prefix
    to KVzip's admission), tenants take turns, and each client gets its own JSONL."""
    import json

    from kvzip_plugin.hf.models import demo_model_dir

    words = [f"word{i % 997}x{i % 13}" for i in range(20_000)]
    args = _args(model=str(demo_model_dir()), prefix_len=200, num_prefixes=3, min_hits=2, num_prompts=7)
    warm, measured = bench.capacity_prompts(args, text=" ".join(words))
    assert [len(w) for w in warm] == [3, 3, 3] and len(measured) == 7
    docs = [w[0].split("\n\nQuestion")[0] for w in warm]
    assert len(set(docs)) == 3
    assert all(p.startswith(docs[i % 3]) for i, p in enumerate(measured))  # round robin over the tenants
    assert all(q.startswith(docs[k]) for k in range(3) for q in warm[k])
    assert not set(measured) & {q for w in warm for q in w} and len(set(measured)) == 7
    assert bench.capacity_prompts(args, text=" ".join(words)) == (warm, measured)  # seeded
    for engine in ("vllm", "sglang"):
        a = _args(engine=engine, capacity_file=bench.write_capacity_file(_args(engine=engine), measured,
                                                                          tmp_path / f"{engine}.jsonl"))
        argv = bench.client_argv(a, "capacity", 7, "http://h:1")
        assert argv[argv.index("--dataset-name") + 1] == "custom"
        rows = [json.loads(line) for line in a.capacity_file.read_text().splitlines()]
        got = [r["prompt"] for r in rows] if engine == "vllm" else [r["conversations"][0]["content"] for r in rows]
        assert got == measured
    assert bench.pool_blocks(_args(), "capacity") == bench.pool_blocks(_args(), "tight")
    with pytest.raises(ValueError, match="too few"):
        bench.capacity_prompts(args, text=" ".join(words[:500]))
