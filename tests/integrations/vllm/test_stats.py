# SPDX-License-Identifier: Apache-2.0
"""KVzip stats on vLLM's connector-metrics transport, through vLLM's own classes: TP workers' stats
pickled and merged by `KVOutputAggregator`, merged with the scheduler side's, shipped to the frontend
in msgpack-encoded `EngineCoreOutputs`, logged by `KVConnectorLogging` and exported by
`KVConnectorProm` / `PrometheusStatLogger`. No engine is started."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvzip_plugin.integrations.vllm import stats as kvstats  # noqa: E402
from kvzip_plugin.integrations.vllm.stats import KVzipConnectorStats, KVzipPromMetrics  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: E402
    KVConnectorLogging,
    KVConnectorProm,
)
from vllm.v1.engine import EngineCoreOutputs  # noqa: E402
from vllm.v1.metrics.prometheus import get_prometheus_registry, unregister_vllm_metrics  # noqa: E402
from vllm.v1.metrics.stats import SchedulerStats  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402

from kvzip_plugin.metrics import KVzipStats  # noqa: E402


class StatsOnlyConnector(KVConnectorBase_V1):
    """Stands in for KVzipConnector: only the two classmethods the frontend calls (never instantiated)."""

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVzipConnectorStats | None:
        return kvstats.build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KVzipPromMetrics:
        return kvstats.build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _transfer_config() -> KVTransferConfig:
    return KVTransferConfig(kv_connector="StatsOnlyConnector", kv_connector_module_path=__name__,
                            kv_role="kv_both")


# two TP workers (decode steps) and the scheduler side (jobs, savings)
WORKER0 = KVzipStats(compressed_hits=2, decode_step_seconds_compressed=[0.004, 0.006],
                     decode_step_seconds_full=[0.01])
WORKER1 = KVzipStats(compressed_hits=1, decode_step_seconds_compressed=[0.005], fallbacks={"sliding_window": 1})
SCHEDULER = KVzipStats(prefixes_compressed=2, blocks_saved=12, bytes_saved=3 << 20,
                       jobs={"submitted": 3, "committed": 2, "failed": 1}, jobs_queued=1, jobs_running=0,
                       achieved_ratios=[0.25, 0.35], scoring_seconds=[1.5, 2.5], compaction_seconds=[0.2],
                       scoring_to_prefill=[2.0, 3.0])
MERGED = WORKER0.aggregate(WORKER1).aggregate(SCHEDULER)


def _engine_core_side() -> KVzipConnectorStats:
    """What EngineCore does in one step: workers -> (pickle) -> KVOutputAggregator, + scheduler side."""
    outputs = []
    for s in (WORKER0, WORKER1):
        out = ModelRunnerOutput(req_ids=[], req_id_to_index={},
                                kv_connector_output=KVConnectorOutput(
                                    kv_connector_stats=KVzipConnectorStats.from_stats(s)))
        outputs.append(pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)))  # shm MessageQueue
    worker_stats = KVOutputAggregator(expected_finished_count=2).aggregate(outputs).kv_connector_output
    worker_stats = worker_stats.kv_connector_stats
    assert isinstance(worker_stats, KVzipConnectorStats)
    scheduler_stats = KVzipConnectorStats.from_stats(SCHEDULER)
    assert not scheduler_stats.is_empty()
    return worker_stats.aggregate(scheduler_stats)  # Scheduler.update_from_output


def _to_frontend(stats: KVzipConnectorStats, engine_index: int = 0) -> SchedulerStats:
    """Scheduler.make_stats -> EngineCoreOutputs -> msgpack (ZMQ) -> the frontend's decoder."""
    outputs = EngineCoreOutputs(engine_index=engine_index, scheduler_stats=SchedulerStats(
        num_running_reqs=1, kv_connector_stats=stats.to_dict()))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
    assert decoded.scheduler_stats is not None
    return decoded.scheduler_stats


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    unregister_vllm_metrics()
    yield
    unregister_vllm_metrics()


def test_stats_roundtrip_aggregate_reduce_reset():
    s = KVzipConnectorStats.from_stats(WORKER0)
    assert s.stats == WORKER0 and not s.is_empty()
    assert KVzipConnectorStats().is_empty() and kvstats.build_kv_connector_stats(None).is_empty()
    assert kvstats.build_kv_connector_stats(MERGED.to_dict()).stats == MERGED

    merged = s.aggregate(KVzipConnectorStats.from_stats(WORKER1))
    assert merged.stats == WORKER0.aggregate(WORKER1)
    assert s.stats == WORKER0  # aggregate returns a new object

    assert KVzipConnectorStats.from_stats(MERGED).reduce() == {
        "Prefixes compressed": 2, "Jobs submitted": 3, "Jobs committed": 2, "Jobs failed": 1,
        "Jobs queued": 1, "Jobs running": 0, "Blocks saved": 12, "MiB saved": 3.0,
        "Avg kept ratio": 0.3, "Avg scoring time (s)": 2.0, "Avg compaction time (s)": 0.2,
        "Avg scoring/prefill": 2.5, "Avg decode step compressed (ms)": 5.0, "Avg decode step full (ms)": 10.0,
        "Compressed prefix hits": 3, "Decode speedup": 2.0, "Fallbacks sliding_window": 1,
    }

    live = KVzipConnectorStats.from_stats(MERGED)
    snapshot = live.clone_and_reset()
    assert snapshot.stats == MERGED and live.is_empty()
    live.data["compressed_hits"] = 5  # a new interval does not leak into the snapshot
    assert snapshot.stats == MERGED
    live.reset()
    assert live.is_empty() and live.stats == KVzipStats()


def test_stats_survive_the_process_hops():
    merged = _engine_core_side()
    assert merged.stats == MERGED
    sched = _to_frontend(merged)
    assert sched.kv_connector_stats == MERGED.to_dict()
    assert kvstats.build_kv_connector_stats(sched.kv_connector_stats).stats == MERGED


def test_frontend_log_line():
    kv_logging = KVConnectorLogging(_transfer_config())
    for _ in range(2):  # two engine steps within one log interval
        kv_logging.observe(_to_frontend(_engine_core_side()).kv_connector_stats)
    lines: list[str] = []
    kv_logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1
    assert lines[0].startswith("KV Transfer metrics: Prefixes compressed=4, Jobs submitted=6, Jobs committed=4, ")
    assert "Compressed prefix hits=6, Decode speedup=2.0, Fallbacks sliding_window=2" in lines[0]
    kv_logging.log(log_fn=lines.append)  # reset after logging: nothing new to say
    assert len(lines) == 1


def _series(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} "
    found = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, (prefix, [line for line in text.splitlines() if line.startswith(name)])
    return float(found[0])


def test_connector_prom_exports_vllm_kvzip_series(clean_registry):
    config = SimpleNamespace(kv_transfer_config=_transfer_config())
    prom = KVConnectorProm(config, ["model_name", "engine"], {0: ["tiny", "0"], 1: ["tiny", "1"]})
    assert isinstance(prom.prom_metrics, KVzipPromMetrics)
    data = _to_frontend(_engine_core_side()).kv_connector_stats
    prom.observe(data, engine_idx=1)
    prom.observe(data, engine_idx=1)
    prom.observe(KVzipConnectorStats.from_stats(KVzipStats(blocks_saved=5)).to_dict(), engine_idx=1)

    text = generate_latest(get_prometheus_registry()).decode()  # what vLLM's /metrics serves
    e1 = {"model_name": "tiny", "engine": "1"}
    assert _series(text, "vllm:kvzip_prefixes_compressed_total", **e1) == 4
    assert _series(text, "vllm:kvzip_blocks_saved", **e1) == 5  # gauge: latest value
    assert _series(text, "vllm:kvzip_bytes_saved", **e1) == 3 << 20
    assert _series(text, "vllm:kvzip_jobs_total", **e1, outcome="failed") == 2
    assert _series(text, "vllm:kvzip_jobs_total", **e1, outcome="committed") == 4
    assert _series(text, "vllm:kvzip_jobs_total", **e1, outcome="cancelled") == 0
    assert _series(text, "vllm:kvzip_jobs_queued", **e1) == 1
    assert _series(text, "vllm:kvzip_compressed_prefix_hits_total", **e1) == 6
    assert _series(text, "vllm:kvzip_decode_step_seconds_count", **e1, prefix="compressed") == 6
    assert _series(text, "vllm:kvzip_decode_step_seconds_count", **e1, prefix="full") == 2
    assert _series(text, "vllm:kvzip_decode_step_seconds_bucket", **e1, prefix="compressed", le="0.005") == 4
    assert _series(text, "vllm:kvzip_decode_step_seconds_sum", **e1, prefix="full") == pytest.approx(0.02)
    assert _series(text, "vllm:kvzip_achieved_ratio_count", **e1) == 4
    assert _series(text, "vllm:kvzip_scoring_seconds_sum", **e1) == pytest.approx(8.0)
    assert _series(text, "vllm:kvzip_scoring_to_prefill_ratio_bucket", **e1, le="2.0") == 2
    assert _series(text, "vllm:kvzip_fallbacks_total", **e1, reason="sliding_window") == 2
    assert 'engine="0"' not in "\n".join(line for line in text.splitlines() if line.startswith("vllm:kvzip_"))

    # vLLM rebuilds its loggers after unregistering every `vllm:` collector: ours must go with them
    unregister_vllm_metrics()
    assert "vllm:kvzip_" not in generate_latest(get_prometheus_registry()).decode()
    KVConnectorProm(config, ["model_name", "engine"], {0: ["tiny", "0"]})


def test_prometheus_stat_logger_records_kvzip_series(clean_registry, tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    config = EngineArgs(model=str(tiny_model_dir), served_model_name="tiny", max_model_len=256, block_size=32,
                        enforce_eager=True, kv_transfer_config=_transfer_config()).create_engine_config()
    logger = PrometheusStatLogger(config, engine_indexes=[0, 1])
    logger.record(scheduler_stats=_to_frontend(_engine_core_side(), engine_index=1), iteration_stats=None,
                  engine_idx=1)

    text = generate_latest(get_prometheus_registry()).decode()
    e1 = {"model_name": "tiny", "engine": "1"}
    assert _series(text, "vllm:num_requests_running", **e1) == 1  # vLLM's own series, same scrape
    assert _series(text, "vllm:kvzip_prefixes_compressed_total", **e1) == 2
    assert _series(text, "vllm:kvzip_blocks_saved", **e1) == 12
    assert _series(text, "vllm:kvzip_jobs_total", **e1, outcome="failed") == 1
    assert _series(text, "vllm:kvzip_decode_step_seconds_count", **e1, prefix="compressed") == 3
    assert _series(text, "vllm:kvzip_fallbacks_total", **e1, reason="sliding_window") == 1
