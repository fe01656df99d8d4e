# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the SGLang integration tests (all skipped where SGLang is not installed; see harness.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sglang_tiny_model_dir(tmp_path_factory):
    """The tiny random-weight Llama of the vLLM tests (+ tokenizer), saved locally; no downloads."""
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("sglang_tiny_llama"))
