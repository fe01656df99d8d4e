# SPDX-License-Identifier: Apache-2.0
"""The Prometheus rules: `promtool check rules` and `check config`, `promtool test rules` (each alert fires
on synthetic sick series and not on healthy ones), the Helm chart's copy, the alerts the issue asks
for, and only series the plugin exports. Their PromQL against real servers: test_prometheus_e2e.py."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import (
    CHART,
    PROMETHEUS_CONFIG,
    RULES,
    RULES_TEST,
    metric_names,
    need_tool,
    plugin_sample_names,
)


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool"), *args], cwd=RULES.parent, capture_output=True, text=True,
                          timeout=120)


def test_promtool_check_rules():
    proc = _promtool("check", "rules", RULES.name)
    assert proc.returncode == 0 and "SUCCESS: 12 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_check_config():
    proc = _promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests():
    proc = _promtool("test", "rules", RULES_TEST.name)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test():
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in _rules() if "alert" in r}


def test_the_issue_alerts():
    """Jobs failing, compression falling back to uncompressed, decode speedup below 1, queue growing."""
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert set(alerts) >= {"KVzipJobsFailing", "KVzipCompressionFallback", "KVzipDecodeSlowerOnCompressedPrefixes",
                           "KVzipJobQueueGrowing", "KVzipPrefixesLeftUncompressed"}
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_use_only_exported_series():
    records = {r["record"] for r in _rules() if "record" in r}
    used = set().union(*(metric_names(r["expr"]) for r in _rules()))
    assert used and used <= plugin_sample_names(), used - plugin_sample_names()
    # every alert compares recorded signals (which the e2e test proves are non-empty on a real server)
    for rule in _rules():
        if "alert" in rule:
            assert not metric_names(rule["expr"]), f"{rule['alert']}: use a recording rule"
            assert any(name in rule["expr"] for name in records), rule["alert"]


def test_chart_copy_is_identical():
    assert (CHART / "files" / "kvzip-rules.yml").read_text() == RULES.read_text(), \
        "cp deploy/prometheus/kvzip-rules.yml deploy/helm/kvzip-vllm/files/kvzip-rules.yml"
