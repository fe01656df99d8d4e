# SPDX-License-Identifier: Apache-2.0
"""End to end on the real SGLang 0.5.23 HTTP server on this CPU (`--device cpu --attention-backend
torch_native --dtype float32`, tiny random-weight Llama, radix prefix cache on), three servers one after
the other, whose outputs must be token-identical:

* `baseline` (conftest.py, shared with test_e2e_kvzip.py): kvzip-plugin not loaded;
* `none`: the plugin loaded, `--kv-compression none`: SGLang's default tree cache;
* `kvzip`: `--kv-compression kvzip --kv-compression-ratio 1.0`: the scheduler's tree cache is
  `KVzipRadixCache`. The step-1 prompts share 48 tokens, below the 64-token trigger, so nothing is
  compressed and even the prefix-cache hits are SGLang's; the 200-token prefix of scenarios.SEQUENCE is
  compressed at ratio 1.0 (P == L: every pair kept, in fresh slots) and later requests run on the compacted
  copy, which must not change a single output token or logprob.

About 30 s per server start on the 2-core CI machine.
"""

from __future__ import annotations

import pytest

from tests.integrations.sglang import harness, scenarios

harness.require_sglang()

PROMPTS = scenarios.STEP1_PROMPTS
MAX_NEW = scenarios.STEP1_MAX_NEW
L = scenarios.PREFIX_LEN


def _run(model_dir, tmp_path_factory, name: str, *args: str, sequence: bool = False) -> dict:
    log_path = tmp_path_factory.mktemp(f"sglang_{name}") / "server.log"
    server = harness.SGLangServer(model_dir, "--dtype", "float32", *args, log_path=log_path)
    try:
        outs = [server.generate(p, MAX_NEW) for p in PROMPTS]
        seq = scenarios.run_sequence(server) if sequence else None
        metrics = server.settled_metrics() if "--enable-metrics" in args else {}
    finally:
        server.stop()
    return {
        "tokens": [o["output_ids"] for o in outs],
        "cached": [o["meta_info"]["cached_tokens"] for o in outs],
        "sequence": seq,
        "metrics": metrics,
        "log": log_path.read_text(errors="replace"),
    }


@pytest.fixture(scope="module")
def plugin_none(sglang_tiny_model_dir, tmp_path_factory):
    return _run(sglang_tiny_model_dir, tmp_path_factory, "none", "--kv-compression", "none")


@pytest.fixture(scope="module")
def plugin_kvzip(sglang_tiny_model_dir, tmp_path_factory):
    return _run(sglang_tiny_model_dir, tmp_path_factory, "kvzip", "--kv-compression", "kvzip",
                "--kv-compression-ratio", "1.0", *scenarios.KVZIP_TRIGGER, "--enable-metrics", sequence=True)


def test_baseline_server(sglang_baseline):
    baseline = sglang_baseline
    assert "kvzip" not in baseline["log"].lower()
    assert "Tree cache initialized: source=default impl=UnifiedRadixCache" in baseline["log"]
    tokens = baseline["tokens"]
    assert len(tokens) == len(PROMPTS) and all(len(t) == MAX_NEW for t in tokens)
    assert tokens[0] == tokens[2]  # same prompt, greedy
    assert len({tuple(t) for t in tokens}) == 3
    # the radix cache on the real server: the 2nd prompt reuses the 48-token prefix, the 3rd all of the
    # 1st prompt but its last token (SGLang recomputes at least one token)
    assert baseline["cached"][1] >= len(scenarios.STEP1_SHARED)
    assert baseline["cached"][2] == len(PROMPTS[2]) - 1
    seq = baseline["sequence"]["requests"]
    assert [r["cached_tokens"] for r in seq] == [0] + [L] * (len(seq) - 1)


def test_none_is_token_identical(sglang_baseline, plugin_none):
    log = plugin_none["log"]
    # the plugin is loaded (argparse knows --kv-compression), and `none` keeps SGLang's default cache
    assert "Tree cache initialized: source=default impl=UnifiedRadixCache" in log
    assert "KVzipRadixCache" not in log
    assert "'radix_cache_backend': None" in log
    assert plugin_none["tokens"] == sglang_baseline["tokens"]
    assert plugin_none["cached"] == sglang_baseline["cached"]


def test_kvzip_backend_is_the_scheduler_tree_cache(sglang_baseline, plugin_kvzip):
    log = plugin_kvzip["log"]
    assert "'radix_cache_backend': 'kvzip'" in log
    assert "Tree cache initialized: source=registered('kvzip') impl=KVzipRadixCache" in log
    # the settings reached the scheduler process (pickled with ServerArgs)
    assert "kvzip-plugin: KVzipRadixCache built" in log
    assert "ratio=1.0 min_prefix_tokens=64 min_hits=2 page_size=1" in log and "structure=pair;" in log
    assert "compression active" in log and "KV compression disabled" not in log
    # below the trigger: SGLang's own prefix cache, untouched
    assert plugin_kvzip["tokens"] == sglang_baseline["tokens"]
    assert plugin_kvzip["cached"] == sglang_baseline["cached"]


def test_ratio_one_is_token_identical_to_none(sglang_baseline, plugin_kvzip, sglang_tiny_model_dir):
    base, full = sglang_baseline["sequence"]["requests"], plugin_kvzip["sequence"]["requests"]
    log, metrics = plugin_kvzip["log"], plugin_kvzip["metrics"]
    # the default structure (pair) at ratio 1.0: every run is the whole prefix, SGLang's own slots and kernel
    assert f"kvzip-plugin: job 0 committed (pair): {L} -> {L} tokens (0 slots saved, SGLang's own slots)" in log
    # SGLang's radix-cache labels + model_name (= the served model name, here the model path), sorted
    labels = (f'{{cache_type="UnifiedRadixCache",dp_rank="0",model_name="{sglang_tiny_model_dir}",pp_rank="0",'
              'tp_rank="0"}')
    assert metrics[f"sglang:kvzip_prefixes_compressed_total{labels}"] == 1
    # r2..r5 ran on the compacted copy (r1 triggered the job while it decoded)
    assert metrics[f"sglang:kvzip_compressed_prefix_hits_total{labels}"] == len(base) - 2
    for r, b in zip(full, base, strict=True):
        assert r["tokens"] == b["tokens"], r["id"]
        assert r["logprobs"] == b["logprobs"], r["id"]  # bit-identical: same KV, same positions
        assert (r["prompt_tokens"], r["cached_tokens"]) == (b["prompt_tokens"], b["cached_tokens"]), r["id"]
