# SPDX-License-Identifier: Apache-2.0
"""The Helm chart, with Helm's own engine: helm-python-sdk (PyPI) wraps the Helm v4 Go library, so
`lint` is `helm lint --strict` and `Chart.render` is `helm template` (values merged and checked against
values.schema.json, templates rendered, no cluster). The rendered core objects (Deployment, Service,
ConfigMap) are then validated against the Kubernetes 1.30 OpenAPI schemas in strict mode
(kubernetes-validate). The Prometheus Operator objects (ServiceMonitor, PrometheusRule) have no schema
there: the ServiceMonitor is checked field by field, the PrometheusRule's spec must equal the rules
file (which promtool checks) and passes `promtool check rules` itself."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.deploy.conftest import CHART, DASHBOARD, RULES, need_module, need_tool

KUBE_VERSION = "1.30.0"
ALL_ON = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                      "prometheusRule": {"enabled": True}}}
GPU = {"engine": "gpu", "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "servedName": "qwen", "hfTokenSecret": "hf"},
       "kvCompression": {"ratio": 0.25, "minPrefixTokens": 512, "minHits": 2, "structure": "layer_budget"},
       "resources": {"limits": {"nvidia.com/gpu": 1}}, "extraArgs": ["--max-num-seqs=64"],
       "cache": {"existingClaim": "hf-cache"}}


@pytest.fixture(scope="module")
def helm():
    return need_module("helm_python")


def _render(helm, values: dict | None = None) -> dict[str, dict]:
    """Rendered manifests by kind (NOTES.txt left out)."""
    out = helm.Chart.load(str(CHART)).render(values, name="kz", namespace="llm", is_install=True)
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def _container(objs: dict[str, dict]) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("values", [None, ALL_ON, GPU, {**GPU, **ALL_ON}],
                         ids=["default", "all-on", "engine=gpu", "engine=gpu-all-on"])
def test_lint_strict(helm, values):
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, report


@pytest.mark.parametrize("values", [None, ALL_ON, GPU], ids=["default", "all-on", "engine=gpu"])
def test_rendered_manifests_match_kubernetes_schemas(helm, values):
    kv = need_module("kubernetes_validate")
    objs = _render(helm, values)
    for kind in ("Deployment", "Service", "ConfigMap"):
        kv.validate(objs[kind], KUBE_VERSION, strict=True)  # raises on any schema violation


def test_engine_flags_and_scrape_annotations(helm):
    objs = _render(helm)
    c = _container(objs)
    assert c["command"] == ["python", "-m", "vllm.entrypoints.launchers.api_server.entry"]
    assert "--kv-compression=kvzip" in c["args"] and "--kv-compression-ratio=0.3" in c["args"]
    assert "--model=HuggingFaceTB/SmolLM2-135M-Instruct" in c["args"] and "--enable-prefix-caching" in c["args"]
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "4"} in c["env"]
    assert c["image"] == "kvzip-vllm-cpu:0.1.0"
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    for obj in (objs["Deployment"]["spec"]["template"], objs["Service"]):
        assert obj["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert obj["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert objs["Service"]["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert "ServiceMonitor" not in objs and "PrometheusRule" not in objs


def test_gpu_values(helm):
    objs = _render(helm, GPU)
    c = _container(objs)
    assert c["command"] == ["vllm", "serve"] and c["args"][0] == "Qwen/Qwen2.5-1.5B-Instruct"
    for flag in ("--served-model-name=qwen", "--kv-compression=kvzip", "--kv-compression-ratio=0.25",
                 "--kv-compression-min-prefix-tokens=512", "--kv-compression-min-hits=2", "--max-num-seqs=64",
                 "--kv-compression-structure=layer_budget"):
        assert flag in c["args"], flag
    assert c["image"] == "kvzip-vllm-gpu:0.1.0" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not any(e["name"] == "VLLM_CPU_KVCACHE_SPACE" for e in c["env"])
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in c["env"]
    vols = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert vols["hf-cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"


def test_scoring_step_tokens_value(helm):
    assert not any(a.startswith("--kv-compression-scoring-step-tokens") for a in _container(_render(helm))["args"])
    for value in (0, 128):  # 0 (slicing off) is a value, not "unset"
        args = _container(_render(helm, {"kvCompression": {"scoringStepTokens": value}}))["args"]
        assert f"--kv-compression-scoring-step-tokens={value}" in args


def test_head_level_scorer_value(helm):
    args = _container(_render(helm, {"kvCompression": {"scorer": "kvzip_head"}}))["args"]
    assert "--kv-compression-scorer=kvzip_head" in args
    assert not any(a.startswith("--kv-compression-scorer") for a in _container(_render(helm))["args"])


def test_dashboard_configmap_for_grafana_sidecar(helm):
    cm = _render(helm)["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "KVzip"
    assert json.loads(cm["data"]["kvzip-vllm.json"]) == json.loads(DASHBOARD.read_text())
    assert "ConfigMap" not in _render(helm, {"grafanaDashboard": {"enabled": False}})


def test_service_monitor_and_prometheus_rule(helm, tmp_path):
    objs = _render(helm, ALL_ON)
    sm = objs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]["selector"]["matchLabels"].items()) <= set(objs["Service"]["metadata"]["labels"].items())
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert objs["Service"]["spec"]["ports"][0]["name"] == "http"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    rule = objs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run([need_tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values, message", [
    ({"kvCompression": {"ratio": 1.5}}, "/kvCompression/ratio"),
    ({"kvCompression": {"ratio": 0}}, "/kvCompression/ratio"),
    ({"engine": "tpu"}, "/engine"),
    ({"kvCompresion": {"ratio": 0.5}}, "kvCompresion"),
    ({"model": {"name": ""}}, "/model/name"),
])
def test_values_schema_rejects_bad_values(helm, values, message):
    with pytest.raises(Exception, match=message):
        helm.Chart.load(str(CHART)).render(values, name="kz")
