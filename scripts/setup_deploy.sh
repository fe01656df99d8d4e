#!/usr/bin/env bash
# Tools of the deploy/ checks (tests/deploy), on top of scripts/setup.sh (+ setup_vllm.sh and setup_sglang.sh
# for the end-to-end tests). Idempotent; safe to re-run. About 1 minute on a fresh Debian 12 machine.
#
#   Debian 12 packages: prometheus + promtool 2.42.0 (the real Prometheus the end-to-end tests run),
#     docker-compose 1.29.2 (`docker-compose config` validates deploy/compose/compose.yaml);
#     installed with apt-get (root, or sudo) and --no-install-recommends (no Docker engine, no
#     node exporter; nothing is started).
#   PyPI, pinned, into the project's venv: grafana-foundation-sdk (deploy/grafana/dashboard.py: both dashboards),
#     helm-python-sdk (Helm v4's Go library: lint and template the chart), kubernetes-validate (the
#     rendered manifests against Kubernetes' OpenAPI schemas).
#
#   bash scripts/setup_deploy.sh
#   VENV=/path/to/venv bash scripts/setup_deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
PIP_PACKAGES=(
    "grafana-foundation-sdk==1769699379!11.6.0"   # the SDK build for Grafana 11.6 (compose: grafana/grafana:11.6.0)
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
)
APT_PACKAGES=(prometheus docker-compose)

if [ ! -x "$PY" ]; then
    echo "setup_deploy.sh: $PY not found; run scripts/setup.sh first" >&2
    exit 1
fi

# ---- Debian packages
if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null; then
    echo "setup_deploy.sh: prometheus, promtool and docker-compose already installed"
else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then SUDO=(sudo); else
            echo "setup_deploy.sh: not root and no sudo: install ${APT_PACKAGES[*]} by hand" >&2; exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

# ---- PyPI packages (constrained like setup_vllm.sh, so shared dependencies keep their pinned versions)
CONSTRAINTS=()
[ -f integrations/vllm/requirements-cpu.txt ] && CONSTRAINTS=(-c integrations/vllm/requirements-cpu.txt)
if "$PY" - "${PIP_PACKAGES[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    assert version(name) == want, (name, version(name), want)
import grafana_foundation_sdk, helm_python, kubernetes_validate  # noqa: F401, E401
EOF
then
    echo "setup_deploy.sh: Python packages already installed in $VENV"
else
    "$PY" -m pip install --quiet --disable-pip-version-check "${CONSTRAINTS[@]}" "${PIP_PACKAGES[@]}"
fi

echo "setup_deploy.sh: $(prometheus --version 2>&1 | head -1); $(docker-compose version --short 2>/dev/null | head -1 | sed 's/^/docker-compose /');" \
     "$("$PY" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("grafana-foundation-sdk", "helm-python-sdk", "kubernetes-validate")))')"
