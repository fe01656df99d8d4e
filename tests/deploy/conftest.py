# SPDX-License-Identifier: Apache-2.0
"""Fixtures and helpers of the deploy/ tests: paths, the dashboards' queries, tool look-ups, and the real
Prometheus + engine servers of the end-to-end tests (`e2e_stack`).

The tools come from scripts/setup_deploy.sh (Debian's prometheus + promtool and docker-compose,
PyPI's grafana-foundation-sdk, helm-python-sdk and kubernetes-validate); a test whose tool is missing
skips and says which one and how to install it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kvzip-vllm.json"
RULES = DEPLOY / "prometheus" / "kvzip-rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "kvzip-rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
CHART = DEPLOY / "helm" / "kvzip-vllm"
SETUP_HINT = "run `bash scripts/setup_deploy.sh`"


@dataclass(frozen=True)
class EngineFiles:
    """The deploy/ files of one serving engine, and how its plugin series are named and labelled."""

    key: str
    prefix: str
    dashboard: Path
    rules: Path
    rules_test: Path
    labelnames: tuple[str, ...]
    """Labels the engine's glue puts on every `<prefix>kvzip_*` series."""


VLLM = EngineFiles("vllm", "vllm:", DASHBOARD, RULES, RULES_TEST, ("model_name", "engine"))
SGLANG = EngineFiles("sglang", "sglang:", DEPLOY / "grafana" / "kvzip-sglang.json",
                     DEPLOY / "prometheus" / "kvzip-sglang-rules.yml",
                     DEPLOY / "prometheus" / "kvzip-sglang-rules.test.yml",
                     ("cache_type", "tp_rank", "pp_rank", "dp_rank", "model_name"))
ENGINES = {e.key: e for e in (VLLM, SGLANG)}

# a metric name as written in PromQL: `vllm:kvzip_jobs_total`, `sglang:time_to_first_token_seconds_bucket`
METRIC_RE = re.compile(r"\b((?:vllm|sglang):[a-zA-Z_][a-zA-Z0-9_]*)")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed ({SETUP_HINT})")
    return path


def need_module(name: str):
    return pytest.importorskip(name, reason=f"Python package for `{name}` is not installed ({SETUP_HINT})")


def dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def iter_panels(dash: dict) -> Iterator[dict]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every query of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in iter_panels(dash) for t in p.get("targets", [])]


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable substitution for `$name` and `${name}` (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if "$" in expr:
        raise AssertionError(f"unsubstituted variable in {expr!r}")
    return expr


def metric_names(text: str, prefix: str | None = None) -> set[str]:
    """The `vllm:*` / `sglang:*` names in `text` (only those starting with `prefix` when given)."""
    return {n for n in METRIC_RE.findall(text) if prefix is None or n.startswith(prefix)}


def plugin_sample_names(prefix: str = "vllm:", labelnames: tuple[str, ...] = VLLM.labelnames) -> set[str]:
    """Every sample name `PromMetrics(prefix)` can export."""
    from prometheus_client import CollectorRegistry

    from kvzip_plugin.metrics import KVzipStats, PromMetrics

    reg = CollectorRegistry()
    pm = PromMetrics(prefix, list(labelnames), registry=reg)
    pm.observe(KVzipStats(prefixes_compressed=1, blocks_saved=1, bytes_saved=1, jobs_queued=0, jobs_running=0,
                          achieved_ratios=[0.5], scoring_seconds=[1.0], compaction_seconds=[0.1],
                          scoring_to_prefill=[2.0], compressed_hits=1, decode_step_seconds_compressed=[0.01],
                          decode_step_seconds_full=[0.02], fallbacks={"mla": 1}), ["0"] * len(labelnames))
    return {s.name for family in reg.collect() for s in family.samples}


@pytest.fixture(scope="session")
def deploy_tiny_model(tmp_path_factory):
    """The tiny random-weight Llama of the engine integration tests (no download), built once."""
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("deploy_tiny_llama"))


@pytest.fixture(scope="package")
def e2e_stack(request, deploy_tiny_model, tmp_path_factory):
    """One real Prometheus (deploy/prometheus/prometheus.yml, both rule files) scraping the real servers of
    every engine whose end-to-end module is selected (a module names its engine in `E2E_ENGINE`), all started
    together, after each engine's multi-tenant load (the loads run at once). See tests/deploy/e2e.py.
    Package scope: stopped when tests/deploy ends (an idle SGLang scheduler spins a core, which would slow
    every later test)."""
    from tests.deploy import e2e

    engines = sorted({getattr(getattr(item, "module", None), "E2E_ENGINE", None) for item in request.session.items}
                     - {None})
    stack = e2e.start_stack(engines, deploy_tiny_model, tmp_path_factory.mktemp("prometheus_e2e"))
    try:
        stack.run_loads()
        yield stack
    finally:
        stack.stop()
