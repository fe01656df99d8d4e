#!/usr/bin/env bash
# The main job on SGLang: scripts/serve_demo.sh --engine sglang (see it for the options).
exec bash "$(dirname "$0")/serve_demo.sh" --engine sglang "$@"
