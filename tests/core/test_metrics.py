# SPDX-License-Identifier: Apache-2.0
"""KVzipStats aggregation and the Prometheus series it feeds."""

from __future__ import annotations

from prometheus_client import generate_latest

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
