# SPDX-License-Identifier: Apache-2.0
"""`kvzip_plugin.eval.loadgen`: the deterministic multi-tenant workload, the `/metrics` parser on a real
exposition made by `PromMetrics`, and the streaming client against a small real HTTP server that
speaks the OpenAI streaming format (no serving engine needed)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvzip_plugin.eval.loadgen import (
    LoadConfig,
    MetricsPoller,
    build_workload,
    format_report,
    parse_metrics,
    run_load,
    stream_chat,
    summarize,
    wait_healthy,
    wait_kvzip_job,
)
from kvzip_plugin.metrics import KVzipStats, PromMetrics

# ----------------------------------------------------------------------------- workload


def test_workload_is_deterministic_and_round_robin():
    a = build_workload(3, 4, facts=16, seed=1)
    assert a == build_workload(3, 4, facts=16, seed=1)
    assert a != build_workload(3, 4, facts=16, seed=2)
    assert len(a) == 12
    assert [(r.tenant, r.question) for r in a[:4]] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    for t in range(3):
        mine = [r for r in a if r.tenant == t]
        assert len({r.system for r in mine}) == 1  # one byte-identical system prompt per tenant
        assert len({r.user for r in mine}) == 4  # distinct questions
        for r in mine:  # every question is answerable from the tenant's own document
            key = r.user.removeprefix("What is the secret code of ").rstrip("?")
            assert f"The secret code of {key} is {r.answer}." in r.system
    systems = [a[t].system for t in range(3)]
    assert len(set(systems)) == 3
    # tenants share no more than the first words of the template: their names differ at once
    assert all(systems[i][:60] != systems[j][:60] for i in range(3) for j in range(i))
    assert all(r.cache_salt is None for r in a)
    salted = build_workload(3, 4, facts=16, seed=1, cache_salt=True)
    assert [r.cache_salt for r in salted[:3]] == ["tenant-0", "tenant-1", "tenant-2"]
    with pytest.raises(ValueError):
        build_workload(2, 20, facts=16)
    with pytest.raises(ValueError):
        build_workload(0, 1)


def test_chat_template_renders_a_shared_token_prefix(tokenizer):
    reqs = build_workload(2, 3, facts=8, seed=0)
    ids = [tokenizer.apply_chat_template(r.messages(), tokenize=True, add_generation_prompt=True, return_dict=False)
           for r in reqs]
    system_ids = tokenizer.apply_chat_template([reqs[0].messages()[0]], tokenize=True, return_dict=False)

    def common(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    # tenant 0, questions 0 and 1 (positions 0 and 2): the whole rendered system message is shared
    assert common(ids[0], ids[2]) >= len(system_ids) - 1
    assert common(ids[0], ids[1]) < len(system_ids) // 4  # tenant 0 vs tenant 1


# ----------------------------------------------------------------------------- /metrics


def _engine_registry() -> tuple[CollectorRegistry, PromMetrics, dict]:
    """A registry with the kvzip series (the real PromMetrics) and vLLM-named engine series."""
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    kv = PromMetrics("vllm:", labels, registry=reg)
    eng = {
        "usage": Gauge("vllm:kv_cache_usage_perc", "KV-cache usage.", labels, registry=reg),
        "running": Gauge("vllm:num_requests_running", "running", labels, registry=reg),
        "hits": Counter("vllm:prefix_cache_hits", "hits", labels, registry=reg),
        "queries": Counter("vllm:prefix_cache_queries", "queries", labels, registry=reg),
        "preempt": Counter("vllm:num_preemptions", "preemptions", labels, registry=reg),
        "itl": Histogram("vllm:inter_token_latency_seconds", "itl", labels, registry=reg),
        "info": Gauge("vllm:cache_config_info", "cache config", ["block_size", "num_gpu_blocks", "engine"],
                      registry=reg),
    }
    eng["info"].labels("32", "728", "0").set(1)
    return reg, kv, eng


LV = ["smol", "0"]


def test_metrics_summary_from_a_real_exposition():
    reg, kv, eng = _engine_registry()
    kv.observe(KVzipStats(prefixes_compressed=1, blocks_saved=10, bytes_saved=1 << 20,
                          jobs={"submitted": 2, "committed": 1}, achieved_ratios=[0.25],
                          scoring_seconds=[2.0], scoring_to_prefill=[3.0], compressed_hits=1,
                          decode_step_seconds_full=[0.5], fallbacks={"sliding_window": 1}), LV)
    eng["hits"].labels(*LV).inc(100)
    eng["queries"].labels(*LV).inc(400)
    eng["itl"].labels(*LV).observe(0.125)
    before = parse_metrics(generate_latest(reg).decode())

    kv.observe(KVzipStats(prefixes_compressed=2, blocks_saved=24, bytes_saved=3 << 20, jobs_queued=1,
                          jobs_running=0, jobs={"submitted": 3, "committed": 2, "failed": 1},
                          achieved_ratios=[0.25, 0.5], scoring_seconds=[1.0, 2.0], compaction_seconds=[0.25],
                          scoring_to_prefill=[1.5, 2.5], compressed_hits=6,
                          decode_step_seconds_compressed=[0.25, 0.125], decode_step_seconds_full=[0.5],
                          fallbacks={"sliding_window": 2, "mla": 1}), LV)
    eng["hits"].labels(*LV).inc(300)
    eng["queries"].labels(*LV).inc(400)
    eng["itl"].labels(*LV).observe(0.25)
    eng["itl"].labels(*LV).observe(0.75)
    eng["usage"].labels(*LV).set(0.125)
    eng["preempt"].labels(*LV).inc(2)
    after = parse_metrics(generate_latest(reg).decode())

    assert after.get("vllm:kvzip_jobs_total") == 9  # summed over outcomes
    assert after.get("vllm:kvzip_jobs_total", outcome="committed") == 3
    assert after.get("vllm:no_such_metric") is None

    peaks = {"vllm:kv_cache_usage_perc": 0.5, "vllm:num_requests_running": 7.0, "vllm:kvzip_blocks_saved": 30.0}
    s = summarize(before, after, peaks)
    e, k = s["engine"], s["kvzip"]
    assert (e["num_gpu_blocks"], e["block_size"]) == (728, 32)
    assert e["kv_cache_usage_perc"] == 0.125 and e["kv_cache_usage_perc_peak"] == 0.5
    assert e["kv_blocks_in_use_peak"] == 364
    assert (e["prefix_cache_hits"], e["prefix_cache_queries"], e["prefix_cache_hit_rate"]) == (300, 400, 0.75)
    assert e["num_requests_running_peak"] == 7 and e["num_requests_waiting_peak"] is None
    assert e["num_preemptions"] == 2
    assert e["inter_token_latency_ms"] == 500.0  # (0.25 + 0.75) / 2, the first interval excluded
    assert e["time_to_first_token_ms"] is None and e["prompt_tokens"] is None  # not exported here
    assert k["exported"] is True
    assert k["prefixes_compressed"] == 2
    assert (k["blocks_saved"], k["blocks_saved_peak"], k["bytes_saved"]) == (24, 30, 3 << 20)
    assert k["jobs"] == {"submitted": 3, "committed": 2, "failed": 1, "cancelled": 0, "rejected": 0}
    assert (k["jobs_queued"], k["jobs_running"]) == (1, 0)
    assert k["achieved_ratio_mean"] == 0.375
    assert k["scoring_seconds_total"] == 3.0 and k["scoring_seconds_mean"] == 1.5
    assert k["compaction_seconds_mean"] == 0.25
    assert k["scoring_to_prefill_mean"] == 2.0
    assert k["compressed_prefix_hits"] == 6
    assert k["decode_ms_per_token"] == {"compressed": 187.5, "full": 500.0}
    assert k["decode_compressed_over_full"] == 0.375
    assert k["fallbacks"] == {"mla": 1, "sliding_window": 2}

    totals = summarize(None, after)["kvzip"]  # no `before`: totals since start
    assert totals["prefixes_compressed"] == 3 and totals["jobs"]["committed"] == 3
    assert totals["decode_ms_per_token"]["full"] == 500.0


def test_summary_of_a_server_without_kvzip():
    reg = CollectorRegistry()
    Gauge("vllm:kv_cache_usage_perc", "usage", ["engine"], registry=reg).labels("0").set(0.25)
    s = summarize(None, parse_metrics(generate_latest(reg).decode()))
    assert s["engine"]["kv_cache_usage_perc"] == 0.25 and s["engine"]["num_gpu_blocks"] is None
    assert s["kvzip"]["exported"] is False
    assert s["kvzip"]["prefixes_compressed"] is None and s["kvzip"]["fallbacks"] == {}
    assert s["kvzip"]["decode_ms_per_token"] == {"compressed": None, "full": None}


# ----------------------------------------------------------------------------- a fake OpenAI server


class FakeOpenAIServer:
    """A real HTTP/1.1 server in a thread: `/health`, `/v1/models`, `/metrics` and a streaming
    `/v1/chat/completions` (chunked SSE, one token per chunk, `delay` seconds apart) that answers
    each question with the code found in the system prompt. Records the request bodies and the
    highest number of requests in flight."""

    def __init__(self, delay: float = 0.01, tokens: int = 4, model: str = "fake-model") -> None:
        self.delay, self.tokens, self.model = delay, tokens, model
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        reg, kv, eng = _engine_registry()
        self.registry, self.kv, self.eng = reg, kv, eng
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": outer.model}]}).encode())
                elif self.path == "/metrics":
                    self._send(200, generate_latest(outer.registry), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if self.path != "/v1/chat/completions" or body.get("model") != outer.model:
                    self._send(400, json.dumps({"error": {"message": "bad model"}}).encode())
                    return
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.eng["running"].labels(*LV).set(outer.in_flight)
                self.counted = True
                try:
                    self._stream(body)
                finally:
                    self._leave()

            def _leave(self) -> None:
                """Stop counting this request (before its last bytes: the client may send the next one
                as soon as it reads them)."""
                with outer.lock:
                    if self.counted:
                        self.counted = False
                        outer.in_flight -= 1
                        outer.eng["running"].labels(*LV).set(outer.in_flight)

            def _chunk(self, obj) -> None:
                data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream(self, body: dict) -> None:
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                key = re.search(r"secret code of (\S+)\?", user).group(1)
                code = re.search(rf"The secret code of {re.escape(key)} is (\d+)\.", system).group(1)
                pieces = (["The code is ", code] + [" ok"] * outer.tokens)[: outer.tokens]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": outer.model}
                self._chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                for i, piece in enumerate(pieces):
                    time.sleep(outer.delay)
                    finish = "length" if i == len(pieces) - 1 else None
                    self._chunk({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                                      "finish_reason": finish}]})
                usage = {"prompt_tokens": len(system.split()), "completion_tokens": len(pieces),
                         "total_tokens": len(system.split()) + len(pieces)}
                self._chunk({**base, "choices": [], "usage": usage})
                self._leave()
                self._chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def fake_server():
    with FakeOpenAIServer() as srv:
        yield srv


def test_stream_chat_times_one_request(fake_server):
    fake_server.delay = 0.03
    (req,) = build_workload(1, 1, facts=8, seed=0, cache_salt=True)
    res = stream_chat(fake_server.url, req, "fake-model", max_tokens=4, ignore_eos=True)
    assert res.ok and res.error is None
    assert res.text == f"The code is {req.answer} ok ok" and res.correct
    assert res.completion_tokens == 4 and res.prompt_tokens > 0
    assert res.ttft_s >= 0.025 and res.latency_s >= 4 * 0.025
    # 3 gaps of ~30 ms between the 4 token chunks
    assert 25 <= res.decode_ms_per_token < 150
    body = fake_server.bodies[-1]
    assert body["stream"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["cache_salt"] == "tenant-0"
    assert body["messages"] == req.messages()


def test_stream_chat_reports_errors_without_raising(fake_server):
    (req,) = build_workload(1, 1, facts=8)
    res = stream_chat(fake_server.url, req, "other-model", max_tokens=4)
    assert not res.ok and res.error.startswith("HTTP 400") and "bad model" in res.error
    dead = stream_chat("http://127.0.0.1:9", req, "fake-model", max_tokens=4, timeout=2)
    assert not dead.ok and "URLError" in dead.error


def test_run_load_end_to_end(fake_server):
    fake_server.kv.observe(KVzipStats(prefixes_compressed=1, blocks_saved=5, jobs={"committed": 1}), LV)
    assert wait_healthy(fake_server.url, timeout=5) < 5
    cfg = LoadConfig(url=fake_server.url, tenants=3, questions=2, concurrency=3, max_tokens=4, facts=8,
                     metrics_interval=0.02)
    report = run_load(cfg)
    assert report.model == "fake-model"  # from /v1/models
    assert [(r.tenant, r.question) for r in report.results] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert all(r.ok and r.correct for r in report.results)
    assert 2 <= fake_server.max_in_flight <= 3
    s = report.client_summary()
    assert (s["requests"], s["ok"], s["errors"], s["correct"], s["output_tokens"]) == (6, 6, 0, 6, 24)
    assert s["decode_ms_per_token_p50"] > 0 and s["ttft_ms_first_question_p50"] > 0
    m = report.metrics
    assert m["kvzip"]["exported"] and m["kvzip"]["blocks_saved"] == 5
    assert m["kvzip"]["prefixes_compressed"] == 0  # a delta over the load: nothing new
    assert m["engine"]["num_gpu_blocks"] == 728
    assert report.scrapes >= 1 and m["engine"]["num_requests_running_peak"] >= 1
    text = format_report(report)
    assert "6 ok, 0 failed" in text and "answers containing the expected code: 6/6" in text
    assert "blocks saved now 5" in text
    json.dumps(report.to_dict())  # serialisable


def test_poller_keeps_peaks(fake_server):
    gauge = fake_server.eng["running"].labels(*LV)
    with MetricsPoller(fake_server.url, interval=0.01) as poller:
        gauge.set(9)
        deadline = time.monotonic() + 2
        while "vllm:num_requests_running" not in poller.peaks and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        gauge.set(1)
    assert poller.peaks["vllm:num_requests_running"] == 9
    assert poller.scrapes >= 2 and poller.errors == 0
    seen = [v.get("vllm:num_requests_running") for _, v in poller.samples]
    assert len(seen) == poller.scrapes and 9 in seen and seen[-1] == 1  # every scrape, in order, last after the load
    times = [t for t, _ in poller.samples]
    assert times == sorted(times)


def test_wait_kvzip_job_sees_a_queued_job_and_gives_up_without_one(fake_server):
    fake_server.kv.observe(KVzipStats(jobs_queued=0, jobs_running=0), LV)
    t0 = time.monotonic()
    assert not wait_kvzip_job(fake_server.url, timeout=0.3, interval=0.05)
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()  # the caller's stop condition ends the wait early (the fault suite: its sender is done)
    assert not wait_kvzip_job(fake_server.url, timeout=30, interval=0.05, stop=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 5
    fake_server.kv.observe(KVzipStats(jobs_queued=1, jobs_running=0), LV)
    assert wait_kvzip_job(fake_server.url, timeout=5, interval=0.05)
    assert not wait_kvzip_job("http://127.0.0.1:9", timeout=0.2, interval=0.05)  # no server: no job, no raise


def test_wait_healthy_gives_up():
    with pytest.raises(TimeoutError):
        wait_healthy("http://127.0.0.1:9", timeout=0.2, interval=0.05)
    with pytest.raises(RuntimeError, match="exited"):
        wait_healthy("http://127.0.0.1:9", timeout=5, alive=lambda: False, interval=0.05)
