# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the SGLang integration tests (all skipped where SGLang is not installed; see harness.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sglang_tiny_model_dir(tmp_path_factory):
    """The tiny random-weight Llama of the vLLM tests (+ tokenizer), saved locally; no downloads."""
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("sglang_tiny_llama"))


@pytest.fixture(scope="session")
def sglang_baseline(sglang_tiny_model_dir, tmp_path_factory):
    """SGLang without kvzip-plugin (`SGLANG_PLUGINS` names no installed plugin), float32: greedy outputs of
    the step-1 prompts (scenarios.STEP1_PROMPTS) and of scenarios.SEQUENCE, and its answers to the bad requests
    of bad_requests.py, shared by the end-to-end modules (one server start)."""
    from tests.integrations.sglang import bad_requests, harness, scenarios

    harness.require_sglang()
    log_path = tmp_path_factory.mktemp("sglang_baseline") / "server.log"
    server = harness.SGLangServer(sglang_tiny_model_dir, "--dtype", "float32", log_path=log_path, plugins=False)
    try:
        outs = [server.generate(p, scenarios.STEP1_MAX_NEW) for p in scenarios.STEP1_PROMPTS]
        sequence = scenarios.run_sequence(server, wait_job=False)
        bad = bad_requests.probe(server.url, scenarios.prefix_ids(), bad_requests.context_len(sglang_tiny_model_dir))
        bad_alive = server.proc.poll() is None
    finally:
        server.stop()
    return {
        "tokens": [o["output_ids"] for o in outs],
        "cached": [o["meta_info"]["cached_tokens"] for o in outs],
        "sequence": sequence,
        "log": log_path.read_text(errors="replace"),
        "bad_requests": bad,
        "alive_after_bad_requests": bad_alive,
    }
