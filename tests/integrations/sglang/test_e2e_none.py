# SPDX-License-Identifier: Apache-2.0
"""End to end on the real SGLang 0.5.23 HTTP server on this CPU (`--device cpu --attention-backend
torch_native`, tiny random-weight Llama, radix prefix cache on), three servers one after the other:

* `baseline`: kvzip-plugin not loaded (`SGLANG_PLUGINS` names no installed plugin);
* `none`: the plugin loaded, `--kv-compression none`: SGLang's default tree cache;
* `kvzip`: `--kv-compression kvzip` (+ knobs): the scheduler's tree cache is `KVzipRadixCache`, which does
  not compress yet (step 1 of issue 7), so outputs must not change.

Greedy outputs and prefix-cache hits must be token-identical in all three. About 1 minute per server on
the 2-core CI machine.
"""

from __future__ import annotations

import pytest

from tests.integrations.sglang import harness

harness.require_sglang()

MAX_NEW = 12
SHARED = [(7 * i + 3) % 300 + 20 for i in range(48)]  # a 48-token shared prefix
PROMPTS = [
    SHARED + [401, 402, 403, 404, 405],
    SHARED + [411, 412, 413],  # hits the shared prefix
    SHARED + [401, 402, 403, 404, 405],  # hits all but the last token
    [30 + i for i in range(20)],  # unrelated
]


def _run(model_dir, tmp_path_factory, name: str, *args: str, plugins: bool = True) -> dict:
    log_path = tmp_path_factory.mktemp(f"sglang_{name}") / "server.log"
    server = harness.SGLangServer(model_dir, *args, log_path=log_path, plugins=plugins)
    try:
        outs = [server.generate(p, MAX_NEW) for p in PROMPTS]
    finally:
        server.stop()
    return {
        "tokens": [o["output_ids"] for o in outs],
        "cached": [o["meta_info"]["cached_tokens"] for o in outs],
        "log": log_path.read_text(errors="replace"),
    }


@pytest.fixture(scope="module")
def baseline(sglang_tiny_model_dir, tmp_path_factory):
    return _run(sglang_tiny_model_dir, tmp_path_factory, "baseline", plugins=False)


@pytest.fixture(scope="module")
def plugin_none(sglang_tiny_model_dir, tmp_path_factory):
    return _run(sglang_tiny_model_dir, tmp_path_factory, "none", "--kv-compression", "none")


@pytest.fixture(scope="module")
def plugin_kvzip(sglang_tiny_model_dir, tmp_path_factory):
    return _run(sglang_tiny_model_dir, tmp_path_factory, "kvzip", "--kv-compression", "kvzip",
                "--kv-compression-ratio", "0.5", "--kv-compression-min-prefix-tokens", "32",
                "--kv-compression-min-hits", "2")


def test_baseline_server(baseline):
    assert "kvzip" not in baseline["log"].lower()
    assert "Tree cache initialized: source=default impl=UnifiedRadixCache" in baseline["log"]
    tokens = baseline["tokens"]
    assert len(tokens) == len(PROMPTS) and all(len(t) == MAX_NEW for t in tokens)
    assert tokens[0] == tokens[2]  # same prompt, greedy
    assert len({tuple(t) for t in tokens}) == 3
    # the radix cache on the real server: the 2nd prompt reuses the 48-token prefix, the 3rd all of the
    # 1st prompt but its last token (SGLang recomputes at least one token)
    assert baseline["cached"][1] >= len(SHARED)
    assert baseline["cached"][2] == len(PROMPTS[2]) - 1


def test_none_is_token_identical(baseline, plugin_none):
    log = plugin_none["log"]
    # the plugin is loaded (argparse knows --kv-compression), and `none` keeps SGLang's default cache
    assert "Tree cache initialized: source=default impl=UnifiedRadixCache" in log
    assert "KVzipRadixCache" not in log
    assert "'radix_cache_backend': None" in log
    assert plugin_none["tokens"] == baseline["tokens"]
    assert plugin_none["cached"] == baseline["cached"]


def test_kvzip_backend_is_the_scheduler_tree_cache(baseline, plugin_kvzip):
    log = plugin_kvzip["log"]
    assert "'radix_cache_backend': 'kvzip'" in log
    assert "Tree cache initialized: source=registered('kvzip') impl=KVzipRadixCache" in log
    # the settings reached the scheduler process (pickled with ServerArgs)
    assert "kvzip-plugin: KVzipRadixCache built" in log
    assert "ratio=0.5 min_prefix_tokens=32 min_hits=2 page_size=1" in log
    assert "KV compression disabled" not in log
    assert plugin_kvzip["tokens"] == baseline["tokens"]
    assert plugin_kvzip["cached"] == baseline["cached"]
