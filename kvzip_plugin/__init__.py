# SPDX-License-Identifier: Apache-2.0
"""kvzip-plugin: query-agnostic KV-cache compression (KVzip) for shared prefixes.

The core here never imports a serving engine; engine glue lives in `kvzip_plugin.integrations`
(the repository's `integrations/` folder). `kvzip_plugin.hf` runs KVzip on transformers models.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["EvictionPlan", "KVzipConfig", "ScoreMap", "__version__", "plan_eviction", "plan_head_level"]

_EXPORTS = {"KVzipConfig": "kvzip_plugin.config", "plan_eviction": "kvzip_plugin.eviction",
            "plan_head_level": "kvzip_plugin.eviction", "EvictionPlan": "kvzip_plugin.types",
            "ScoreMap": "kvzip_plugin.types"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: the kernels and the store need only torch (the GPU
    check runs on a machine with torch, triton and transformers and nothing else), the config pydantic."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvzip_plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
