# SPDX-License-Identifier: Apache-2.0
"""End to end on the real vLLM engine (CPU): a tiny random-weight Llama with prefix caching.

Three engine runs, each in its own process (run_llm.py), so plugin state and environment are those
of that run only:

* `baseline`: the plugin is not loaded (`VLLM_PLUGINS` names no installed plugin);
* `none`: the plugin is loaded, compression off (no flag, no environment variable);
* `kvzip`: `KVZIP_KV_COMPRESSION=kvzip`, i.e. `KVzipConnector` in the scheduler and the worker, in vLLM's
  default multi-process layout (front end, EngineCore, worker), trigger lowered to 64 tokens and ratio 1.0:
  the shared prefix is scored and compacted across processes without changing any output
  (test_e2e_kvzip.py covers ratios below 1).

Greedy outputs must be token-identical in all three. Cost on the 2-core CI machine: about 20 s for
each single-process run and 50 s for the multi-process one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.integrations.vllm.spawn import spawn  # noqa: E402

BLOCK = 32


def run_llm(model_dir: Path, *, single_process: bool, plugins: bool = True, **env_extra: str) -> dict:
    return spawn("tests.integrations.vllm.run_llm", str(model_dir), single_process=single_process,
                 plugins=plugins, **env_extra)


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    return run_llm(tiny_model_dir, single_process=True, plugins=False)


@pytest.fixture(scope="module")
def plugin_none(tiny_model_dir):
    return run_llm(tiny_model_dir, single_process=True)


@pytest.fixture(scope="module")
def plugin_kvzip(tiny_model_dir):
    # trigger lowered to the 96-token shared prefix: the prefix is scored and compacted at ratio 1.0 across
    # processes (metadata scheduler -> worker, acknowledgements back), and outputs must not change; scoring
    # may share the decoding requests' steps (else on a CPU it waits for them to end, after the run returns)
    return run_llm(tiny_model_dir, single_process=False, KVZIP_KV_COMPRESSION="kvzip",
                   KVZIP_KV_COMPRESSION_RATIO="1.0", KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS="64",
                   KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN="1000")


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


def test_kvzip_ratio_one_multiprocess_is_token_identical(baseline, plugin_kvzip):
    assert plugin_kvzip["kv_connector"] == "KVzipConnector"
    assert plugin_kvzip["kv_connector_extra_config"] == {"kvzip": {"ratio": 1.0, "min_prefix_tokens": 64,
                                                                   "scoring_max_slowdown": 1000.0}}
    assert plugin_kvzip["worker_kv_connector"] == "kvzip_plugin.integrations.vllm.connector.KVzipConnector"
    log = plugin_kvzip["log"]
    # one connector per role, each in its own process; the plugin registered in EngineCore and worker
    assert "KVzipConnector (SCHEDULER)" in log and "KVzipConnector (WORKER)" in log
    assert log.count("kvzip-plugin: registered for vLLM") >= 2
    assert "kvzip-plugin: job 0 committed (pair): 96 -> 96 token slots (0 blocks saved, vLLM's block table)" in log
    assert plugin_kvzip["tokens"] == baseline["tokens"]
    assert plugin_kvzip["num_cached_tokens"] == baseline["num_cached_tokens"]
