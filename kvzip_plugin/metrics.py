# SPDX-License-Identifier: Apache-2.0
"""KVzip statistics and their Prometheus metrics, shared by the vLLM and SGLang glue.

`KVzipStats` holds one reporting interval's numbers; engine processes produce them, the engine's
own transport carries them to the frontend (`aggregate` merges several workers' intervals), and
`PromMetrics.observe` turns them into Prometheus series named `<prefix>kvzip_*` (`vllm:` or
`sglang:`). Gauges (`blocks_saved`, `bytes_saved`, `jobs_queued`, `jobs_running`) carry the latest
value; everything else is a count or a list of observations for the interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JOB_OUTCOMES = ("submitted", "committed", "failed", "cancelled", "rejected")


@dataclass
class ScoringClock:
    """The forward time one job's scoring requests cost, and the prefill time of its prefix, estimated
    from the same steps (both engines).

    Each step that runs scoring rows adds its wall time: the score capture (`capture_seconds`, it runs
    inside the forward and belongs to the job) plus the job's share of the rest, by its share of the
    step's tokens. The prefill estimate is that forward rate per token, capture excluded, times the
    prefix length: what computing the prefix's L tokens costs on the same engine and batch shapes.
    """

    forward_seconds: float = 0.0
    capture_seconds: float = 0.0
    tokens: int = 0

    def add_step(self, elapsed: float, capture: float, tokens: int, total_tokens: int) -> None:
        """One step: `elapsed` wall seconds, `capture` of them in this job's score capture, `tokens` of
        its `total_tokens` scheduled tokens were this job's scoring tokens."""
        self.capture_seconds += capture
        self.forward_seconds += max(elapsed - capture, 0.0) * tokens / max(1, total_tokens)
        self.tokens += tokens

    @property
    def seconds(self) -> float:
        """Scoring time: the job's share of its steps plus its capture."""
        return self.forward_seconds + self.capture_seconds

    def prefill_estimate(self, prefix_len: int) -> float:
        """Estimated prefill seconds of a `prefix_len`-token prefix (0.0 before any step)."""
        return self.forward_seconds / self.tokens * prefix_len if self.tokens else 0.0

    def scoring_to_prefill(self, prefix_len: int) -> float | None:
        """`seconds / prefill_estimate(prefix_len)`, None when nothing was timed."""
        prefill = self.prefill_estimate(prefix_len)
        return self.seconds / prefill if prefill > 0 else None


@dataclass
class KVzipStats:
    """One interval of KVzip activity.

    Attributes:
        prefixes_compressed: compactions committed.
        blocks_saved, bytes_saved: KV blocks / bytes saved by the live compacted prefixes (latest).
        jobs: job outcomes counted in the interval (`JOB_OUTCOMES`).
        jobs_queued, jobs_running: queue state (latest).
        achieved_ratios: kept fraction of each committed prefix.
        scoring_seconds, compaction_seconds: time of each committed job's scoring / copy.
        scoring_to_prefill: each job's scoring time over its prefix's prefill time.
        compressed_hits: requests admitted on a compacted prefix.
        decode_step_seconds_compressed / _full: per-request decode step times of requests on
            compacted vs full prefixes (the online decode speedup).
        fallbacks: reasons compression was not used (unsupported model or feature, ...).
    """

    prefixes_compressed: int = 0
    blocks_saved: int | None = None
    bytes_saved: int | None = None
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_OUTCOMES, 0))
    jobs_queued: int | None = None
    jobs_running: int | None = None
    achieved_ratios: list[float] = field(default_factory=list)
    scoring_seconds: list[float] = field(default_factory=list)
    compaction_seconds: list[float] = field(default_factory=list)
    scoring_to_prefill: list[float] = field(default_factory=list)
    compressed_hits: int = 0
    decode_step_seconds_compressed: list[float] = field(default_factory=list)
    decode_step_seconds_full: list[float] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVzipStats) -> KVzipStats:
        """Merge `other` (a later interval or another worker) into a new object: counts and
        observations add up; gauges take `other`'s value when it has one."""
        out = KVzipStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, list):
                value: Any = a + b
            elif isinstance(a, dict) or isinstance(b, dict):
                value = {k: (a or {}).get(k, 0) + (b or {}).get(k, 0) for k in {**(a or {}), **(b or {})}}
            elif f.name in _GAUGES:
                value = b if b is not None else a
            else:
                value = a + b
            setattr(out, f.name, value)
        return out

    def is_empty(self) -> bool:
        return self == KVzipStats()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVzipStats:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


_GAUGES = {"blocks_saved", "bytes_saved", "jobs_queued", "jobs_running"}

_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_OVERHEAD = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)


class PromMetrics:
    """The `kvzip_*` Prometheus series of one engine (names prefixed with `prefix`, e.g. `vllm:`).

    Args:
        prefix: engine prefix of every name.
        labelnames: labels of every series (e.g. `model_name`, `engine`).
        registry: where to register (the engine's registry). Default: a private one, or, when
            `metric_types` is given, wherever those classes register by default.
        metric_types: the engine's metric classes, keyed by the `prometheus_client` class they stand
            for (vLLM passes `{Gauge: ..., Counter: ..., Histogram: ...}`: `prometheus_client`'s own,
            which register in the global `REGISTRY` that vLLM's `/metrics` serves, or Ray's wrappers).

    Gauges use `multiprocess_mode="mostrecent"`, as vLLM's do, so that in Prometheus multiprocess mode
    (`PROMETHEUS_MULTIPROC_DIR`, e.g. `vllm serve --api-server-count 2`) they stay one series per label
    set instead of one per process.
    """

    def __init__(self, prefix: str, labelnames: Sequence[str], registry: CollectorRegistry | None = None,
                 metric_types: Mapping[type, type] | None = None) -> None:
        self.labelnames = list(labelnames)
        if metric_types is None and registry is None:
            registry = CollectorRegistry()
        types = metric_types or {}
        reg: dict[str, Any] = {} if registry is None else {"registry": registry}
        n = f"{prefix}kvzip_"
        labels = self.labelnames

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> Any:
            return types.get(Counter, Counter)(name=n + name, documentation=doc, labelnames=[*labels, *extra],
                                               **reg)

        def gauge(name: str, doc: str) -> Any:
            return types.get(Gauge, Gauge)(name=n + name, documentation=doc, labelnames=labels,
                                           multiprocess_mode="mostrecent", **reg)

        def histogram(name: str, doc: str, buckets: Sequence[float], extra: Sequence[str] = ()) -> Any:
            return types.get(Histogram, Histogram)(name=n + name, documentation=doc,
                                                   labelnames=[*labels, *extra], buckets=list(buckets), **reg)

        self.prefixes_compressed = counter("prefixes_compressed", "Shared prefixes compacted by KVzip.")
        self.blocks_saved = gauge("blocks_saved", "KV blocks saved by the live compacted prefixes.")
        self.bytes_saved = gauge("bytes_saved", "KV cache bytes saved by the live compacted prefixes.")
        self.jobs = counter("jobs", "KVzip compression jobs by outcome.", ["outcome"])
        self.jobs_queued = gauge("jobs_queued", "KVzip jobs waiting.")
        self.jobs_running = gauge("jobs_running", "KVzip jobs scoring or compacting.")
        self.achieved_ratio = histogram("achieved_ratio", "Kept fraction of each compacted prefix.", _RATIOS)
        self.scoring_seconds = histogram("scoring_seconds", "Scoring pass time per prefix.", _SECONDS)
        self.compaction_seconds = histogram("compaction_seconds", "Compaction copy time per prefix.", _SECONDS)
        self.scoring_to_prefill = histogram("scoring_to_prefill_ratio",
                                            "Scoring time over the prefix's prefill time.", _OVERHEAD)
        self.compressed_hits = counter("compressed_prefix_hits", "Requests admitted on a compacted prefix.")
        self.decode_step_seconds = histogram("decode_step_seconds",
                                             "Per-request decode step time, on compacted vs full prefixes.",
                                             _STEP_SECONDS, ["prefix"])
        self.fallbacks = counter("fallbacks", "Times compression was not used, by reason.", ["reason"])
        self.registry = registry  # None: wherever the `metric_types` classes register by default

    def observe(self, stats: KVzipStats, labelvalues: Sequence[str]) -> None:
        """Record one interval for the series labelled `labelvalues`."""
        lv = list(labelvalues)
        self.prefixes_compressed.labels(*lv).inc(stats.prefixes_compressed)
        if stats.blocks_saved is not None:
            self.blocks_saved.labels(*lv).set(stats.blocks_saved)
        if stats.bytes_saved is not None:
            self.bytes_saved.labels(*lv).set(stats.bytes_saved)
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(*lv, outcome).inc(stats.jobs.get(outcome, 0))
        if stats.jobs_queued is not None:
            self.jobs_queued.labels(*lv).set(stats.jobs_queued)
        if stats.jobs_running is not None:
            self.jobs_running.labels(*lv).set(stats.jobs_running)
        # histogram label sets exist from the first interval on (zero counts), so a rate() over the
        # first observation sees it rise from 0 rather than appear
        for hist in (self.achieved_ratio, self.scoring_seconds, self.compaction_seconds, self.scoring_to_prefill):
            hist.labels(*lv)
        for kind in ("compressed", "full"):
            self.decode_step_seconds.labels(*lv, kind)
        for hist, values in ((self.achieved_ratio, stats.achieved_ratios),
                             (self.scoring_seconds, stats.scoring_seconds),
                             (self.compaction_seconds, stats.compaction_seconds),
                             (self.scoring_to_prefill, stats.scoring_to_prefill)):
            for v in values:
                hist.labels(*lv).observe(v)
        self.compressed_hits.labels(*lv).inc(stats.compressed_hits)
        for v in stats.decode_step_seconds_compressed:
            self.decode_step_seconds.labels(*lv, "compressed").observe(v)
        for v in stats.decode_step_seconds_full:
            self.decode_step_seconds.labels(*lv, "full").observe(v)
        for reason, count in stats.fallbacks.items():
            self.fallbacks.labels(*lv, reason).inc(count)
