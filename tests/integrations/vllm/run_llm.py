# SPDX-License-Identifier: Apache-2.0
"""Run one `vllm.LLM` on a local model in a fresh process and print a JSON result on the last line.

Used by test_e2e_none.py through subprocess: every engine configuration gets its own process, so the
vLLM general-plugin state (loaded once per process) and the environment variables are those of that
configuration only. Not a test module (no `test_` prefix).

    python -m tests.integrations.vllm.run_llm MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time

BLOCK_SIZE = 32
PREFIX_LEN = 3 * BLOCK_SIZE + 7  # 3 full blocks shared, plus a partial one
SUFFIXES = ([11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37, 38, 39])
MAX_TOKENS = 12


def prompts(vocab: int) -> list[list[int]]:
    prefix = [(7 * i + 3) % (vocab - 100) + 50 for i in range(PREFIX_LEN)]
    return [prefix + list(s) for s in SUFFIXES]


def main(model_dir: str) -> dict:
    t0 = time.perf_counter()
    from kvzip_plugin.integrations import vllm as plugin
    from vllm import LLM, SamplingParams

    t_import = time.perf_counter() - t0
    llm = LLM(
        model=model_dir,
        tokenizer=model_dir,
        dtype="float32",
        enable_prefix_caching=True,
        block_size=BLOCK_SIZE,
        max_model_len=512,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
        distributed_executor_backend=os.environ.get("KVZIP_TEST_EXECUTOR") or None,
    )
    t_start = time.perf_counter() - t0 - t_import
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens, cached = [], []
    # one request at a time: the later ones find the shared prefix in the prefix cache
    for ids in prompts(vocab):
        (out,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        tokens.append(list(out.outputs[0].token_ids))
        cached.append(out.num_cached_tokens)
    kv_transfer = llm.llm_engine.vllm_config.kv_transfer_config
    (worker_info,) = llm.collective_rpc(_worker_info)
    t_total = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "num_cached_tokens": cached,
        "kv_connector": None if kv_transfer is None else kv_transfer.kv_connector,
        "kv_connector_extra_config": None if kv_transfer is None else kv_transfer.kv_connector_extra_config,
        "plugin_active_in_frontend": plugin.is_active(),
        "model_runner": worker_info["model_runner"],
        "worker_kv_connector": worker_info["kv_connector"],
        "seconds": {"import": t_import, "engine_start": t_start, "total": t_total},
        "pid": os.getpid(),
    }


def _worker_info(worker) -> dict:
    """Runs inside the worker process (collective_rpc)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    def name(obj) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    connector = get_kv_transfer_group() if has_kv_transfer_group() else None
    return {
        "model_runner": name(worker.model_runner),
        "kv_connector": None if connector is None else name(connector),
    }


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
