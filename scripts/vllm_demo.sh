#!/usr/bin/env bash
# The main job on vLLM: scripts/serve_demo.sh --engine vllm (see it for the options).
exec bash "$(dirname "$0")/serve_demo.sh" --engine vllm "$@"
