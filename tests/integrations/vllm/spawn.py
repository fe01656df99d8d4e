# SPDX-License-Identifier: Apache-2.0
"""Run a scenario module of these tests in a fresh Python process and parse its `RESULT <json>` line.

Every engine configuration gets its own process, so the vLLM general-plugin state (loaded once per
process) and the environment are those of that configuration only. KVZIP_* variables of the calling
environment are dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def spawn(module: str, *args: str, single_process: bool, plugins: bool = True, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc with a function (run_llm._worker_info)
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    if single_process:  # EngineCore and the worker in this process: ~30 s less start-up
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", KVZIP_TEST_EXECUTOR="uni")
    if not plugins:
        env["VLLM_PLUGINS"] = "no-such-plugin"
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["log"] = proc.stdout + proc.stderr
    return result
