# SPDX-License-Identifier: Apache-2.0
"""Input-preparation adapter of vLLM's V1 model runner for requests on a compacted prefix.

vLLM derives four things from one number per request, `num_computed_tokens`: RoPE positions,
which token ids are gathered, KV slots (`block_table[pos // bs] * bs + pos % bs`) and attention
`seq_lens`. A request on a compacted prefix (logical length L, physical length P, both
block-aligned) keeps logical positions and token ids, but its slots and `seq_lens` are physical:
`pos - (L - P)`. This module wraps, once per worker process:

* `GPUModelRunner._prepare_inputs` (the CPU runner inherits it): before it runs, the per-token
  offsets of this step are handed to the slot-mapping call; after it, `seq_lens` of those rows
  are lowered in place (the persistent buffer, so graph-captured pointers stay valid). It also
  tells the worker state which rows of the batch are scoring requests.
* `MultiGroupBlockTable.compute_slot_mapping`: given physical positions instead of logical ones
  while offsets are pending (a new tensor; the runner's `positions` buffer, which feeds RoPE,
  is not touched).

Requests on a compacted prefix in head pages (`store.py`) get their `seq_lens` lowered further, to
their own tokens: vLLM's kernel then makes a short pass over their rows, whose output the plugin's
attention (`attention.py`) overwrites; their slots stay as above (own tokens after the store's blocks).

Both wrappers are no-ops (one attribute check) when no request of the step needs them. Only the
V1 runner is adapted: the connector forces it (`VLLM_USE_V2_MODEL_RUNNER=0`) and refuses to run
otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

_WRAPPED = "__kvzip_runner__"
_state: dict[str, Any] = {"worker": None, "installed": False}


def install(worker_state: Any) -> None:
    """Patch the runner classes (idempotent) and route them to `worker_state`."""
    from vllm.v1.worker.block_table import MultiGroupBlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _state["worker"] = worker_state
    if _state["installed"]:
        return
    _wrap_prepare_inputs(GPUModelRunner)
    _wrap_slot_mapping(MultiGroupBlockTable)
    _state["installed"] = True


def _wrap_prepare_inputs(cls: type) -> None:
    original = cls._prepare_inputs
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        ws = _state["worker"]
        if ws is None:
            return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        meta = getattr(scheduler_output, "kv_connector_metadata", None)
        if meta is not None:  # bound to the connector only after this method; the offsets are needed now
            ws.bind(meta)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        rows = {rid: i for i, rid in enumerate(req_ids) if rid in ws.scoring}
        paged = {rid: (i, store) for i, rid in enumerate(req_ids) if (store := ws.paged_store(rid)) is not None}
        ws.begin_step(rows, {rid: int(num_scheduled_tokens[i]) for i, rid in enumerate(req_ids)}, paged)
        offsets = np.array([ws.offsets.get(rid, 0) for rid in req_ids], dtype=np.int64)
        if not offsets.any() and not paged:
            return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        block_table = self.input_batch.block_table
        block_table._kvzip_token_offsets = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens[:num_reqs]))
        try:
            out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        finally:
            block_table._kvzip_token_offsets = None
        cut = offsets.copy()
        for row, store in paged.values():
            cut[row] += store.n_slots  # own tokens only: the kernel's pass over these rows is discarded
        physical = torch.from_numpy(cut).to(self.seq_lens.device, self.seq_lens.dtype)
        self.seq_lens[:num_reqs] -= physical
        return out

    setattr(_prepare_inputs, _WRAPPED, True)
    cls._prepare_inputs = _prepare_inputs


def _wrap_slot_mapping(cls: type) -> None:
    original = cls.compute_slot_mapping
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def compute_slot_mapping(self, num_reqs, query_start_loc, positions, *args, **kwargs):
        offsets = getattr(self, "_kvzip_token_offsets", None)
        if offsets is not None:
            positions = positions - offsets.to(positions.device, positions.dtype)
        return original(self, num_reqs, query_start_loc, positions, *args, **kwargs)

    setattr(compute_slot_mapping, _WRAPPED, True)
    cls.compute_slot_mapping = compute_slot_mapping
