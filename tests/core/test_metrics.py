# SPDX-License-Identifier: Apache-2.0
"""KVzipStats aggregation and the Prometheus series it feeds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvzip_plugin.metrics import KVzipStats, PromMetrics


def test_aggregate_adds_counts_and_keeps_latest_gauges():
    a = KVzipStats(prefixes_compressed=1, blocks_saved=10, jobs={"committed": 1, "failed": 0},
                   scoring_seconds=[1.0], fallbacks={"mla": 1})
    b = KVzipStats(prefixes_compressed=2, blocks_saved=None, jobs={"committed": 1, "failed": 2},
                   scoring_seconds=[2.0], compressed_hits=3, fallbacks={"swa": 2})
    c = a.aggregate(b)
    assert c.prefixes_compressed == 3 and c.blocks_saved == 10
    assert c.jobs["committed"] == 2 and c.jobs["failed"] == 2
    assert c.scoring_seconds == [1.0, 2.0] and c.compressed_hits == 3
    assert c.fallbacks == {"mla": 1, "swa": 2}
    assert c.aggregate(KVzipStats(blocks_saved=4)).blocks_saved == 4
    assert KVzipStats().is_empty() and not c.is_empty()
    assert KVzipStats.from_dict(c.to_dict()) == c


def test_prometheus_series():
    m = PromMetrics("vllm:", ["model_name", "engine"])
    m.observe(KVzipStats(prefixes_compressed=2, blocks_saved=12, bytes_saved=1 << 20,
                         jobs={"committed": 2, "failed": 1}, jobs_queued=3, achieved_ratios=[0.3, 0.31],
                         scoring_seconds=[1.5], decode_step_seconds_compressed=[0.01],
                         decode_step_seconds_full=[0.02, 0.03], fallbacks={"sliding_window": 1}),
              ["tiny", "0"])
    text = generate_latest(m.registry).decode()
    assert 'vllm:kvzip_prefixes_compressed_total{engine="0",model_name="tiny"} 2.0' in text
    assert 'vllm:kvzip_blocks_saved{engine="0",model_name="tiny"} 12.0' in text
    assert 'vllm:kvzip_jobs_total{engine="0",model_name="tiny",outcome="failed"} 1.0' in text
    assert 'vllm:kvzip_achieved_ratio_count{engine="0",model_name="tiny"} 2.0' in text
    assert 'vllm:kvzip_decode_step_seconds_count{engine="0",model_name="tiny",prefix="full"} 2.0' in text
    assert 'vllm:kvzip_fallbacks_total{engine="0",model_name="tiny",reason="sliding_window"} 1.0' in text


class _RecordingMetric:
    """Stands in for an engine's metric class that takes no `registry` (vLLM's Ray wrappers)."""

    made: list[tuple[str, dict]] = []

    def __init__(self, name: str, documentation: str, labelnames: list[str], **kw) -> None:
        self.made.append((name, kw))
        self.values: dict[tuple, float] = {}

    def labels(self, *labelvalues):
        return _Child(self.values, labelvalues)


class _Child:
    def __init__(self, values: dict, key: tuple) -> None:
        self.values, self.key = values, key

    def inc(self, v: float = 1) -> None:
        self.values[self.key] = self.values.get(self.key, 0) + v

    def set(self, v: float) -> None:
        self.values[self.key] = v

    def observe(self, v: float) -> None:
        self.values.setdefault(self.key, []).append(v)


def test_engine_metric_types():
    _RecordingMetric.made.clear()
    types = {Gauge: _RecordingMetric, Counter: _RecordingMetric, Histogram: _RecordingMetric}
    m = PromMetrics("vllm:", ["model_name", "engine"], metric_types=types)
    assert m.registry is None
    made = dict(_RecordingMetric.made)
    assert len(made) == 13 and all(name.startswith("vllm:kvzip_") for name in made)
    assert all("registry" not in kw for kw in made.values())
    assert made["vllm:kvzip_blocks_saved"] == {"multiprocess_mode": "mostrecent"}
    assert made["vllm:kvzip_achieved_ratio"]["buckets"][-1] == 1.0
    m.observe(KVzipStats(prefixes_compressed=2, blocks_saved=7, jobs={"failed": 1}), ["tiny", "0"])
    assert m.prefixes_compressed.values == {("tiny", "0"): 2}
    assert m.blocks_saved.values == {("tiny", "0"): 7}
    assert m.jobs.values[("tiny", "0", "failed")] == 1

    # prometheus_client's own classes (what vLLM's frontend passes) with an explicit registry
    reg = CollectorRegistry()
    m = PromMetrics("vllm:", ["model_name", "engine"], registry=reg,
                    metric_types={Gauge: Gauge, Counter: Counter, Histogram: Histogram})
    m.observe(KVzipStats(blocks_saved=3), ["tiny", "0"])
    assert m.registry is reg
    assert 'vllm:kvzip_blocks_saved{engine="0",model_name="tiny"} 3.0' in generate_latest(reg).decode()


def test_gauges_in_prometheus_multiprocess_mode(tmp_path):
    """vLLM's frontend switches prometheus_client to multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`) when it
    runs several API servers; the mode is fixed at import, hence the subprocess."""
    script = textwrap.dedent("""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
        from kvzip_plugin.metrics import KVzipStats, PromMetrics
        m = PromMetrics("vllm:", ["model_name", "engine"],
                        metric_types={Gauge: Gauge, Counter: Counter, Histogram: Histogram})
        m.observe(KVzipStats(prefixes_compressed=2, blocks_saved=7), ["tiny", "0"])
        m.observe(KVzipStats(prefixes_compressed=1, blocks_saved=9), ["tiny", "0"])
        registry = CollectorRegistry()  # = vllm.v1.metrics.prometheus.get_prometheus_registry()
        multiprocess.MultiProcessCollector(registry)
        print(generate_latest(registry).decode())
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, check=True).stdout
    assert 'vllm:kvzip_blocks_saved{engine="0",model_name="tiny"} 9.0' in out  # one series, no pid label
    assert 'vllm:kvzip_prefixes_compressed_total{engine="0",model_name="tiny"} 3.0' in out


def test_histogram_series_exist_before_their_first_observation():
    """rate() over a histogram must see the first observation as a rise from 0, so every label set
    is exported (count 0) from the first interval on."""
    reg = CollectorRegistry()
    PromMetrics("vllm:", ["model_name", "engine"], registry=reg).observe(KVzipStats(), ["m", "0"])
    text = generate_latest(reg).decode()
    for line in ('vllm:kvzip_achieved_ratio_count{engine="0",model_name="m"} 0.0',
                 'vllm:kvzip_scoring_to_prefill_ratio_count{engine="0",model_name="m"} 0.0',
                 'vllm:kvzip_decode_step_seconds_count{engine="0",model_name="m",prefix="compressed"} 0.0',
                 'vllm:kvzip_decode_step_seconds_count{engine="0",model_name="m",prefix="full"} 0.0'):
        assert line in text, line


def test_scoring_clock_splits_steps_by_token_share_and_keeps_capture_whole():
    from kvzip_plugin.metrics import ScoringClock

    clock = ScoringClock()
    assert clock.scoring_to_prefill(100) is None and clock.prefill_estimate(100) == 0.0
    clock.add_step(elapsed=3.0, capture=1.0, tokens=50, total_tokens=100)  # 2 s forward, half of it the job's
    clock.add_step(elapsed=1.0, capture=0.0, tokens=50, total_tokens=50)
    assert clock.forward_seconds == pytest.approx(2.0) and clock.capture_seconds == pytest.approx(1.0)
    assert clock.tokens == 100 and clock.seconds == pytest.approx(3.0)
    # 2 s for 100 tokens without the capture: a 50-token prefix prefills in 1 s
    assert clock.prefill_estimate(50) == pytest.approx(1.0)
    assert clock.scoring_to_prefill(50) == pytest.approx(3.0)
