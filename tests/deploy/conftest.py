# SPDX-License-Identifier: Apache-2.0
"""Fixtures and helpers of the deploy/ tests: paths, the dashboard's queries, tool look-ups.

The tools come from scripts/setup_deploy.sh (Debian's prometheus + promtool and docker-compose,
PyPI's grafana-foundation-sdk, helm-python-sdk and kubernetes-validate); a test whose tool is missing
skips and says which one and how to install it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
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

# a metric name as written in PromQL: `vllm:kvzip_jobs_total`, `vllm:time_to_first_token_seconds_bucket`
METRIC_RE = re.compile(r"\b(vllm:[a-zA-Z_][a-zA-Z0-9_]*)")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed ({SETUP_HINT})")
    return path


def need_module(name: str):
    return pytest.importorskip(name, reason=f"Python package for `{name}` is not installed ({SETUP_HINT})")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


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


def metric_names(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


def plugin_sample_names() -> set[str]:
    """Every sample name `PromMetrics(prefix="vllm:")` can export."""
    from prometheus_client import CollectorRegistry

    from kvzip_plugin.metrics import KVzipStats, PromMetrics

    reg = CollectorRegistry()
    pm = PromMetrics("vllm:", ["model_name", "engine"], registry=reg)
    pm.observe(KVzipStats(prefixes_compressed=1, blocks_saved=1, bytes_saved=1, jobs_queued=0, jobs_running=0,
                          achieved_ratios=[0.5], scoring_seconds=[1.0], compaction_seconds=[0.1],
                          scoring_to_prefill=[2.0], compressed_hits=1, decode_step_seconds_compressed=[0.01],
                          decode_step_seconds_full=[0.02], fallbacks={"mla": 1}), ["m", "0"])
    return {s.name for family in reg.collect() for s in family.samples}


@pytest.fixture(scope="session")
def deploy_tiny_model(tmp_path_factory):
    """The tiny random-weight Llama of the vLLM integration tests (no download), built once."""
    pytest.importorskip("vllm")
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("deploy_tiny_llama"))
