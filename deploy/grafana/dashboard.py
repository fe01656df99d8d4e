# SPDX-License-Identifier: Apache-2.0
"""The KVzip + vLLM Grafana dashboard, built with grafana-foundation-sdk (pinned in
scripts/setup_deploy.sh) and written as JSON where Grafana and the Helm chart read it.

    python deploy/grafana/dashboard.py           # (re)write the JSON files
    python deploy/grafana/dashboard.py --check   # exit 1 if a checked-in file differs

Outputs: `deploy/grafana/kvzip-vllm.json` (docker compose provisioning) and
`deploy/helm/kvzip-vllm/files/kvzip-vllm.json` (the chart's dashboard ConfigMap); identical.

Layout follows vLLM's own Grafana dashboards (a `datasource` variable, a `model_name` variable, 12-column
time series two to a row) with an `instance` variable added for multi-replica deployments. Every query
uses only series that the plugin (`kvzip_plugin.metrics.PromMetrics`, prefix `vllm:`) or vLLM itself
exports; tests/deploy/test_prometheus_e2e.py runs each one against a real Prometheus scraping a real
`vllm serve --kv-compression kvzip` and fails on an empty result. SGLang (`sglang:kvzip_*`) is not
covered yet: its integration does not export metrics so far; `PREFIX` is the one place to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import QueryEditorMode

DEPLOY = Path(__file__).resolve().parents[1]
OUTPUTS = (DEPLOY / "grafana" / "kvzip-vllm.json", DEPLOY / "helm" / "kvzip-vllm" / "files" / "kvzip-vllm.json")
UID = "kvzip-vllm"
PREFIX = "vllm:"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# every series is filtered by the two label variables
SEL = 'model_name="$model_name", instance=~"$instance"'
FULL, COMPRESSED = 'prefix="full"', 'prefix="compressed"'


def m(name: str, extra: str = "") -> str:
    """`vllm:<name>{model_name=..., instance=~...[, extra]}`."""
    return f"{PREFIX}{name}{{{SEL}{', ' + extra if extra else ''}}}"


def mean(hist: str, by: str = "", extra: str = "") -> str:
    """Mean of histogram `hist` over the rate window: rate(sum) / rate(count)."""
    agg = f"sum by ({by}) " if by else "sum "
    return (f"{agg}(rate({m(hist + '_sum', extra)}[$__rate_interval])) / "
            f"{agg}(rate({m(hist + '_count', extra)}[$__rate_interval]))")


def quantile(q: float, hist: str, by: str = "", extra: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({m(hist + '_bucket', extra)}[$__rate_interval])))"


def lifetime_mean(hist: str, extra: str = "") -> str:
    """Mean since the engines started (cumulative sum / count): robust for rare events such as one
    compaction per prefix, which a rate window may not contain."""
    return f"sum({m(hist + '_sum', extra)}) / sum({m(hist + '_count', extra)})"


def target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return (prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range().datasource(DS)
            .editor_mode(QueryEditorMode.CODE))


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new rows."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.ids = 0

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    def place(self, w: int, h: int) -> GridPos:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self) -> GridPos:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = GridPos(h=1, w=24, x=0, y=self.y)
        self.y += 1
        return pos


def _targets(builder, queries: list[tuple[str, str]]):
    for i, (expr, legend) in enumerate(queries):
        builder = builder.with_target(target(expr, legend, chr(ord("A") + i)))
    return builder


def ts(layout: Layout, title: str, description: str, unit: str, queries: list[tuple[str, str]], w: int = 12,
       h: int = 8, **kw) -> timeseries.Panel:
    panel = (timeseries.Panel().id(layout.next_id()).title(title).description(description).unit(unit).datasource(DS)
             .grid_pos(layout.place(w, h)).fill_opacity(10).line_width(1).span_nulls(True)
             .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM)))
    if "min" in kw:
        panel = panel.min(kw["min"])
    if "max" in kw:
        panel = panel.max(kw["max"])
    return _targets(panel, queries)


def st(layout: Layout, title: str, description: str, unit: str, queries: list[tuple[str, str]], w: int = 4,
       h: int = 4, decimals: int | None = None) -> stat.Panel:
    panel = (stat.Panel().id(layout.next_id()).title(title).description(description).unit(unit).datasource(DS)
             .grid_pos(layout.place(w, h)).graph_mode(common.BigValueGraphMode.AREA)
             .color_mode(common.BigValueColorMode.VALUE)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _targets(panel, queries)


def build() -> dict:
    lay = Layout()
    d = (gd.Dashboard("KVzip KV-cache compression (vLLM)").uid(UID)
         .description("KVzip compression of shared prefixes in vLLM (kvzip-plugin): KV memory saved, "
                      "compressed-prefix hits, online decode speedup, compression cost and jobs, next to "
                      "the engine's KV usage, TTFT and throughput.")
         .tags(["vllm", "kvzip", "kv-cache"]).editable().tooltip(DashboardCursorSync.CROSSHAIR)
         .time("now-1h", "now").refresh("30s").timezone("browser"))

    d = d.with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
                        .current(VariableOption(selected=True, text="Prometheus", value="prometheus")))
    d = d.with_variable(gd.QueryVariable("model_name").label("Model").datasource(DS)
                        .query(f"label_values({PREFIX}num_requests_running, model_name)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    d = d.with_variable(gd.QueryVariable("instance").label("Instance").datasource(DS)
                        .query(f'label_values({PREFIX}num_requests_running{{model_name="$model_name"}}, instance)')
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                        .multi(True).include_all(True).all_value(".*"))

    # ---------------------------------------------------------------- overview
    d = d.with_row(gd.Row("KVzip overview").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(st(lay, "KV memory saved", "KV cache bytes freed by the live compacted prefixes, all "
                        "selected instances (vllm:kvzip_bytes_saved).", "bytes",
                        [(f"sum({m('kvzip_bytes_saved')})", "saved")]))
    d = d.with_panel(st(lay, "KV blocks saved", "KV blocks freed by the live compacted prefixes "
                        "(vllm:kvzip_blocks_saved).", "short", [(f"sum({m('kvzip_blocks_saved')})", "blocks")]))
    d = d.with_panel(st(lay, "Prefix KV freed", "Share of the compressed prefixes' KV that compaction "
                        "freed: 1 - mean kept ratio, since the engines started.", "percentunit",
                        [(f"1 - ({lifetime_mean('kvzip_achieved_ratio')})", "freed")], decimals=1))
    d = d.with_panel(st(lay, "Compressed-prefix hit share", "Requests admitted on a compacted prefix over "
                        "requests finished, since the engines started.", "percentunit",
                        [(f"sum({m('kvzip_compressed_prefix_hits_total')}) / sum({m('request_success_total')})",
                          "hit share")], decimals=1))
    d = d.with_panel(st(lay, "Online decode speedup", "Mean decode step time on full prefixes over that on "
                        "compressed prefixes, since the engines started (> 1: compressed prefixes decode "
                        "faster).", "x",
                        [(f"({lifetime_mean('kvzip_decode_step_seconds', FULL)}) / "
                          f"({lifetime_mean('kvzip_decode_step_seconds', COMPRESSED)})",
                          "speedup")], decimals=2))
    d = d.with_panel(st(lay, "Scoring / prefill", "Mean scoring time of a prefix over its prefill time, since "
                        "the engines started: the one-off cost of compressing a prefix.", "x",
                        [(lifetime_mean("kvzip_scoring_to_prefill_ratio"), "overhead")], decimals=2))

    # ---------------------------------------------------------------- memory
    d = d.with_row(gd.Row("KV memory saved").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "KV memory saved", "KV cache bytes freed by the live compacted prefixes, per "
                        "instance (vllm:kvzip_bytes_saved). Drops when a compacted prefix is evicted.", "bytes",
                        [(f"sum by (instance) ({m('kvzip_bytes_saved')})", "{{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Engine KV cache usage", "vLLM's KV cache usage (vllm:kv_cache_usage_perc): "
                        "the blocks KVzip frees come back to this pool.", "percentunit",
                        [(f"max by (instance) ({m('kv_cache_usage_perc')})", "{{instance}}")], min=0, max=1))
    d = d.with_panel(ts(lay, "KV blocks saved", "KV blocks freed by the live compacted prefixes, per "
                        "instance (vllm:kvzip_blocks_saved).", "short",
                        [(f"sum by (instance) ({m('kvzip_blocks_saved')})", "{{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Achieved ratio (kept fraction)", "Kept fraction of each compacted prefix "
                        "(vllm:kvzip_achieved_ratio; 0.3 = 70% of the prefix KV freed). Points only where "
                        "prefixes were compacted in the window.", "percentunit",
                        [(mean("kvzip_achieved_ratio"), "mean"),
                         (quantile(0.9, "kvzip_achieved_ratio"), "p90")], min=0, max=1))

    # ---------------------------------------------------------------- hits
    d = d.with_row(gd.Row("Compressed-prefix hits").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Compressed-prefix hits", "Requests admitted on a compacted prefix per second "
                        "(vllm:kvzip_compressed_prefix_hits_total), next to all finished requests.", "reqps",
                        [(f"sum by (instance) (rate({m('kvzip_compressed_prefix_hits_total')}[$__rate_interval]))",
                          "compressed-prefix hits {{instance}}"),
                         (f"sum by (instance) (rate({m('request_success_total')}[$__rate_interval]))",
                          "requests finished {{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Hit rate", "Compressed-prefix hits over finished requests, and vLLM's own "
                        "prefix-cache hit rate (cached prompt tokens over prompt tokens looked up).",
                        "percentunit",
                        [(f"sum(rate({m('kvzip_compressed_prefix_hits_total')}[$__rate_interval])) / "
                          f"sum(rate({m('request_success_total')}[$__rate_interval]))", "compressed-prefix hit rate"),
                         (f"sum(rate({m('prefix_cache_hits_total')}[$__rate_interval])) / "
                          f"sum(rate({m('prefix_cache_queries_total')}[$__rate_interval]))",
                          "engine prefix-cache hit rate (tokens)")], min=0, max=1))

    # ---------------------------------------------------------------- decode
    d = d.with_row(gd.Row("Online decode speedup").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Decode time per token: compressed vs full prefix", "Per-request decode step "
                        "time of requests on compacted prefixes and on full (uncompressed) prefixes "
                        "(vllm:kvzip_decode_step_seconds{prefix}).", "s",
                        [(mean("kvzip_decode_step_seconds", by="prefix"), "mean, {{prefix}} prefix"),
                         (quantile(0.9, "kvzip_decode_step_seconds", by="prefix"), "p90, {{prefix}} prefix")],
                        min=0))
    d = d.with_panel(ts(lay, "Online decode speedup (full / compressed)", "Mean decode step time on full "
                        "prefixes over that on compressed prefixes (> 1: faster on compressed prefixes). "
                        "Needs both kinds of requests in the window. Alert: "
                        "KVzipDecodeSlowerOnCompressedPrefixes.", "x",
                        [(f"({mean('kvzip_decode_step_seconds', extra=FULL)}) / "
                          f"({mean('kvzip_decode_step_seconds', extra=COMPRESSED)})", "speedup")],
                        min=0))

    # ---------------------------------------------------------------- cost
    d = d.with_row(gd.Row("Compression cost").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Scoring and compaction time per prefix", "Time of the KVzip scoring pass and of "
                        "the compaction copy per compressed prefix (vllm:kvzip_scoring_seconds, "
                        "vllm:kvzip_compaction_seconds).", "s",
                        [(mean("kvzip_scoring_seconds"), "scoring, mean"),
                         (quantile(0.9, "kvzip_scoring_seconds"), "scoring, p90"),
                         (mean("kvzip_compaction_seconds"), "compaction, mean")], min=0))
    d = d.with_panel(ts(lay, "Scoring time / prefill time", "Scoring time of each prefix over its prefill time "
                        "(vllm:kvzip_scoring_to_prefill_ratio): the one-off overhead, paid once per prefix.",
                        "x",
                        [(mean("kvzip_scoring_to_prefill_ratio"), "mean"),
                         (quantile(0.9, "kvzip_scoring_to_prefill_ratio"), "p90")], min=0))

    # ---------------------------------------------------------------- jobs
    d = d.with_row(gd.Row("Compression jobs").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Jobs per minute by outcome", "KVzip jobs submitted, committed, failed, cancelled "
                        "and rejected (queue full) per minute (vllm:kvzip_jobs_total{outcome}). Alerts: "
                        "KVzipJobsFailing, KVzipPrefixesLeftUncompressed.", "short",
                        [(f"60 * sum by (outcome) (rate({m('kvzip_jobs_total')}[$__rate_interval]))", "{{outcome}}")],
                        min=0))
    d = d.with_panel(ts(lay, "Jobs queued and running", "KVzip jobs waiting and scoring or compacting "
                        "(vllm:kvzip_jobs_queued, vllm:kvzip_jobs_running). Alert: KVzipJobQueueGrowing.",
                        "short",
                        [(f"sum by (instance) ({m('kvzip_jobs_queued')})", "queued {{instance}}"),
                         (f"sum by (instance) ({m('kvzip_jobs_running')})", "running {{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Compression fallbacks", "Engines that run without compression although started "
                        "with --kv-compression kvzip, by reason (vllm:kvzip_fallbacks_total; one series per "
                        "disabled engine, absent when every engine compresses). Alert: KVzipCompressionFallback.",
                        "short",
                        [(f"max by (instance, reason) ({m('kvzip_fallbacks_total')})", "{{instance}}: {{reason}}")],
                        min=0))
    d = d.with_panel(ts(lay, "Prefixes compressed", "Compactions committed since the engines started, per "
                        "instance (vllm:kvzip_prefixes_compressed_total).", "short",
                        [(f"sum by (instance) ({m('kvzip_prefixes_compressed_total')})", "{{instance}}")], min=0))

    # ---------------------------------------------------------------- engine
    d = d.with_row(gd.Row("Engine (vLLM)").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Time to first token", "vLLM's TTFT (vllm:time_to_first_token_seconds): "
                        "percentiles and mean.", "s",
                        [(quantile(0.99, "time_to_first_token_seconds"), "p99"),
                         (quantile(0.9, "time_to_first_token_seconds"), "p90"),
                         (quantile(0.5, "time_to_first_token_seconds"), "p50"),
                         (mean("time_to_first_token_seconds"), "mean")], min=0))
    d = d.with_panel(ts(lay, "Token throughput", "Prompt and generated tokens per second "
                        "(vllm:prompt_tokens_total, vllm:generation_tokens_total).", "short",
                        [(f"sum(rate({m('prompt_tokens_total')}[$__rate_interval]))", "prompt tokens/s"),
                         (f"sum(rate({m('generation_tokens_total')}[$__rate_interval]))", "generation tokens/s")],
                        min=0))
    d = d.with_panel(ts(lay, "Scheduler state", "Requests running and waiting "
                        "(vllm:num_requests_running, vllm:num_requests_waiting).", "short",
                        [(f"sum({m('num_requests_running')})", "running"),
                         (f"sum({m('num_requests_waiting')})", "waiting")], min=0))
    d = d.with_panel(ts(lay, "Inter-token latency", "vLLM's inter-token latency "
                        "(vllm:inter_token_latency_seconds), all requests.", "s",
                        [(quantile(0.99, "inter_token_latency_seconds"), "p99"),
                         (quantile(0.5, "inter_token_latency_seconds"), "p50"),
                         (mean("inter_token_latency_seconds"), "mean")], min=0))

    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a checked-in file differs")
    args = ap.parse_args(argv)
    text = render()
    stale = [p for p in OUTPUTS if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
