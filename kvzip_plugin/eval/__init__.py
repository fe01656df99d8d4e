# SPDX-License-Identifier: Apache-2.0
"""Evaluation tooling beside the runtime: named data sets (`datasets`), answer metrics (`metrics`),
baseline scorers compared against KVzip (`baselines`) and the multi-tenant load generator (`loadgen`).

The engines never import this package; benchmarks, tests and the `kvzip-plugin load` command do.
"""
