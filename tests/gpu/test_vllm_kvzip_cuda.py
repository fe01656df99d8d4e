# SPDX-License-Identifier: Apache-2.0
"""`--kv-compression kvzip` on vLLM 0.33 with CUDA (FlashAttention, per-layer 4-D KV views, V1 runner forced by
the plugin). Skipped without a GPU; the same scenarios run on CPU in tests/integrations/vllm/."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm")

from tests.integrations.vllm.run_kvzip import BLOCK_SIZE  # noqa: E402
from tests.integrations.vllm.spawn import spawn  # noqa: E402

L = 6 * BLOCK_SIZE
ENV = {"KVZIP_TEST_DTYPE": "bfloat16", "KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS": "64",
       "KVZIP_KV_COMPRESSION_MIN_HITS": "2"}


def run(model_dir, name: str, ratio: float | None) -> dict:
    env = dict(ENV)
    if ratio is not None:
        env.update(KVZIP_KV_COMPRESSION="kvzip", KVZIP_KV_COMPRESSION_RATIO=str(ratio))
    return spawn("tests.integrations.vllm.run_kvzip", str(model_dir), name, single_process=True, **env)


@pytest.fixture(scope="module")
def none_seq(tiny_model_dir):
    assert torch.cuda.is_available()
    return run(tiny_model_dir, "sequential", None)


def test_cuda_ratio_one_is_token_identical(tiny_model_dir, none_seq):
    res = run(tiny_model_dir, "sequential", 1.0)
    assert res["kvzip"]["disabled"] is None and res["kvzip"]["finished"]["committed"] == 1
    assert [r["tokens"] for r in res["requests"]] == [r["tokens"] for r in none_seq["requests"]]


def test_cuda_compacted_prefix_uses_fewer_blocks(tiny_model_dir, none_seq):
    res = run(tiny_model_dir, "sequential", 0.5)
    adopted = [r for r in res["requests"] if r["offset"] is not None]
    assert adopted and all(r["offset"] == L // 2 for r in adopted)
    for r, base in zip(res["requests"], none_seq["requests"], strict=True):
        if r["offset"] is not None:
            assert r["blocks"] == base["blocks"] - (L // 2) // BLOCK_SIZE


def test_cuda_no_block_leaks(tiny_model_dir):
    res = run(tiny_model_dir, "churn", 0.5)
    assert res["kvzip"]["finished"]["committed"] >= 1
    assert res["pool"]["referenced"] == [] and res["pool"]["free"] == res["pool"]["num_blocks"] - 1
