# SPDX-License-Identifier: Apache-2.0
"""Score capture of KVzip's scoring requests inside SGLang's forward pass (DESIGN.md §3).

Every `RadixAttention` module of the model is wrapped on its instance (`layer.forward`); the same wrapper
runs the head-page attention of `attention.PagedAttention` (requests on `pair` / `layer_budget` entries). After the real
forward (which has written this step's keys into the KV pool), the wrapper looks at the batch's capture
plan (`ScoreCapture.arm`, set by the `ForwardBatch.init_new` hook for extend batches that hold
scoring requests, matched by `ForwardBatch.extend_seq_lens_cpu`; other batches cost one attribute lookup
per layer). For each
scoring row it takes the post-RoPE queries of the repeat input, reads the row's keys back from the pool
through `req_to_token` and runs the engine-agnostic kernel `kvzip_plugin.scoring.kvzip.chunk_scores`,
keeping the max per (layer, KV head, context token) across chunks and chunked-prefill steps.

Imports SGLang lazily; the module itself needs only torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from kvzip_plugin.integrations.sglang import native_backend

from kvzip_plugin.scoring.kvzip import chunk_scores
from kvzip_plugin.scoring.plan import ScoringTarget

logger = logging.getLogger("sglang.kvzip_plugin")

_WRAPPED = "__kvzip_forward__"


@dataclass(frozen=True)
class PlanRow:
    """One scoring row of an extend batch: its `req_to_token` row, where its queries start in the batch
    (`q_start`), how many tokens it extends and how many its row already held (`prefix_len`)."""

    target: ScoringTarget
    row: int
    q_start: int
    extend_len: int
    prefix_len: int


@dataclass
class _JobScores:
    scores: torch.Tensor  # [layers, H_kv, n_context] float32, max so far
    kernel_seconds: float = 0.0


class ScoreCapture:
    """Wraps the model's attention layers and accumulates the scores of the running jobs."""

    def __init__(self, layers: list[Any], kv_pool: Any, req_to_token: torch.Tensor, query_block: int = 512) -> None:
        self.layers = sorted(layers, key=lambda layer: layer.layer_id)
        self.index = {layer.layer_id: i for i, layer in enumerate(self.layers)}
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.query_block = query_block
        self.targets: dict[str, ScoringTarget] = {}
        self.jobs: dict[int, _JobScores] = {}
        self.errors: list[str] = []
        self.armed: tuple[list, list[PlanRow]] | None = None
        self.paged: Any = None  # attention.PagedAttention: rows on head-page entries, after the forward

    def arm(self, marker: list | None, plan: list[PlanRow] | None) -> None:
        """The plan of the next forward. SGLang's runners run the model on a `dataclasses.replace` copy of
        the `ForwardBatch` (static input buffers swapped in), so the plan cannot ride on the object; it is
        matched by its `extend_seq_lens_cpu` list, which the copy carries over by reference."""
        self.armed = (marker, plan) if plan and marker is not None else None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return int(self.layers[0].tp_k_head_num)

    # ------------------------------------------------------------ setup

    def wrap(self) -> None:
        capture = self
        for layer in self.layers:
            if getattr(layer.forward, _WRAPPED, False):
                continue
            original = layer.forward

            def forward(q, k, v, forward_batch, *args, __orig=original, __layer=layer, **kwargs):
                armed = capture.armed
                scoring = armed is not None and getattr(forward_batch, "extend_seq_lens_cpu", None) is armed[0]
                paged = capture.paged is not None and capture.paged.armed is not None
                marked = frozenset(r.row for r in armed[1]) if scoring else frozenset()
                skipped = capture.paged.rows_of(__layer, forward_batch) if paged else frozenset()
                if marked or skipped:
                    with native_backend.rows(marked, skipped):
                        out = __orig(q, k, v, forward_batch, *args, **kwargs)
                else:
                    out = __orig(q, k, v, forward_batch, *args, **kwargs)
                if scoring:
                    capture.capture(__layer, q, armed[1])
                if paged:
                    if not isinstance(out, torch.Tensor):  # (output, lse) forms: not produced on this path
                        raise RuntimeError("kvzip-plugin: head-page attention needs a tensor attention output")
                    capture.paged.apply(__layer, q, out, forward_batch)
                return out

            setattr(forward, _WRAPPED, True)
            layer.forward = forward

    # ------------------------------------------------------------ per batch

    def plan(self, reqs: list[Any], prefix_lens: list[int], extend_lens: list[int]) -> list[PlanRow] | None:
        """The capture plan of an extend batch (None when it holds no scoring request)."""
        if not self.targets:
            return None
        rows: list[PlanRow] = []
        q_start = 0
        for req, prefix_len, extend_len in zip(reqs, prefix_lens, extend_lens, strict=True):
            target = self.targets.get(req.rid)
            if target is not None and req.kv.req_pool_idx is not None:
                rows.append(PlanRow(target, int(req.kv.req_pool_idx), q_start, int(extend_len), int(prefix_len)))
            q_start += int(extend_len)
        return rows or None

    def capture(self, layer: Any, query: torch.Tensor, plan: list[PlanRow]) -> None:
        """Score this layer for every scoring row of the batch. Never raises (an error is recorded and the
        job fails at compaction)."""
        try:
            self._capture(layer, query, plan)
        except Exception as exc:  # pragma: no cover - defensive: never break SGLang's forward
            self.errors.append(f"{type(exc).__name__}: {exc}")
            logger.warning("kvzip-plugin: score capture failed in layer %d: %r", layer.layer_id, exc)
            for row in plan:
                self.jobs.pop(row.target.job_id, None)
                self.targets = {r: t for r, t in self.targets.items() if t.job_id != row.target.job_id}

    def _capture(self, layer: Any, query: torch.Tensor, plan: list[PlanRow]) -> None:
        idx = self.index.get(layer.layer_id)
        if idx is None:
            return
        t0 = time.perf_counter()
        n_q_heads, head_dim = int(layer.tp_q_head_num), int(layer.qk_head_dim)
        q_all = query.reshape(query.shape[0], n_q_heads, head_dim)
        key_buffer = self.kv_pool._get_key_buffer(layer.layer_id)  # [slots, H_kv, D]
        for row in plan:
            tgt = row.target
            if tgt.job_id not in self.jobs and tgt.job_id not in self._live_jobs():
                continue
            L, n_p = tgt.prefix_len, tgt.n_protected
            first = row.prefix_len  # row position of this step's first query
            skip = max(0, L - first)  # queries inside the prefix itself are not scored
            if row.extend_len - skip <= 0:
                continue
            seq_len = first + row.extend_len
            q = q_all[row.q_start + skip:row.q_start + row.extend_len].transpose(0, 1)  # [H_q, n, D]
            slots = self.req_to_token[row.row, :seq_len].to(torch.long)
            keys = key_buffer[slots].transpose(0, 1)  # [H_kv, seq_len, D]
            other = None
            if tgt.softmax == "full_cache":
                other = torch.cat([keys[:, n_p:n_p + tgt.start], keys[:, n_p + tgt.end:L]], dim=1)
            s = chunk_scores(q, keys[:, :n_p], keys[:, n_p + tgt.start:n_p + tgt.end], keys[:, L:seq_len],
                             float(layer.scaling), self.query_block, other, query_offset=first + skip - L)
            job = self._job(tgt, keys.shape[0], s.device)
            span = job.scores[idx, :, tgt.start:tgt.end]
            torch.maximum(span, s.to(span.device), out=span)
            job.kernel_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()

    def _live_jobs(self) -> set[int]:
        return {t.job_id for t in self.targets.values()}

    def _job(self, tgt: ScoringTarget, n_kv_heads: int, device: torch.device) -> _JobScores:
        job = self.jobs.get(tgt.job_id)
        if job is None:
            n_context = tgt.prefix_len - tgt.n_protected
            job = _JobScores(torch.zeros(self.num_layers, n_kv_heads, n_context, device=device))
            self.jobs[tgt.job_id] = job
        return job

    # ------------------------------------------------------------ job life

    def add_targets(self, targets: dict[str, ScoringTarget]) -> None:
        self.targets.update(targets)

    def drop_job(self, job_id: int) -> _JobScores | None:
        """Forget job `job_id`'s targets; return its scores (None if nothing was captured)."""
        self.targets = {r: t for r, t in self.targets.items() if t.job_id != job_id}
        return self.jobs.pop(job_id, None)
