# SPDX-License-Identifier: Apache-2.0
"""kvzip-plugin: query-agnostic KV-cache compression (KVzip) for shared prefixes.

The core here never imports a serving engine; engine glue lives in `kvzip_plugin.integrations`
(the repository's `integrations/` folder). `kvzip_plugin.hf` runs KVzip on transformers models.
"""

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.eviction import plan_eviction, plan_head_level
from kvzip_plugin.types import EvictionPlan, ScoreMap

__version__ = "0.1.0"
__all__ = ["EvictionPlan", "KVzipConfig", "ScoreMap", "__version__", "plan_eviction", "plan_head_level"]
