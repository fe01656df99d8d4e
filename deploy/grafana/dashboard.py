# SPDX-License-Identifier: Apache-2.0
"""The KVzip Grafana dashboards, one per serving engine (vLLM, SGLang), built with grafana-foundation-sdk
(pinned in scripts/setup_deploy.sh) and written as JSON where Grafana and the Helm chart read them.

    python deploy/grafana/dashboard.py           # (re)write the JSON files
    python deploy/grafana/dashboard.py --check   # exit 1 if a checked-in file differs

Outputs: `deploy/grafana/kvzip-vllm.json` (docker compose provisioning) and its identical copy
`deploy/helm/kvzip-vllm/files/kvzip-vllm.json` (the chart's dashboard ConfigMap);
`deploy/grafana/kvzip-sglang.json` (docker compose provisioning).

Both dashboards have the same KVzip panels on the plugin's `<prefix>kvzip_*` series
(`kvzip_plugin.metrics.PromMetrics`, prefix `vllm:` or `sglang:`) and the engine's own KV usage, TTFT,
throughput and scheduler panels on that engine's series; `Engine` holds everything that differs. Layout
follows vLLM's own Grafana dashboards (a `datasource` variable, a `model_name` variable, 12-column time
series two to a row) with an `instance` variable added for multi-replica deployments.
tests/deploy/test_prometheus_e2e.py and test_prometheus_e2e_sglang.py run every query against a real
Prometheus scraping real `vllm serve` / `sglang.launch_server` processes with `--kv-compression kvzip` and
fail on an empty result.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
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
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# every series is filtered by the two label variables
SEL = 'model_name="$model_name", instance=~"$instance"'
FULL, COMPRESSED = 'prefix="full"', 'prefix="compressed"'


@dataclass(frozen=True)
class Engine:
    """What differs between the engines' dashboards, and the PromQL helpers on that engine's series.
    Metric names are given without the prefix."""

    key: str
    """`vllm` or `sglang`: the dashboard uid `kvzip-<key>`, its file name and a tag."""
    name: str
    """Shown in titles and descriptions: `vLLM`, `SGLang`."""
    prefix: str
    """Of every series, the plugin's and the engine's: `vllm:`, `sglang:`."""
    outputs: tuple[str, ...]
    """Where the JSON is written, relative to deploy/ (identical copies)."""
    unit: str
    """What the "saved" count panels count: `block` (vLLM's KV blocks) or `slot` (SGLang's token slots)."""
    page_size: str | None
    """The engine's gauge of slots per `kvzip_blocks_saved` unit (SGLang: `page_size`, pages of `--page-size`
    token slots, 1 by default), or None where the unit is the block itself (vLLM)."""
    running: str
    waiting: str
    kv_usage: str
    """The engine's KV-pool usage gauge, 0..1."""
    kv_usage_desc: str
    requests_finished: str
    """Counter of finished requests: the denominator of the compressed-prefix hit share."""
    cache_hits: str
    cache_queries: str
    """Token counters whose rate ratio is the engine's own prefix-cache hit rate."""
    cache_hit_desc: str

    @property
    def uid(self) -> str:
        return f"kvzip-{self.key}"

    def m(self, name: str, extra: str = "") -> str:
        """`<prefix><name>{model_name=..., instance=~...[, extra]}`."""
        return f"{self.prefix}{name}{{{SEL}{', ' + extra if extra else ''}}}"

    def mean(self, hist: str, by: str = "", extra: str = "") -> str:
        """Mean of histogram `hist` over the rate window: rate(sum) / rate(count)."""
        agg = f"sum by ({by}) " if by else "sum "
        return (f"{agg}(rate({self.m(hist + '_sum', extra)}[$__rate_interval])) / "
                f"{agg}(rate({self.m(hist + '_count', extra)}[$__rate_interval]))")

    def quantile(self, q: float, hist: str, by: str = "", extra: str = "") -> str:
        labels = f"le, {by}" if by else "le"
        return (f"histogram_quantile({q}, sum by ({labels}) "
                f"(rate({self.m(hist + '_bucket', extra)}[$__rate_interval])))")

    def lifetime_mean(self, hist: str, extra: str = "") -> str:
        """Mean since the engines started (cumulative sum / count): robust for rare events such as one
        compaction per prefix, which a rate window may not contain."""
        return f"sum({self.m(hist + '_sum', extra)}) / sum({self.m(hist + '_count', extra)})"

    def units_saved(self, per_instance: bool) -> str:
        """Blocks (vLLM) or token slots (SGLang: pages x page size) freed by the live compacted prefixes,
        per instance or summed over the selected ones."""
        saved = self.m("kvzip_blocks_saved")
        if self.page_size is None:
            return f"sum by (instance) ({saved})" if per_instance else f"sum({saved})"
        slots = (f"sum by (instance) ({saved}) * on (instance) "
                 f"max by (instance) ({self.m(self.page_size)})")
        return slots if per_instance else f"sum({slots})"

    @property
    def units_saved_series(self) -> str:
        """The series behind `units_saved`, for descriptions."""
        saved = f"{self.prefix}kvzip_blocks_saved"
        return saved if self.page_size is None else f"{saved} x {self.prefix}{self.page_size}"


VLLM = Engine(
    key="vllm", name="vLLM", prefix="vllm:",
    outputs=("grafana/kvzip-vllm.json", "helm/kvzip-vllm/files/kvzip-vllm.json"),
    unit="block", page_size=None,
    running="num_requests_running", waiting="num_requests_waiting",
    kv_usage="kv_cache_usage_perc",
    kv_usage_desc="vLLM's KV cache usage (vllm:kv_cache_usage_perc): the blocks KVzip frees come back to this pool.",
    requests_finished="request_success_total",
    cache_hits="prefix_cache_hits_total", cache_queries="prefix_cache_queries_total",
    cache_hit_desc="vLLM's own prefix-cache hit rate (cached prompt tokens over prompt tokens looked up)",
)
SGLANG = Engine(
    key="sglang", name="SGLang", prefix="sglang:", outputs=("grafana/kvzip-sglang.json",),
    unit="slot", page_size="page_size",
    running="num_running_reqs", waiting="num_queue_reqs",
    kv_usage="token_usage",
    kv_usage_desc="SGLang's KV pool usage (sglang:token_usage: token slots in use over the pool size; cached "
                  "slots that can be evicted count as free): the slots KVzip frees come back to this pool.",
    requests_finished="num_requests_total",
    cache_hits="cached_tokens_total", cache_queries="prompt_tokens_total",
    cache_hit_desc="SGLang's own radix-cache hit rate (cached prompt tokens over all prompt tokens: "
                   "sglang:cached_tokens_total / sglang:prompt_tokens_total)",
)
ENGINES = {e.key: e for e in (VLLM, SGLANG)}


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


def build(e: Engine) -> dict:
    """The dashboard of engine `e` as Grafana JSON (a dict)."""
    lay, p, m = Layout(), e.prefix, e.m
    units, unit_title = f"{e.unit}s", f"KV {e.unit}s saved"
    d = (gd.Dashboard(f"KVzip KV-cache compression ({e.name})").uid(e.uid)
         .description(f"KVzip compression of shared prefixes in {e.name} (kvzip-plugin): KV memory saved, "
                      "compressed-prefix hits, online decode speedup, compression cost and jobs, next to "
                      "the engine's KV usage, TTFT and throughput.")
         .tags([e.key, "kvzip", "kv-cache"]).editable().tooltip(DashboardCursorSync.CROSSHAIR)
         .time("now-1h", "now").refresh("30s").timezone("browser"))

    d = d.with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
                        .current(VariableOption(selected=True, text="Prometheus", value="prometheus")))
    d = d.with_variable(gd.QueryVariable("model_name").label("Model").datasource(DS)
                        .query(f"label_values({p}{e.running}, model_name)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    d = d.with_variable(gd.QueryVariable("instance").label("Instance").datasource(DS)
                        .query(f'label_values({p}{e.running}{{model_name="$model_name"}}, instance)')
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                        .multi(True).include_all(True).all_value(".*"))

    # ---------------------------------------------------------------- overview
    d = d.with_row(gd.Row("KVzip overview").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(st(lay, "KV memory saved", "KV cache bytes freed by the live compacted prefixes, all "
                        f"selected instances ({p}kvzip_bytes_saved).", "bytes",
                        [(f"sum({m('kvzip_bytes_saved')})", "saved")]))
    d = d.with_panel(st(lay, unit_title, f"KV {units} freed by the live compacted prefixes "
                        f"({e.units_saved_series}).", "short", [(e.units_saved(per_instance=False), units)]))
    d = d.with_panel(st(lay, "Prefix KV freed", "Share of the compressed prefixes' KV that compaction "
                        "freed: 1 - mean kept ratio, since the engines started.", "percentunit",
                        [(f"1 - ({e.lifetime_mean('kvzip_achieved_ratio')})", "freed")], decimals=1))
    d = d.with_panel(st(lay, "Compressed-prefix hit share", "Requests admitted on a compacted prefix over "
                        "requests finished, since the engines started.", "percentunit",
                        [(f"sum({m('kvzip_compressed_prefix_hits_total')}) / sum({m(e.requests_finished)})",
                          "hit share")], decimals=1))
    d = d.with_panel(st(lay, "Online decode speedup", "Mean decode step time on full prefixes over that on "
                        "compressed prefixes, since the engines started (> 1: compressed prefixes decode "
                        "faster).", "x",
                        [(f"({e.lifetime_mean('kvzip_decode_step_seconds', FULL)}) / "
                          f"({e.lifetime_mean('kvzip_decode_step_seconds', COMPRESSED)})",
                          "speedup")], decimals=2))
    d = d.with_panel(st(lay, "Scoring / prefill", "Mean scoring time of a prefix over its prefill time, since "
                        "the engines started: the one-off cost of compressing a prefix.", "x",
                        [(e.lifetime_mean("kvzip_scoring_to_prefill_ratio"), "overhead")], decimals=2))

    # ---------------------------------------------------------------- memory
    d = d.with_row(gd.Row("KV memory saved").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "KV memory saved", "KV cache bytes freed by the live compacted prefixes, per "
                        f"instance ({p}kvzip_bytes_saved). Drops when a compacted prefix is evicted.", "bytes",
                        [(f"sum by (instance) ({m('kvzip_bytes_saved')})", "{{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Engine KV cache usage", e.kv_usage_desc, "percentunit",
                        [(f"max by (instance) ({m(e.kv_usage)})", "{{instance}}")], min=0, max=1))
    d = d.with_panel(ts(lay, unit_title, f"KV {units} freed by the live compacted prefixes, per "
                        f"instance ({e.units_saved_series}).", "short",
                        [(e.units_saved(per_instance=True), "{{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Achieved ratio (kept fraction)", "Kept fraction of each compacted prefix "
                        f"({p}kvzip_achieved_ratio; 0.3 = 70% of the prefix KV freed). Points only where "
                        "prefixes were compacted in the window.", "percentunit",
                        [(e.mean("kvzip_achieved_ratio"), "mean"),
                         (e.quantile(0.9, "kvzip_achieved_ratio"), "p90")], min=0, max=1))

    # ---------------------------------------------------------------- hits
    d = d.with_row(gd.Row("Compressed-prefix hits").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Compressed-prefix hits", "Requests admitted on a compacted prefix per second "
                        f"({p}kvzip_compressed_prefix_hits_total), next to all finished requests.", "reqps",
                        [(f"sum by (instance) (rate({m('kvzip_compressed_prefix_hits_total')}[$__rate_interval]))",
                          "compressed-prefix hits {{instance}}"),
                         (f"sum by (instance) (rate({m(e.requests_finished)}[$__rate_interval]))",
                          "requests finished {{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Hit rate", f"Compressed-prefix hits over finished requests, and {e.cache_hit_desc}.",
                        "percentunit",
                        [(f"sum(rate({m('kvzip_compressed_prefix_hits_total')}[$__rate_interval])) / "
                          f"sum(rate({m(e.requests_finished)}[$__rate_interval]))", "compressed-prefix hit rate"),
                         (f"sum(rate({m(e.cache_hits)}[$__rate_interval])) / "
                          f"sum(rate({m(e.cache_queries)}[$__rate_interval]))",
                          "engine prefix-cache hit rate (tokens)")], min=0, max=1))

    # ---------------------------------------------------------------- decode
    d = d.with_row(gd.Row("Online decode speedup").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Decode time per token: compressed vs full prefix", "Per-request decode step "
                        "time of requests on compacted prefixes and on full (uncompressed) prefixes "
                        f"({p}kvzip_decode_step_seconds{{prefix}}).", "s",
                        [(e.mean("kvzip_decode_step_seconds", by="prefix"), "mean, {{prefix}} prefix"),
                         (e.quantile(0.9, "kvzip_decode_step_seconds", by="prefix"), "p90, {{prefix}} prefix")],
                        min=0))
    d = d.with_panel(ts(lay, "Online decode speedup (full / compressed)", "Mean decode step time on full "
                        "prefixes over that on compressed prefixes (> 1: faster on compressed prefixes). "
                        "Needs both kinds of requests in the window. Alert: "
                        "KVzipDecodeSlowerOnCompressedPrefixes.", "x",
                        [(f"({e.mean('kvzip_decode_step_seconds', extra=FULL)}) / "
                          f"({e.mean('kvzip_decode_step_seconds', extra=COMPRESSED)})", "speedup")],
                        min=0))

    # ---------------------------------------------------------------- cost
    d = d.with_row(gd.Row("Compression cost").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Scoring and compaction time per prefix", "Time of the KVzip scoring pass and of "
                        f"the compaction copy per compressed prefix ({p}kvzip_scoring_seconds, "
                        f"{p}kvzip_compaction_seconds).", "s",
                        [(e.mean("kvzip_scoring_seconds"), "scoring, mean"),
                         (e.quantile(0.9, "kvzip_scoring_seconds"), "scoring, p90"),
                         (e.mean("kvzip_compaction_seconds"), "compaction, mean")], min=0))
    d = d.with_panel(ts(lay, "Scoring time / prefill time", "Scoring time of each prefix over its prefill time "
                        f"({p}kvzip_scoring_to_prefill_ratio): the one-off overhead, paid once per prefix.",
                        "x",
                        [(e.mean("kvzip_scoring_to_prefill_ratio"), "mean"),
                         (e.quantile(0.9, "kvzip_scoring_to_prefill_ratio"), "p90")], min=0))

    # ---------------------------------------------------------------- jobs
    d = d.with_row(gd.Row("Compression jobs").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Jobs per minute by outcome", "KVzip jobs submitted, committed, failed, cancelled "
                        f"and rejected (queue full) per minute ({p}kvzip_jobs_total{{outcome}}). Alerts: "
                        "KVzipJobsFailing, KVzipPrefixesLeftUncompressed.", "short",
                        [(f"60 * sum by (outcome) (rate({m('kvzip_jobs_total')}[$__rate_interval]))", "{{outcome}}")],
                        min=0))
    d = d.with_panel(ts(lay, "Jobs queued and running", "KVzip jobs waiting and scoring or compacting "
                        f"({p}kvzip_jobs_queued, {p}kvzip_jobs_running). Alert: KVzipJobQueueGrowing.",
                        "short",
                        [(f"sum by (instance) ({m('kvzip_jobs_queued')})", "queued {{instance}}"),
                         (f"sum by (instance) ({m('kvzip_jobs_running')})", "running {{instance}}")], min=0))
    d = d.with_panel(ts(lay, "Compression fallbacks", "Engines that run without compression although started "
                        f"with --kv-compression kvzip, by reason ({p}kvzip_fallbacks_total; one series per "
                        "disabled engine, absent when every engine compresses). Alert: KVzipCompressionFallback.",
                        "short",
                        [(f"max by (instance, reason) ({m('kvzip_fallbacks_total')})", "{{instance}}: {{reason}}")],
                        min=0))
    d = d.with_panel(ts(lay, "Prefixes compressed", "Compactions committed since the engines started, per "
                        f"instance ({p}kvzip_prefixes_compressed_total).", "short",
                        [(f"sum by (instance) ({m('kvzip_prefixes_compressed_total')})", "{{instance}}")], min=0))

    # ---------------------------------------------------------------- engine
    d = d.with_row(gd.Row(f"Engine ({e.name})").id(lay.next_id()).grid_pos(lay.row()))
    d = d.with_panel(ts(lay, "Time to first token", f"{e.name}'s TTFT ({p}time_to_first_token_seconds): "
                        "percentiles and mean.", "s",
                        [(e.quantile(0.99, "time_to_first_token_seconds"), "p99"),
                         (e.quantile(0.9, "time_to_first_token_seconds"), "p90"),
                         (e.quantile(0.5, "time_to_first_token_seconds"), "p50"),
                         (e.mean("time_to_first_token_seconds"), "mean")], min=0))
    d = d.with_panel(ts(lay, "Token throughput", "Prompt and generated tokens per second "
                        f"({p}prompt_tokens_total, {p}generation_tokens_total).", "short",
                        [(f"sum(rate({m('prompt_tokens_total')}[$__rate_interval]))", "prompt tokens/s"),
                         (f"sum(rate({m('generation_tokens_total')}[$__rate_interval]))", "generation tokens/s")],
                        min=0))
    d = d.with_panel(ts(lay, "Scheduler state", "Requests running and waiting "
                        f"({p}{e.running}, {p}{e.waiting}).", "short",
                        [(f"sum({m(e.running)})", "running"),
                         (f"sum({m(e.waiting)})", "waiting")], min=0))
    d = d.with_panel(ts(lay, "Inter-token latency", f"{e.name}'s inter-token latency "
                        f"({p}inter_token_latency_seconds), all requests.", "s",
                        [(e.quantile(0.99, "inter_token_latency_seconds"), "p99"),
                         (e.quantile(0.5, "inter_token_latency_seconds"), "p50"),
                         (e.mean("inter_token_latency_seconds"), "mean")], min=0))

    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def render(engine: Engine) -> str:
    return json.dumps(build(engine), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a checked-in file differs")
    args = ap.parse_args(argv)
    stale, outputs = [], []
    for engine in ENGINES.values():
        text = render(engine)
        for path in (DEPLOY / f for f in engine.outputs):
            outputs.append((path, text))
            if not path.exists() or path.read_text() != text:
                stale.append(path)
    if args.check:
        for path in stale:
            print(f"{path} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
