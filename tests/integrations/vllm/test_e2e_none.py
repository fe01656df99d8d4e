# SPDX-License-Identifier: Apache-2.0
"""End to end on the real vLLM engine (CPU): a tiny random-weight Llama with prefix caching.

Three engine runs, each in its own process (run_llm.py), so plugin state and environment are those
of that run only:

* `baseline`: the plugin is not loaded (`VLLM_PLUGINS` names no installed plugin);
* `none`: the plugin is loaded, compression off (no flag, no environment variable);
* `kvzip`: `KVZIP_KV_COMPRESSION=kvzip`, i.e. the stub `KVzipConnector` in the scheduler and the worker,
  in vLLM's default multi-process layout (front end, EngineCore, worker).

Greedy outputs must be token-identical in all three. Cost on the 2-core CI machine: about 20 s for
each single-process run and 50 s for the multi-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[3]
BLOCK = 32


def run_llm(model_dir: Path, *, single_process: bool, plugins: bool = True, **env_extra: str) -> dict:
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
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integrations.vllm.run_llm", str(model_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["log"] = proc.stdout + proc.stderr
    return result


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    return run_llm(tiny_model_dir, single_process=True, plugins=False)


@pytest.fixture(scope="module")
def plugin_none(tiny_model_dir):
    return run_llm(tiny_model_dir, single_process=True)


@pytest.fixture(scope="module")
def plugin_kvzip(tiny_model_dir):
    return run_llm(tiny_model_dir, single_process=False, KVZIP_KV_COMPRESSION="kvzip",
                   KVZIP_KV_COMPRESSION_RATIO="0.5")


def test_baseline_engine(baseline):
    assert not baseline["plugin_active_in_frontend"]
    assert baseline["kv_connector"] is None
    assert baseline["model_runner"] == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"  # V1 runner on CPU
    tokens = baseline["tokens"]
    assert len(tokens) == 3 and all(len(t) == 12 for t in tokens)
    assert len({tuple(t) for t in tokens}) == 3  # the prompts differ, and so do the outputs
    # prefix caching: the 2nd and 3rd prompts hit the shared 3 full blocks (103-token prefix)
    assert baseline["num_cached_tokens"] == [0, 3 * BLOCK, 3 * BLOCK]


def test_none_is_token_identical(baseline, plugin_none):
    assert plugin_none["plugin_active_in_frontend"]
    assert plugin_none["kv_connector"] is None and plugin_none["worker_kv_connector"] is None
    assert plugin_none["tokens"] == baseline["tokens"]
    assert plugin_none["num_cached_tokens"] == baseline["num_cached_tokens"]


def test_kvzip_stub_is_token_identical(baseline, plugin_kvzip):
    assert plugin_kvzip["kv_connector"] == "KVzipConnector"
    assert plugin_kvzip["kv_connector_extra_config"] == {"kvzip": {"ratio": 0.5}}
    assert plugin_kvzip["worker_kv_connector"] == "kvzip_plugin.integrations.vllm.connector.KVzipConnector"
    log = plugin_kvzip["log"]
    # one connector per role, each in its own process; the plugin registered in EngineCore and worker
    assert "KVzipConnector (SCHEDULER)" in log and "KVzipConnector (WORKER)" in log
    assert log.count("kvzip-plugin: registered for vLLM") >= 2
    assert plugin_kvzip["tokens"] == baseline["tokens"]
    assert plugin_kvzip["num_cached_tokens"] == baseline["num_cached_tokens"]
