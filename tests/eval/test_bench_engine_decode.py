# SPDX-License-Identifier: Apache-2.0
"""bench_engine_decode.py's own logic (no engine): the SGLang side's step times from the server's decode log.
The engines themselves run in the benchmark, and in the CI's end-to-end tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_engine_decode")


def _line(running: int, throughput: float) -> str:
    return (f"[2026-12-05 03:27:33] Decode batch, #running-req: {running}, #token: 658, token usage: 0.13, "
            f"cpu graph: False, gen throughput (token/s): {throughput:.2f}, #queue-req: 0\n")


def test_step_times_come_only_from_intervals_with_the_whole_batch_decoding(bench):
    log = "".join([
        _line(1, 1.42),  # the warm-up's request
        _line(4, 0.08),  # its interval began before the batch's prefills: dropped (previous line had 1)
        "[2026-12-05 03:27:33] Prefill batch, #new-seq: 1, #new-token: 8, #cached-token: 2048\n",
        _line(4, 20.0),  # 4 requests, 20 tokens/s: 200 ms per step
        _line(4, 16.0),  # 250 ms
        _line(3, 15.0),  # one request finished: not a 4-request interval
        _line(3, 15.0),  # a 3-request interval, not the asked batch
    ])
    assert bench.sglang_step_ms(log, 4) == pytest.approx([200.0, 250.0])
    assert bench.sglang_step_ms(log, 3) == pytest.approx([200.0])
    assert bench.sglang_step_ms(log, 8) == []


def test_the_parsed_line_is_the_one_sglang_writes():
    """The pattern follows SGLang's own decode log line (`SchedulerMetricsReporter.report_decode_stats`): the
    installed SGLang still writes `#running-req` first and `gen throughput (token/s)` later in one message."""
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (scripts/setup_sglang.sh)")
    # read, not imported: importing SGLang's scheduler modules needs its CUDA-side packages (the servers get shims)
    src = (Path(spec.submodule_search_locations[0]) / "srt" / "managers" / "scheduler_components"
           / "metrics_reporter.py").read_text()
    assert 'msg = f"Decode batch{iter_msg}, #running-req: {num_running_reqs}, {token_usage_msg}"' in src
    assert 'f"gen throughput (token/s): {self.last_gen_throughput:.2f}, "' in src
    assert "self.last_gen_throughput = self.num_generated_tokens / gap_latency" in src
