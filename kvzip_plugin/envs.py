# SPDX-License-Identifier: Apache-2.0
"""Every KVZIP_* environment variable, read in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """KVZIP_CACHE_DIR: where converted models are kept (default ~/.cache/kvzip-plugin)."""
    return Path(os.environ.get("KVZIP_CACHE_DIR", Path.home() / ".cache" / "kvzip-plugin"))


def dump_dir() -> Path | None:
    """KVZIP_DUMP_DIR: where engine workers write each compaction's kept tokens and scores
    (`job-<id>.pt`), for inspection and the reference tests. Unset: nothing is written."""
    value = os.environ.get("KVZIP_DUMP_DIR")
    return Path(value) if value else None


FAULTS = ("compaction", "scoring", "kv_layout")


def fault_injection() -> str | None:
    """KVZIP_FAULT_INJECTION=compaction|scoring|kv_layout: make that stage of every job fail, or (vLLM)
    the worker reject its KV layout (tests of the rollback and fail-closed paths). Unset in production."""
    value = os.environ.get("KVZIP_FAULT_INJECTION") or None
    if value is not None and value not in FAULTS:
        raise ValueError(f"KVZIP_FAULT_INJECTION={value!r}; expected one of {FAULTS}")
    return value


PREFIX_ATTENTION_BACKENDS = ("auto", "torch", "triton")
CPU_CASCADE_MODES = ("auto", "always", "never")


def cpu_cascade() -> str:
    """KVZIP_CPU_CASCADE=auto|always|never: on vLLM's CPU backend, whether a store's decode rows read its runs
    once for all of them (the cascade) rather than through vLLM's kernel one request at a time. `auto`
    (default): from many rows and long runs (`integrations/vllm/cpu_cascade.py`); `always`: every store's decode
    rows; `never`: vLLM's kernel for every row."""
    value = os.environ.get("KVZIP_CPU_CASCADE") or "auto"
    if value not in CPU_CASCADE_MODES:
        raise ValueError(f"KVZIP_CPU_CASCADE={value!r}; expected one of {CPU_CASCADE_MODES}")
    return value


def prefix_attention_backend() -> str:
    """KVZIP_PREFIX_ATTENTION=auto|torch|triton: how requests on a head-page store attend to its runs.
    `auto` (default): the Triton kernel on CUDA when Triton is installed, torch elsewhere; `triton`
    forces the kernel (on CPU only under TRITON_INTERPRET=1: the tests); `torch` forces torch."""
    value = os.environ.get("KVZIP_PREFIX_ATTENTION") or "auto"
    if value not in PREFIX_ATTENTION_BACKENDS:
        raise ValueError(f"KVZIP_PREFIX_ATTENTION={value!r}; expected one of {PREFIX_ATTENTION_BACKENDS}")
    return value
