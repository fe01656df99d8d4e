# SPDX-License-Identifier: Apache-2.0
"""A short seeded fault run on each real CPU server (`suite.py`: client aborts, a cache reset while a job
runs, salts, a restart into ratio 1.0; the comparison with a `none` server is left to the long run and to the
e2e tests); the long run is `python -m tests.fault.suite`
(result in benchmarks/results/fault-suite-*.json). A few minutes per engine on the 2-core CI machine."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tests.fault.servers import Outcome
from tests.fault.suite import plan, run


def test_the_plan_is_seeded_and_mixes_the_faults():
    a, b = plan(200, 3, seed=5), plan(200, 3, seed=5)
    assert a == b and a != plan(200, 3, seed=6)
    assert {p.segment for p in a} == {0, 1, 2}
    aborted = sum(p.abort_after is not None for p in a)
    salted = sum(p.salt is not None for p in a)
    assert 20 < aborted < 60 and 25 < salted < 80
    assert all(p.abort_after is None or 1 <= p.abort_after < p.max_tokens for p in a)
    assert len({tuple(p.ids[:160]) for p in a}) == 3  # three shared prefixes


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_short_fault_run(engine, tmp_path):
    if engine == "vllm":
        pytest.importorskip("vllm")
    else:
        from tests.integrations.sglang import harness

        harness.require_sglang()
    from tests.integrations.vllm.tiny_model import build_tiny_llama

    report = run(engine, build_tiny_llama(tmp_path / "model"), tmp_path, n=90, prefixes=3, seed=1, identity=False)
    detail = json.dumps(asdict(report), indent=1)[:8000]
    assert report.failures() == [], detail
    assert report.outcomes.get(Outcome.OK, 0) >= 45 and report.outcomes.get(Outcome.ABORTED, 0) > 0, detail
    # the reset met a job (queued or scoring) and got the engine's own answer: vLLM resets (running requests
    # preempted), SGLang refuses while requests run (400, as without the plugin)
    reset = report.events[0]
    assert reset["event"] == "reset" and reset["reset_met_the_job"], detail
    if engine == "vllm":  # vLLM reset: the plugin cancelled the job (its pinned blocks released) and it succeeded
        assert reset["answer"]["status"] == 200 and reset["cancelled"] > reset["jobs_before"]["cancelled"], detail
    else:  # SGLang refuses to flush while requests run, with or without the plugin
        assert reset["answer"]["status"] == 400, detail
