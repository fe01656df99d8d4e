# SPDX-License-Identifier: Apache-2.0
"""`KVzipRadixCache`: SGLang 0.5.23's default tree cache (`UnifiedRadixCache`) as the `kvzip` backend.

Step 1 of the SGLang integration (GitHub issue 7): the class is built by the `kvzip` radix-cache
factory (`kvzip_plugin.integrations.sglang.kvzip_radix_cache_factory`, through SGLang's
`create_unified_radix_cache(ctx, cache_class=...)`) and only logs its construction and settings; it
changes no behaviour, so outputs are token-identical to SGLang's default cache. DESIGN.md beside this
file describes the hook points step 2 (detection, background scoring, compaction, logical positions,
metrics) will use.

Imports SGLang at module level: import this module only inside an SGLang process.
"""

from __future__ import annotations

import logging
import os

from kvzip_plugin.integrations.sglang import KVCompressionSettings
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.detection import TriggerPolicy

logger = logging.getLogger("sglang.kvzip_plugin")


class KVzipRadixCache(UnifiedRadixCache):
    """The unified radix tree SGLang builds by default, plus (in step 2) KVzip compaction of hot shared
    prefixes. `settings` come from `--kv-compression*` / `KVZIP_KV_COMPRESSION*` (None = defaults)."""

    def __init__(self, params: CacheInitParams, settings: KVCompressionSettings | None = None) -> None:
        super().__init__(params)
        self.kvzip_settings = settings or KVCompressionSettings()
        defaults = KVzipConfig()
        self.kvzip_config = defaults.model_copy(update={"ratio": self.kvzip_settings.ratio or defaults.ratio})
        policy = TriggerPolicy()
        self.kvzip_trigger = TriggerPolicy(
            min_prefix_tokens=self.kvzip_settings.min_prefix_tokens or policy.min_prefix_tokens,
            min_hits=self.kvzip_settings.min_hits or policy.min_hits,
        )
        kv_pool = params.token_to_kv_pool_allocator.get_kvcache()
        logger.info(
            "kvzip-plugin: KVzipRadixCache built (pid %d): ratio=%s min_prefix_tokens=%d min_hits=%d "
            "page_size=%d tree_core=%s kv_pool=%s disable=%s; compression not active yet (step 1)",
            os.getpid(),
            self.kvzip_config.ratio,
            self.kvzip_trigger.min_prefix_tokens,
            self.kvzip_trigger.min_hits,
            params.page_size,
            type(self.tree_core).__name__,
            type(kv_pool).__name__,
            self.disable,
        )
