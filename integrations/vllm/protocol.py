# SPDX-License-Identifier: Apache-2.0
"""What the scheduler and worker halves of `KVzipConnector` tell each other, once per step.

Scheduler -> worker (`KVzipConnectorMetadata`, in `SchedulerOutput.kv_connector_metadata`):
which scheduled requests are scoring passes (and what they score), which compactions to copy, the
slot offset `L - P` of every scheduled request that reads a compacted prefix and the store (job id)
it reads, jobs whose scores can be dropped, and stores forgotten. Worker -> scheduler
(`KVzipWorkerMetadata`, aggregated over ranks): the outcome of each compaction and how many of the
reserved blocks it used. Plain dataclasses of ints and lists: they cross process boundaries
(msgpack/pickle) as they are.
"""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvzip_plugin.scoring.plan import ScoringTarget  # what each scoring request scores (shared with SGLang)

__all__ = ["CompactCommand", "CompactionResult", "KVzipConnectorMetadata", "KVzipWorkerMetadata", "ScoringTarget"]


@dataclasses.dataclass(frozen=True)
class CompactCommand:
    """Copy the kept pairs of a scored prefix from its blocks into fresh destination blocks."""

    job_id: int
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    """Blocks reserved for the store (`store.max_store_blocks`); the worker uses a leading part of them."""
    n_protected: int
    structure: str = "head"
    ratio: float = 1.0
    head_scores: tuple[tuple[float, ...], ...] | None = None
    """`[layers][KV heads]` for the `kvzip_head` scorer (no scoring pass: the worker makes the pair scores
    with `head_scores.head_level_scores`); None for `kvzip` (the scores the worker captured)."""


@dataclasses.dataclass
class KVzipConnectorMetadata(KVConnectorMetadata):
    scoring: dict[str, ScoringTarget] = dataclasses.field(default_factory=dict)
    compact: list[CompactCommand] = dataclasses.field(default_factory=list)
    offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    stores: dict[str, int] = dataclasses.field(default_factory=dict)
    """Scheduled request -> job id of the compacted prefix it reads (every request in `offsets`)."""
    drop_jobs: list[int] = dataclasses.field(default_factory=list)
    drop_stores: list[int] = dataclasses.field(default_factory=list)
    """Job ids of compacted prefixes the scheduler forgot (evicted, reset): their layouts can go."""


@dataclasses.dataclass(frozen=True)
class CompactionResult:
    """One rank's outcome of a `CompactCommand`."""

    job_id: int
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    scoring_seconds: float = 0.0
    """Worker time spent in the score kernel for this job."""
    prefill_seconds_estimate: float = 0.0
    """The job's scoring steps' forward time scaled to the prefix length (an estimate of its prefill)."""
    n_blocks: int = 0
    """Leading reserved blocks the store uses (max over ranks); the scheduler frees the rest."""
    head_pages: bool = False
    """True if a rank laid its runs out in head pages (served by the plugin's attention)."""


@dataclasses.dataclass
class KVzipWorkerMetadata(KVConnectorWorkerMetadata):
    results: list[CompactionResult] = dataclasses.field(default_factory=list)
    disabled: str | None = None
    """Set once by a worker that cannot compact (its KV layout): the scheduler turns the plugin off."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVzipWorkerMetadata:
        """All ranks must succeed: a job is ok only if every rank copied its heads."""
        assert isinstance(other, KVzipWorkerMetadata)
        merged: dict[int, CompactionResult] = {r.job_id: r for r in self.results}
        for r in other.results:
            mine = merged.get(r.job_id)
            if mine is None:
                merged[r.job_id] = r
            else:
                merged[r.job_id] = CompactionResult(
                    r.job_id, mine.ok and r.ok, mine.error or r.error, max(mine.seconds, r.seconds),
                    max(mine.scoring_seconds, r.scoring_seconds),
                    max(mine.prefill_seconds_estimate, r.prefill_seconds_estimate),
                    max(mine.n_blocks, r.n_blocks), mine.head_pages or r.head_pages)
        return KVzipWorkerMetadata(results=list(merged.values()), disabled=self.disabled or other.disabled)
