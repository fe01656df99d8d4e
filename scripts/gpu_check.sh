#!/usr/bin/env bash
# The GPU check: the plugin's own GPU code on one GPU with torch + triton + the plugin's core only (the GPU
# machine cannot install vLLM or SGLang). A few minutes on one H100/H200. Writes gpu-check-cuda.json and
# prefix-attention-cuda-llama8b-shapes.json into $OUT (the device tool's output folder) or
# benchmarks/results/, and ends with one PASS/FAIL line (exit 1 on FAIL).
#
#   bash scripts/gpu_check.sh                 # PYTHON=... to pick the interpreter (default: python3)
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results}"
py="${PYTHON:-python3}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $py (torch $("$py" -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" benchmarks/gpu_check.py --out "$out_dir/gpu-check-cuda.json"
rc=$?
"$py" benchmarks/bench_prefix_attention.py --device cuda --lengths 8192 32768 \
  --out "$out_dir/prefix-attention-cuda-llama8b-shapes.json" || rc=1
if [ "$rc" -eq 0 ]; then echo "gpu_check.sh: PASS"; else echo "gpu_check.sh: FAIL"; fi
exit "$rc"
