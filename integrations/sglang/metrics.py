# SPDX-License-Identifier: Apache-2.0
"""Metrics of KVzip inside SGLang: the `sglang:kvzip_*` Prometheus series (labelled like SGLang's own
radix-cache series), the step clocks behind the decode-step and scoring-time histograms, and the state /
job dumps (`KVZIP_DUMP_DIR`) the tests and benchmarks read.

Everything runs on the scheduler thread: `KVzipRadixCache` calls `StepClock.start_batch` when a
`ForwardBatch` is built and `StepClock.end_batch` when its results were processed
(`flush_pending_backups`), and `MetricsPublisher.flush` from its pump."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvzip_plugin import envs
from kvzip_plugin.metrics import KVzipStats

logger = logging.getLogger("sglang.kvzip_plugin")

STATS_INTERVAL_S = 1.0


class MetricsPublisher:
    """The statistics gathered since the last flush (`stats`) and the series they go to (None without
    `--enable-metrics`). A flush publishes at most once per `STATS_INTERVAL_S` unless forced or the job
    gauges changed: a job shorter than the interval must still show on `kvzip_jobs_queued`/`_running`."""

    def __init__(self, enable_metrics: bool, model_name: str | None) -> None:
        self.stats = KVzipStats()
        self.prom: Any = None
        self.labels: list[str] = []
        self._flushed = 0.0
        self._jobs_published: tuple[int, int] | None = None
        if enable_metrics:
            try:
                self.prom, self.labels = make_prom_metrics(model_name)
            except Exception as exc:  # metrics must never take the cache down
                logger.warning("kvzip-plugin: sglang:kvzip_* metrics unavailable: %r", exc)

    def flush(self, blocks_saved: int, bytes_saved: int, jobs_queued: int, jobs_running: int,
              force: bool = False) -> None:
        now = time.monotonic()
        jobs_changed = (jobs_queued, jobs_running) != self._jobs_published
        if not force and not jobs_changed and now - self._flushed < STATS_INTERVAL_S:
            return
        self._flushed, self._jobs_published = now, (jobs_queued, jobs_running)
        self.stats.blocks_saved, self.stats.bytes_saved = blocks_saved, bytes_saved
        self.stats.jobs_queued, self.stats.jobs_running = jobs_queued, jobs_running
        stats, self.stats = self.stats, KVzipStats()
        if self.prom is not None:
            try:
                self.prom.observe(stats, self.labels)
            except Exception as exc:  # pragma: no cover
                logger.warning("kvzip-plugin: metrics update failed: %r", exc)


@dataclass
class _Step:
    started: float
    compressed: int = 0  # decode batch: requests on compacted prefixes
    full: int = 0  # decode batch: the others
    scoring_tokens: dict[int, int] | None = None  # extend batch: job id -> its scoring tokens in the batch
    batch_tokens: int = 0
    capture_at_start: dict[int, float] | None = None  # job id -> its capture seconds when the batch started


class StepClock:
    """Times one batch from its `ForwardBatch` to its processed results: a pure-decode batch's step time
    goes to the decode-step histograms (per request, compressed vs full prefix); an extend batch with
    scoring rows adds its time to each job's `ScoringClock`."""

    def __init__(self) -> None:
        self._step: _Step | None = None

    def start_decode(self, compressed: int, full: int) -> None:
        self._step = _Step(time.perf_counter(), compressed=compressed, full=full)

    def start_scoring(self, tokens: dict[int, int], batch_tokens: int, capture_at_start: dict[int, float]) -> None:
        self._step = _Step(time.perf_counter(), scoring_tokens=tokens, batch_tokens=batch_tokens,
                           capture_at_start=capture_at_start)

    def clear(self) -> None:
        self._step = None

    def end_batch(self, stats: KVzipStats, clocks: dict[int, Any], capture_seconds) -> None:
        """`clocks`: job id -> its `ScoringClock` (jobs still alive); `capture_seconds(job_id)` -> float."""
        step, self._step = self._step, None
        if step is None:
            return
        elapsed = time.perf_counter() - step.started
        if step.scoring_tokens is None:
            stats.decode_step_seconds_compressed.extend([elapsed] * step.compressed)
            stats.decode_step_seconds_full.extend([elapsed] * step.full)
            return
        for job_id, n in step.scoring_tokens.items():
            clock = clocks.get(job_id)
            if clock is not None:
                clock.add_step(elapsed, capture_seconds(job_id) - step.capture_at_start.get(job_id, 0.0), n,
                               step.batch_tokens)


def write_state(state: dict) -> None:
    """The cache's state as `<KVZIP_DUMP_DIR>/state.json` (written atomically); nothing without the variable."""
    out = envs.dump_dir()
    if out is None:
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".state-{os.getpid()}.json"
        tmp.write_text(json.dumps(state))
        tmp.replace(Path(out) / "state.json")
    except Exception as exc:  # pragma: no cover
        logger.warning("kvzip-plugin: state dump failed: %r", exc)


def write_job(job_id: int, record: dict) -> None:
    """One committed job (what it kept, its scores, the slots copied) as `<KVZIP_DUMP_DIR>/job-<id>.pt`."""
    out = envs.dump_dir()
    if out is None:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"job_id": job_id, **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()}},
               Path(out) / f"job-{job_id}.pt")


def served_model_name(server_args: Any) -> str | None:
    """The `model_name` label SGLang puts on its own series (`--served-model-name`, else the model path)."""
    if server_args is None:
        return None
    name = getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", None)
    return None if name is None else str(name)


def make_prom_metrics(model_name: str | None = None) -> tuple[Any, list[str]]:
    """`sglang:kvzip_*` series labelled like SGLang's radix-cache metrics (cache_type, tp/pp/dp rank, extra
    labels), plus `model_name` like SGLang's scheduler series (so dashboards select them the same way).
    Built in the scheduler process after SGLang set PROMETHEUS_MULTIPROC_DIR (`--enable-metrics`), so
    `/metrics` serves them through its multiprocess collector."""
    from sglang.srt.layers.dp_attention import is_dp_attention_enabled
    from sglang.srt.observability.metrics_collector import radix_cache_metric_labels
    from sglang.srt.runtime_context import get_observability, get_parallel

    from kvzip_plugin.metrics import PromMetrics

    labels = radix_cache_metric_labels("UnifiedRadixCache", get_parallel(), is_dp_attention_enabled())
    if model_name is not None:
        labels["model_name"] = model_name
    extra = get_observability().extra_metric_labels
    if extra:
        labels.update(extra)
    names = list(labels)
    return PromMetrics(prefix="sglang:", labelnames=names), [str(labels[n]) for n in names]


def report_fallback(code: str, enable_metrics: bool, model_name: str | None = None) -> None:
    """Count one fallback (`sglang:kvzip_fallbacks_total{reason}`) where no KVzipRadixCache exists (the
    factory built SGLang's default cache). Only with --enable-metrics; never raises."""
    if not enable_metrics:
        return
    try:
        prom, labels = make_prom_metrics(model_name)
        prom.observe(KVzipStats(fallbacks={code: 1}), labels)
    except Exception as exc:  # pragma: no cover
        logger.debug("kvzip-plugin: fallback metric not recorded: %r", exc)
