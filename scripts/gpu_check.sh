#!/usr/bin/env bash
# The GPU check: the plugin's own GPU code on one GPU with torch + triton + the plugin's core only (the GPU
# machine cannot install vLLM or SGLang). A few minutes on one H100/H200. Writes gpu-check-cuda.json,
# prefix-attention-cuda-llama8b-shapes.{json,md} and gpu-check.log into $OUT (the device tool's output
# folder) or benchmarks/results/, and ends with one PASS/FAIL line (exit 1 on FAIL).
#
#   bash scripts/gpu_check.sh                 # PYTHON=... to pick the interpreter (default: python3)
#   GPU_CHECK_PART_TIMEOUT=240                # seconds each of the two parts may run (default 240)
#
# On the device machine, as one call (what comes back from $OUT goes to benchmarks/results/):
#   run(command="bash scripts/gpu_check.sh", timeout_s=600)
# Checked on CPU with the GPU image's versions (torch 2.11.0, triton 3.6.0): the quick run, and the Triton
# parts under Triton's interpreter (which, in triton 3.6, needs numpy < 2.4); never on a GPU yet.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results}"
py="${PYTHON:-python3}"
part_timeout="${GPU_CHECK_PART_TIMEOUT:-240}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $py (torch $("$py" -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
mkdir -p "$out_dir"
log_file="$out_dir/gpu-check.log"
exec > >(tee "$log_file") 2>&1  # everything below also lands in the log that comes back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $("$py" -c 'import torch, platform
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "absent"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, {torch.cuda.get_device_name()}")')"
rc=0
t0=$SECONDS
log "part 1: checks + scoring vs prefill attention (benchmarks/gpu_check.py)"
timeout "$part_timeout" "$py" benchmarks/gpu_check.py --out "$out_dir/gpu-check-cuda.json" || rc=1
log "part 1 done in $((SECONDS - t0)) s (rc so far $rc)"
t1=$SECONDS
log "part 2: decode attention, full vs compacted, torch vs the Triton kernel (benchmarks/bench_prefix_attention.py)"
timeout "$part_timeout" "$py" benchmarks/bench_prefix_attention.py --device cuda --lengths 8192 32768 \
  --out "$out_dir/prefix-attention-cuda-llama8b-shapes.json" || rc=1
log "part 2 done in $((SECONDS - t1)) s; total $((SECONDS - t0)) s"
if [ "$rc" -eq 0 ]; then echo "gpu_check.sh: PASS"; else echo "gpu_check.sh: FAIL"; fi
exit "$rc"
