# SPDX-License-Identifier: Apache-2.0
"""KVzip statistics on vLLM's KV-connector metrics transport.

vLLM moves connector stats as follows: every worker's connector returns a `KVConnectorStats` from
`get_kv_connector_stats()`, which is pickled to EngineCore (`KVConnectorOutput`) and merged across TP
workers with `aggregate`; the scheduler-side connector's own stats are merged in with `aggregate` too;
`to_dict()` (the plain `data` dict) then travels to the frontend inside `SchedulerStats` (msgpack). There
`build_kv_connector_stats(data)` rebuilds the object for the log line (`aggregate`, `is_empty`, `reduce`)
and `build_prom_metrics(...)` creates the Prometheus series that `observe(data, engine_idx)` updates.

Here `data` is `KVzipStats.to_dict()` (ints, floats, None, lists and str-keyed dicts: msgpack-safe), and
the series are `PromMetrics`' `vllm:kvzip_*`, built with vLLM's own metric classes so that they land in
the registry vLLM's `/metrics` serves (and work in Prometheus multiprocess mode and with Ray metrics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvzip_plugin.metrics import JOB_OUTCOMES, KVzipStats, PromMetrics

PROM_PREFIX = "vllm:"


@dataclass
class KVzipConnectorStats(KVConnectorStats):
    """`KVConnectorStats` whose `data` is `KVzipStats.to_dict()`; `aggregate` returns a new object."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    @classmethod
    def from_stats(cls, stats: KVzipStats) -> KVzipConnectorStats:
        return cls(data=copy.deepcopy(stats.to_dict()))

    @property
    def stats(self) -> KVzipStats:
        """A copy of the numbers as a `KVzipStats`."""
        return KVzipStats.from_dict(copy.deepcopy(self.data))

    def reset(self) -> None:
        self.data = KVzipStats().to_dict()

    def clone_and_reset(self) -> KVzipConnectorStats:
        """This interval's stats; `self` starts a new interval (for `get_kv_connector_stats`)."""
        old = KVzipConnectorStats(data=self.data)
        self.reset()
        return old

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not isinstance(other, KVzipConnectorStats):
            raise TypeError(f"cannot aggregate {type(other).__name__} into KVzipConnectorStats")
        return KVzipConnectorStats.from_stats(self.stats.aggregate(other.stats))

    def is_empty(self) -> bool:
        return KVzipStats().aggregate(self.stats).is_empty()  # aggregate fills in missing job outcomes

    def reduce(self) -> dict[str, int | float]:
        """One interval as a few readable numbers (vLLM's `KV Transfer metrics: k=v, ...` log line)."""
        s = self.stats
        out: dict[str, int | float] = {"Prefixes compressed": s.prefixes_compressed}
        out.update({f"Jobs {o}": s.jobs[o] for o in JOB_OUTCOMES if s.jobs.get(o)})
        for key, value in (("Jobs queued", s.jobs_queued), ("Jobs running", s.jobs_running),
                           ("Blocks saved", s.blocks_saved)):
            if value is not None:
                out[key] = value
        if s.bytes_saved is not None:
            out["MiB saved"] = round(s.bytes_saved / 2**20, 2)
        for key, values, scale in (("Avg kept ratio", s.achieved_ratios, 1),
                                   ("Avg scoring time (s)", s.scoring_seconds, 1),
                                   ("Avg compaction time (s)", s.compaction_seconds, 1),
                                   ("Avg scoring/prefill", s.scoring_to_prefill, 1),
                                   ("Avg decode step compressed (ms)", s.decode_step_seconds_compressed, 1e3),
                                   ("Avg decode step full (ms)", s.decode_step_seconds_full, 1e3)):
            if values:
                out[key] = round(fmean(values) * scale, 3)
        if s.compressed_hits:
            out["Compressed prefix hits"] = s.compressed_hits
        if s.decode_step_seconds_compressed and s.decode_step_seconds_full:
            out["Decode speedup"] = round(fmean(s.decode_step_seconds_full)
                                          / fmean(s.decode_step_seconds_compressed), 2)
        out.update({f"Fallbacks {reason}": n for reason, n in sorted(s.fallbacks.items()) if n})
        return out


class KVzipPromMetrics(KVConnectorPromMetrics):
    """The `vllm:kvzip_*` series, labelled with vLLM's labels (`model_name`, `engine`)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.metrics = PromMetrics(PROM_PREFIX, labelnames, metric_types=metric_types)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labelvalues = [str(v) for v in self.per_engine_labelvalues[engine_idx]]
        self.metrics.observe(KVzipStats.from_dict(transfer_stats_data), labelvalues)


def build_kv_connector_stats(data: dict[str, Any] | None = None) -> KVzipConnectorStats | None:
    """`KVConnectorBase_V1.build_kv_connector_stats`: rebuild stats from their `data` (None: empty)."""
    return KVzipConnectorStats(data=dict(data)) if data else KVzipConnectorStats()


def build_prom_metrics(vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                       per_engine_labelvalues: dict[int, list[object]]) -> KVzipPromMetrics:
    """`KVConnectorBase_V1.build_prom_metrics`: called once by the frontend's `KVConnectorProm`."""
    return KVzipPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
