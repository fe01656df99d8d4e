# SPDX-License-Identifier: Apache-2.0
"""The SGLang dashboard and alert rules against a real Prometheus scraping real SGLang servers.

Two real `python -m sglang.launch_server --kv-compression kvzip --enable-metrics` processes (SGLang 0.5.23
on this CPU through tests/integrations/sglang/harness.py, the tiny local Llama served as `tiny`, loopback):

* `kvzip`: SGLang's radix cache with KVzip (trigger lowered to 64-token prefixes hit twice, ratio 0.5), so
  shared prefixes are compressed;
* `fallback`: `--disable-radix-cache`, so KVzip falls back to SGLang's default cache and exports
  `sglang:kvzip_fallbacks_total{reason="radix_cache_disabled"}`. This is the cheapest real way to make SGLang
  fall back (others need speculative decoding, pipeline parallelism, HiCache or an unsupported model); the
  fallback alert therefore fires on a real series here, as on vLLM.

The same Prometheus as test_prometheus_e2e.py (the `e2e_stack` fixture, tests/deploy/e2e.py: one process
with both rule files, scraping every engine's servers; the SGLang servers run with `--sleep-on-idle` so that
they leave the CPU to the vLLM ones when idle). Before the test, the fixture sends the same short multi-tenant
chat load as to vLLM (8 tenants, two phases, OpenAI chat API, at the same time as the vLLM load) to the
kvzip server and a few requests to the fallback one.

Then the very checks of the vLLM test (`e2e.check_deployment`) on deploy/grafana/kvzip-sglang.json and
deploy/prometheus/kvzip-sglang-rules.yml: every panel query and recording rule has a series with a finite
value over the load window, every rule is healthy and every alert expression evaluates, the variables list
the model and exactly the two SGLang instances (so the vLLM servers scraped beside them do not leak in), the
fallback alert is pending on the fallback server and nothing else but the noisy decode-speedup alert is
active on the two, and every `sglang:*` name used is among the names the two servers export. Skipped when
SGLang is not installed (scripts/setup_sglang.sh).

`KVZIP_DEPLOY_DUMP_SGLANG=path.json` writes every panel's query results there (input of
`deploy/grafana/render_preview.py --dashboard deploy/grafana/kvzip-sglang.json`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.deploy.conftest import SGLANG
from tests.integrations.sglang import harness

if (_missing := harness.sglang_missing_reason()) is not None:
    pytest.skip(_missing, allow_module_level=True)

from kvzip_plugin.eval import loadgen  # noqa: E402
from tests.deploy import e2e  # noqa: E402

E2E_ENGINE = "sglang"  # the servers this module needs from the `e2e_stack` fixture


def test_sglang_dashboard_and_rules_on_real_prometheus(e2e_stack):
    kvzip, fallback, window = e2e_stack.loaded("sglang")
    snap = loadgen.scrape(kvzip.url)
    compressed = snap.get("sglang:kvzip_prefixes_compressed_total", model_name=e2e.MODEL)
    assert compressed is not None and compressed >= 4, f"the load compressed {compressed} prefixes, expected >= 4"
    dump = Path(os.environ["KVZIP_DEPLOY_DUMP_SGLANG"]) if os.environ.get("KVZIP_DEPLOY_DUMP_SGLANG") else None
    problems = e2e.check_deployment(e2e_stack.prom, SGLANG, window, kvzip, fallback, "radix_cache_disabled", dump)
    assert not problems, "\n".join(problems)
