# SPDX-License-Identifier: Apache-2.0
"""The Prometheus rules of both engines (deploy/prometheus/kvzip-rules.yml on `vllm:kvzip_*`,
kvzip-sglang-rules.yml on `sglang:kvzip_*`): `promtool check rules` and `check config`, `promtool test rules`
(each alert fires on synthetic sick series and not on healthy ones), the Helm chart's copy, the alerts the
issue asks for, only series the plugin exports, and the SGLang file being the vLLM one on SGLang's series.
Their PromQL against real servers: test_prometheus_e2e.py and test_prometheus_e2e_sglang.py."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    ENGINES,
    PROMETHEUS_CONFIG,
    RULES,
    SGLANG,
    VLLM,
    EngineFiles,
    metric_names,
    need_tool,
    plugin_sample_names,
)

engines = pytest.mark.parametrize("files", list(ENGINES.values()), ids=list(ENGINES))


def _rules(files: EngineFiles) -> list[dict]:
    return [r for g in yaml.safe_load(files.rules.read_text())["groups"] for r in g["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool"), *args], cwd=RULES.parent, capture_output=True, text=True,
                          timeout=120)


@engines
def test_promtool_check_rules(files):
    proc = _promtool("check", "rules", files.rules.name)
    assert proc.returncode == 0 and "SUCCESS: 12 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_check_config():
    """prometheus.yml loads both engines' rules (and promtool checks them through it)."""
    proc = _promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [f.rules.name for f in ENGINES.values()]
    # SGLang's `sglang:x` samples arrive as `sglang_x` from Prometheus 2.x (client_python#1177): renamed back.
    # test_prometheus_e2e_sglang.py fails without this (Debian's Prometheus 2.42 scraping a real SGLang).
    (job,) = config["scrape_configs"]
    assert {"source_labels": ["__name__"], "regex": "sglang_(.+)", "target_label": "__name__",
            "replacement": "sglang:$1"} in job["metric_relabel_configs"]


@engines
def test_promtool_unit_tests(files):
    proc = _promtool("test", "rules", files.rules_test.name)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


@engines
def test_every_alert_has_a_unit_test(files):
    cases = yaml.safe_load(files.rules_test.read_text())
    assert cases["rule_files"] == [files.rules.name]
    tested = {t["alertname"] for case in cases["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in _rules(files) if "alert" in r}


@engines
def test_the_issue_alerts(files):
    """Jobs failing, compression falling back to uncompressed, decode speedup below 1, queue growing."""
    alerts = {r["alert"]: r for r in _rules(files) if "alert" in r}
    assert set(alerts) >= {"KVzipJobsFailing", "KVzipCompressionFallback", "KVzipDecodeSlowerOnCompressedPrefixes",
                           "KVzipJobQueueGrowing", "KVzipPrefixesLeftUncompressed"}
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@engines
def test_rules_use_only_exported_series(files):
    records = {r["record"] for r in _rules(files) if "record" in r}
    used = set().union(*(metric_names(r["expr"]) for r in _rules(files)))
    exported = plugin_sample_names(files.prefix, files.labelnames)
    assert used and used <= exported, used - exported
    # every alert compares recorded signals (which the e2e tests prove are non-empty on a real server)
    for rule in _rules(files):
        if "alert" in rule:
            assert not metric_names(rule["expr"]), f"{rule['alert']}: use a recording rule"
            assert any(name in rule["expr"] for name in records), rule["alert"]


def test_sglang_rules_are_the_vllm_rules_on_sglang_series():
    """Same groups, signals, thresholds, durations, labels and summaries; only the series, the recorded names
    and the fallback description (SGLang's reasons) differ. Record and group names do not collide, so both
    files load into one Prometheus (the e2e tests do)."""
    docs = {f.key: yaml.safe_load(f.rules.read_text()) for f in (VLLM, SGLANG)}
    groups = {k: [(g["name"], g["rules"]) for g in d["groups"]] for k, d in docs.items()}
    assert [n.replace("vllm", "sglang") for n, _ in groups["vllm"]] == [n for n, _ in groups["sglang"]]
    for (_, v_rules), (_, s_rules) in zip(groups["vllm"], groups["sglang"], strict=True):
        for v, s in zip(v_rules, s_rules, strict=True):
            assert s["expr"] == v["expr"].replace("vllm", "sglang"), s
            assert s.get("record") == (v["record"].replace("vllm", "sglang") if "record" in v else None)
            assert (s.get("alert"), s.get("for"), s.get("labels")) == (v.get("alert"), v.get("for"), v.get("labels"))
            if "alert" in v:
                assert s["annotations"]["summary"] == v["annotations"]["summary"]
    records = {k: {r["record"] for _, rs in g for r in rs if "record" in r} for k, g in groups.items()}
    assert not records["vllm"] & records["sglang"]


def test_chart_copy_is_identical():
    assert (CHART / "files" / "kvzip-rules.yml").read_text() == RULES.read_text(), \
        "cp deploy/prometheus/kvzip-rules.yml deploy/helm/kvzip-vllm/files/kvzip-rules.yml"
