# SPDX-License-Identifier: Apache-2.0
"""A pytest plugin for vLLM's own test files (`scripts/vllm_upstream_tests.sh`): every `Scheduler` those tests
build without a KV connector gets the KVzip connector, so vLLM's own assertions about scheduling and prefix
caching run with the plugin's scheduler half on every step (admission, the connector calls, its metadata).

`KVZIP_UPSTREAM_MIN_PREFIX_TOKENS` (default 16) and `KVZIP_UPSTREAM_MIN_HITS` (default 2) set the trigger. Not
collected by this project's test run (it is loaded with `-p tests.integrations.vllm.upstream_attach`).
"""

from __future__ import annotations

import os

import pytest

ATTACHED: list[int] = []  # one entry per Scheduler built with the connector attached


def _config() -> dict:
    from kvzip_plugin.integrations.vllm import kv_transfer_config

    return kv_transfer_config(min_prefix_tokens=int(os.environ.get("KVZIP_UPSTREAM_MIN_PREFIX_TOKENS", "16")),
                              min_hits=int(os.environ.get("KVZIP_UPSTREAM_MIN_HITS", "2")))


def pytest_configure(config: pytest.Config) -> None:
    from vllm.config import KVTransferConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    from kvzip_plugin.integrations.vllm import register

    register()
    original = Scheduler.__init__

    def init(self, vllm_config, *args, **kwargs):
        if vllm_config.kv_transfer_config is None:
            vllm_config.kv_transfer_config = KVTransferConfig(**_config())
            ATTACHED.append(1)
        original(self, vllm_config, *args, **kwargs)

    Scheduler.__init__ = init


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(f"kvzip-plugin: KVzip connector attached to {len(ATTACHED)} schedulers")
