# SPDX-License-Identifier: Apache-2.0
"""bench_during_job.py's own logic (no server): the job document, which part of a load ran beside a job,
the job / no-job ratios over repeats and the target check, the client's load arguments. The engines' clients
and servers themselves run in the CI's smoke tests of `engine_clients.py`."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_during_job")


def test_document_has_the_asked_length_and_is_seeded(bench):
    from transformers import AutoTokenizer

    from kvzip_plugin.hf.models import demo_model_dir

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    doc = bench.document(tok, 300, seed=7)
    n = len(tok.encode(doc, add_special_tokens=False))
    assert 295 <= n <= 305  # decode/encode may merge a token at the cut
    assert bench.document(tok, 300, seed=7) == doc and bench.document(tok, 300, seed=8) != doc


def test_active_fraction_counts_only_scrapes_inside_the_load(bench):
    p = "vllm:"
    samples = [(0.0, {f"{p}kvzip_jobs_running": 1.0}),  # before the load
               (1.0, {f"{p}kvzip_jobs_queued": 1.0, f"{p}kvzip_jobs_running": 0.0}),
               (2.0, {f"{p}kvzip_jobs_running": 1.0}),
               (3.0, {f"{p}kvzip_jobs_running": 0.0}),
               (4.0, {}),  # a scrape without the series: no job
               (9.0, {f"{p}kvzip_jobs_running": 1.0})]  # after the load
    assert bench.active_fraction(samples, p, 1.0, 4.0) == 0.5
    assert bench.active_fraction(samples, p, 5.0, 6.0) is None
    assert not bench.jobs_active({"sglang:kvzip_jobs_running": 1.0}, p)  # loadgen's predicate, by prefix


def _repeat(bench, rep, job, base, started=True, frac=1.0, load_s=(30.0, 20.0), stalls=(0, 0.0)):
    rec = {"repeat": rep, "phases": {
        "job": {"trigger": {"started": started}, "client": {**job, "failed": 0}, "job_active_fraction": frac,
                "load_s": load_s[0], "host_stalls": {"count": stalls[0], "max_s": stalls[1], "total_s": stalls[1]}},
        "no-job": {"client": {**base, "failed": 0}, "job_active_fraction": 0.0, "load_s": load_s[1]}}}
    rec["ratios"] = bench.ratios(rec)
    return rec


def test_ratios_and_target_over_repeats(bench):
    base = {"p99_itl_ms": 100.0, "p99_ttft_ms": 1000.0, "p50_itl_ms": 50.0, "p50_ttft_ms": 500.0, "p50_tpot_ms": 50.0}
    runs = [_repeat(bench, 0, {**base, "p99_itl_ms": 110.0, "p99_ttft_ms": 1100.0}, base),
            _repeat(bench, 1, {**base, "p99_itl_ms": 300.0, "p99_ttft_ms": 1000.0}, base, stalls=(1, 1.5)),
            _repeat(bench, 2, {**base, "p99_itl_ms": 100.0, "p99_ttft_ms": 900.0}, base),
            _repeat(bench, 3, {**base, "p99_itl_ms": 900.0}, base, started=False)]  # no job: left out
    assert runs[0]["ratios"]["itl_p99_during_job_ratio"] == pytest.approx(1.1)
    s = bench.summary(runs)
    assert s["repeats"] == [0, 1, 2]
    assert s["itl_p99_during_job_ratio"] == pytest.approx(1.1)
    assert s["itl_p99_during_job_ratio_per_repeat"] == pytest.approx([1.1, 3.0, 1.0])
    assert s["ttft_during_job_ratio"] == pytest.approx(1.0)
    assert s["load_s_during_job_ratio"] == pytest.approx(1.5)
    assert s["meets_target"] is False and s["failed_requests"] == 0  # the same load took 1.5x as long
    # the host's own stalls per phase and repeat (the no-job phases here recorded none: reported as unknown)
    assert [h["max_s"] for h in s["host_stalls"]["job"]] == [0.0, 1.5, 0.0]
    assert [h["count"] for h in s["host_stalls"]["no-job"]] == [None, None, None]
    quick = [_repeat(bench, r["repeat"], r["phases"]["job"]["client"], base, load_s=(22.0, 20.0)) for r in runs[:3]]
    assert bench.summary(quick)["meets_target"] is True
    worse = bench.summary([_repeat(bench, 0, {**base, "p99_itl_ms": 130.0}, base, load_s=(20.0, 20.0))])
    assert worse["meets_target"] is False and worse["job_active_fraction"] == [1.0]
    assert bench.summary([_repeat(bench, 0, base, {})])["meets_target"] is None  # no baseline numbers: no verdict
    md = bench.markdown({"summary": s, "meta": {}, "settings": {
        "job_prefix_len": 2048, "engine": "vllm", "num_prompts": 12, "input_len": 256, "output_len": 32,
        "concurrency": 4}})
    assert "itl_p99_during_job_ratio | 1.10" in md
    assert "longest): job: 0 / 0.00 s, 1 / 1.50 s, 0 / 0.00 s." in md
    assert "Inter-token gaps" not in md  # no client recorded its gaps (SGLang's, or an older run)
    # the clients' long inter-token gaps per phase (vLLM's client, bench_engine_clients.run_client)
    gaps = {"count": 2, "max_s": 1.4, "ending_at_first_tokens": 2, "gaps": [[1.4, 3], [1.3, 3]]}
    none = {"count": 0, "max_s": 0.0, "ending_at_first_tokens": 0, "gaps": []}
    with_gaps = [_repeat(bench, 0, {**base, "itl_gaps": none}, {**base, "itl_gaps": gaps})]
    s = bench.summary(with_gaps)
    assert s["itl_gaps"] == {"job": [{"count": 0, "max_s": 0.0, "ending_at_first_tokens": 0}],
                             "no-job": [{"count": 2, "max_s": 1.4, "ending_at_first_tokens": 2}]}
    md = bench.markdown({"summary": s, "meta": {}, "settings": {
        "job_prefix_len": 2048, "engine": "vllm", "num_prompts": 12, "input_len": 256, "output_len": 32,
        "concurrency": 4}})
    assert "longest): no-job: 2 / 2 / 1.40 s; job: 0 / 0 / 0.00 s." in md


def test_the_load_is_the_clients_random_set_and_the_pool_holds_job_and_load(bench):
    args = argparse.Namespace(engine="vllm", model="/m", input_len=256, output_len=32, concurrency=4, seed=0,
                              block_size=32, max_model_len=2560, job_prefix_len=2048, prefix_len=None,
                              suffix_len=None, num_prefixes=None)
    clients = load_benchmark("bench_engine_clients")
    a = clients.client_argv(bench.client_args(args, 5), "control", 12, "http://h:1")
    assert a[a.index("--dataset-name") + 1] == "random" and a[a.index("--random-input-len") + 1] == "256"
    assert a[a.index("--seed") + 1] == "5" and a[a.index("--random-output-len") + 1] == "32"
    assert bench.pool_blocks(args) == 3 * 66 + 2 * 4 * 10  # document + scoring copy + store, and the load
