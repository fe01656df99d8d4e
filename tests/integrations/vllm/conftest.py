# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the vLLM integration tests (all skipped where vLLM is not installed)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Llama (+ tokenizer) saved locally; see tiny_model.py."""
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
