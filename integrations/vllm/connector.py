# SPDX-License-Identifier: Apache-2.0
"""`KVzipConnector`: the vLLM V1 KV connector that will own KVzip compression of shared prefixes.

Skeleton: every method is a correct no-op for the connector API of vLLM 0.32/0.33 (no external tokens,
nothing loaded or saved, nothing kept after a request finishes), so an engine started with it behaves
exactly like one without it. Selected by `--kv-compression kvzip` (see `kvzip_plugin.integrations.vllm`)
or by `--kv-transfer-config '{"kv_connector": "KVzipConnector", "kv_connector_module_path":
"kvzip_plugin.integrations.vllm.connector", "kv_role": "kv_both"}'`.

vLLM builds one instance per process and role: `KVConnectorRole.SCHEDULER` in EngineCore,
`KVConnectorRole.WORKER` in every worker (`KVConnectorFactory.create_connector`, which passes the three
constructor arguments `(vllm_config, role, kv_cache_config)`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionMetadata
from vllm.v1.core.sched.output import SchedulerOutput

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

from kvzip_plugin.integrations.vllm import EXTRA_CONFIG_KEY, KVCompressionSettings, make_settings

# under the "vllm" logger so the lines get vLLM's handler (INFO shows by default)
logger = init_logger("vllm.kvzip_plugin.connector")


@dataclasses.dataclass
class KVzipConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step (`build_connector_meta`). Empty for now."""


class KVzipConnector(KVConnectorBase_V1):
    """KVzip compression of shared prefixes as a vLLM V1 KV connector (no-op skeleton)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.get_from_extra_config(EXTRA_CONFIG_KEY, None) or {}
        self.settings: KVCompressionSettings = make_settings(
            extra.get("ratio"), extra.get("min_prefix_tokens"), extra.get("min_hits")
        )
        self.kv_caches: dict[str, torch.Tensor] = {}
        logger.info("KVzipConnector (%s): %s", role.name, self.settings)
        if role == KVConnectorRole.SCHEDULER:
            logger.warning("kvzip-plugin: compression inside vLLM is not implemented yet in this release; "
                           "prefixes are served uncompressed")

    @property
    def requires_kv_delivery(self) -> bool:
        # KVzip hands no KV to another instance: a request preempted mid-way may simply finish
        # (the base class says True for any kv_producer/kv_both role, vllm 0.32 base.py:196)
        return False

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        # nothing to load from outside vLLM's own prefix cache; never asynchronous
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KVzipConnectorMetadata()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # blocks may be freed now; no KV transfer params for the output
        return False, None
