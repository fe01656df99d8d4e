# SPDX-License-Identifier: Apache-2.0
"""Multi-tenant chat load against an OpenAI-compatible server, and a summary of its `/metrics`.

Engine-agnostic (stdlib HTTP + `prometheus_client`'s parser; no vLLM or SGLang import), used by
`kvzip load`, `scripts/vllm_demo.sh`, `scripts/sglang_demo.sh` and `benchmarks/bench_multitenant.py`.

The workload: `T` tenants, each with its own long system prompt (a seeded key-value "reference
document" from `kvzip_plugin.eval.datasets.kv_retrieval`, headed by the tenant's name so no two tenants
share more than the chat template's first tokens) and `Q` questions about it. Every request of a
tenant sends the same system message through `/v1/chat/completions`, so the server's chat template
renders a byte-identical prefix and its prefix cache (and KVzip, which compresses shared prefixes)
can reuse it. Requests go out round-robin over tenants (`t0 q0, t1 q0, ..., t0 q1, ...`) with
concurrency `C`, greedy (`temperature 0`), `max_tokens N`, streamed, so each request gives:

* latency (send -> last byte), TTFT (send -> first chunk carrying generated text),
* decode ms/token = (last token chunk - first token chunk) / (completion_tokens - 1).

`/metrics` is scraped before and after the load and polled during it (peaks of gauges such as
running requests and KV usage); `summarize` turns the two snapshots into the `kvzip_*` numbers and
the engine's KV usage / prefix-cache counters (deltas over the load for counters and histograms).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvzip_plugin.eval.datasets import kv_retrieval
from kvzip_plugin.metrics import JOB_OUTCOMES

_COMPANIES = ("Northwind Logistics", "Bluefin Analytics", "Cedar Health", "Driftwood Media", "Ember Robotics",
              "Foxglove Foods", "Granite Insurance", "Harbor Energy", "Ironbark Legal", "Juniper Travel",
              "Kestrel Aerospace", "Lumen Schools")

SYSTEM_TEMPLATE = (
    "You are the support assistant of {company} (tenant {tenant}). Answer every question using only "
    "the reference document below. Reply with the code only.\n\n"
    "Reference document of {company}:\n{document}"
)


# ---------------------------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRequest:
    """One chat request of the workload.

    Attributes:
        tenant, question: indices.
        system: the tenant's system prompt (identical for all its requests).
        user: the question.
        answer: the expected answer (a 4-digit code); `correct` checks it is in the reply.
        cache_salt: vLLM's per-request prefix-cache salt (None: not sent).
    """

    tenant: int
    question: int
    system: str
    user: str
    answer: str
    cache_salt: str | None = None

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def tenant_name(tenant: int) -> str:
    name = _COMPANIES[tenant % len(_COMPANIES)]
    return name if tenant < len(_COMPANIES) else f"{name} {tenant // len(_COMPANIES) + 1}"


def build_workload(tenants: int, questions: int, facts: int = 64, seed: int = 0,
                   cache_salt: bool = False) -> list[TenantRequest]:
    """`tenants * questions` requests, round-robin over tenants (tenant 0 question 0, tenant 1
    question 0, ...). Deterministic in its arguments.

    Args:
        tenants: tenants, each with its own system prompt.
        questions: questions per tenant (at most `facts`).
        facts: key-value facts in each tenant's document (about 17 demo-model tokens each; 64 facts
            plus the header render to about 1,100 prompt tokens with SmolLM2's chat template).
        seed: the only source of randomness.
        cache_salt: send a per-tenant `cache_salt` (vLLM: isolates tenants' prefix caches).
    """
    if tenants < 1 or questions < 1:
        raise ValueError("tenants and questions must be >= 1")
    if questions > facts:
        raise ValueError(f"questions ({questions}) must be <= facts ({facts})")
    data = kv_retrieval(n_samples=tenants, n_pairs=facts, n_questions=questions, seed=seed,
                        name=f"loadgen-t{tenants}-f{facts}")
    out = []
    for q in range(questions):
        for t, sample in enumerate(data.samples):
            system = SYSTEM_TEMPLATE.format(company=tenant_name(t), tenant=t, document=sample.context)
            item = sample.items[q]
            out.append(TenantRequest(t, q, system, item.question, item.answer,
                                     f"tenant-{t}" if cache_salt else None))
    return out


# ---------------------------------------------------------------------------------------------
# HTTP client (streaming chat completions)
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds, `None` where not measurable)."""

    tenant: int
    question: int
    ok: bool
    error: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    decode_ms_per_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    correct: bool | None = None
    start_s: float = 0.0
    """Send time, relative to the start of the load."""


def _post_json(url: str, payload: dict[str, Any], timeout: float):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    return urllib.request.urlopen(req, timeout=timeout)


def chat_payload(req: TenantRequest, model: str, max_tokens: int, ignore_eos: bool = False) -> dict[str, Any]:
    """The `/v1/chat/completions` body: greedy, streamed, usage in the last chunk."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": req.messages(),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM / SGLang extension: always decode max_tokens
    if req.cache_salt is not None:
        payload["cache_salt"] = req.cache_salt
    return payload


def stream_chat(base_url: str, req: TenantRequest, model: str, max_tokens: int, *, ignore_eos: bool = False,
                timeout: float = 300.0, t0: float | None = None,
                clock: Callable[[], float] = time.perf_counter) -> RequestResult:
    """Send one streamed chat completion and time it. Never raises: failures come back as
    `ok=False` with the error text."""
    start = clock()
    res = RequestResult(req.tenant, req.question, ok=False, start_s=start - (start if t0 is None else t0))
    url = base_url.rstrip("/") + "/v1/chat/completions"
    token_times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    try:
        with _post_json(url, chat_payload(req, model, max_tokens, ignore_eos), timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = clock()
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"server error in stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") or ""
                    if content:
                        pieces.append(content)
                        token_times.append(now)
        end = clock()
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")[:500]
        res.error = f"HTTP {err.code}: {body}"
        return res
    except Exception as err:  # URLError, timeouts, malformed stream: reported, not raised
        res.error = f"{type(err).__name__}: {err}"
        return res
    res.ok = True
    res.latency_s = end - start
    res.text = "".join(pieces)
    res.correct = req.answer in res.text
    res.prompt_tokens = usage.get("prompt_tokens")
    res.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    res.cached_tokens = details.get("cached_tokens")
    if token_times:
        res.ttft_s = token_times[0] - start
        n = res.completion_tokens or len(token_times)
        if n > 1 and token_times[-1] > token_times[0]:
            res.decode_ms_per_token = 1000.0 * (token_times[-1] - token_times[0]) / (n - 1)
    return res


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")


def served_model(base_url: str) -> str:
    """The first model id of `/v1/models`."""
    return get_json(base_url.rstrip("/") + "/v1/models")["data"][0]["id"]


def wait_healthy(base_url: str, timeout: float, alive: Callable[[], bool] | None = None,
                 interval: float = 1.0) -> float:
    """Poll `/health` until it answers 200; returns the seconds waited. Raises TimeoutError, or
    RuntimeError as soon as `alive()` says the server process died."""
    start = time.monotonic()
    url = base_url.rstrip("/") + "/health"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (OSError, urllib.error.URLError):
            pass
        if alive is not None and not alive():
            raise RuntimeError("the server exited before it became healthy")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# /metrics: parsing and summary
# ---------------------------------------------------------------------------------------------


@dataclass
class MetricsSnapshot:
    """Every sample of one `/metrics` scrape: sample name (`vllm:prefix_cache_hits_total`,
    `..._bucket`, `..._sum`, ...) -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float | None:
        """Sum of the samples named `name` whose labels include `labels`; None if there is none."""
        values = [v for lab, v in self.samples.get(name, ()) if all(lab.get(k) == w for k, w in labels.items())]
        return sum(values) if values else None

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted({lab[label] for lab, _ in self.samples.get(name, ()) if label in lab})

    def labels(self, name: str) -> list[dict[str, str]]:
        return [lab for lab, _ in self.samples.get(name, ())]

    def has_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.samples)


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse a Prometheus text exposition (`_created` samples are dropped)."""
    snap = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            snap.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return snap


def scrape(base_url: str, timeout: float = 10.0) -> MetricsSnapshot:
    return parse_metrics(get_text(base_url.rstrip("/") + "/metrics", timeout))


def _delta(before: MetricsSnapshot | None, after: MetricsSnapshot, name: str, **labels: str) -> float | None:
    a = after.get(name, **labels)
    if a is None:
        return None
    b = before.get(name, **labels) if before is not None else None
    return a - (b or 0.0)


def _hist_mean(before: MetricsSnapshot | None, after: MetricsSnapshot, name: str, **labels: str) -> float | None:
    s, c = _delta(before, after, f"{name}_sum", **labels), _delta(before, after, f"{name}_count", **labels)
    return s / c if s is not None and c else None


@dataclass(frozen=True)
class EngineSeries:
    """Where one engine exports the numbers `summarize` reports (full series names). The KV pool is
    in blocks of `block_size` tokens on vLLM and in pages (`--page-size`, 1 token by default) on SGLang;
    both engines count idle cached prefix blocks as free in their usage gauge."""

    prefix: str
    num_blocks: str  # gauge, or "<info metric>:<label>"
    block_size: str
    kv_usage: str  # gauge 0..1
    prefix_cache_hits: str  # counter of prompt tokens served from the prefix cache
    prefix_cache_queries: str  # counter of prompt tokens looked up
    running: str
    waiting: str
    preemptions: str
    prompt_tokens: str
    generation_tokens: str
    inter_token_latency: str  # histogram (seconds)
    time_to_first_token: str
    preemptions_created_lazily: bool = False
    """The preemption counter appears only at the first preemption: absent means none happened."""


VLLM_SERIES = EngineSeries(
    prefix="vllm:", num_blocks="vllm:cache_config_info:num_gpu_blocks", block_size="vllm:cache_config_info:block_size",
    kv_usage="vllm:kv_cache_usage_perc", prefix_cache_hits="vllm:prefix_cache_hits_total",
    prefix_cache_queries="vllm:prefix_cache_queries_total", running="vllm:num_requests_running",
    waiting="vllm:num_requests_waiting", preemptions="vllm:num_preemptions_total",
    prompt_tokens="vllm:prompt_tokens_total", generation_tokens="vllm:generation_tokens_total",
    inter_token_latency="vllm:inter_token_latency_seconds", time_to_first_token="vllm:time_to_first_token_seconds",
)
SGLANG_SERIES = EngineSeries(
    prefix="sglang:", num_blocks="sglang:num_pages", block_size="sglang:page_size", kv_usage="sglang:token_usage",
    prefix_cache_hits="sglang:cached_tokens_total", prefix_cache_queries="sglang:prompt_tokens_total",
    running="sglang:num_running_reqs", waiting="sglang:num_queue_reqs",
    preemptions="sglang:num_retracted_requests_total", prompt_tokens="sglang:prompt_tokens_total",
    generation_tokens="sglang:generation_tokens_total", inter_token_latency="sglang:inter_token_latency_seconds",
    time_to_first_token="sglang:time_to_first_token_seconds", preemptions_created_lazily=True,
)


def engine_series(prefix: str) -> EngineSeries:
    """The series map of the engine whose metrics start with `prefix` (`vllm:` or `sglang:`)."""
    for series in (VLLM_SERIES, SGLANG_SERIES):
        if series.prefix == prefix:
            return series
    raise ValueError(f"unknown metrics prefix {prefix!r}: expected 'vllm:' or 'sglang:'")


def _gauge_or_info(snap: MetricsSnapshot, name: str) -> float | None:
    """`<prefix>:<gauge>`'s value, or `<prefix>:<info metric>:<label>`'s label value."""
    if name.count(":") == 2:
        metric, _, label = name.rpartition(":")
        info = snap.labels(metric)
        return _to_float(info[0].get(label)) if info else None
    return snap.get(name)


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000.0 * x


def _int(x: float | None) -> int | None:
    return None if x is None else int(round(x))


def summarize(before: MetricsSnapshot | None, after: MetricsSnapshot, peaks: dict[str, float] | None = None,
              prefix: str = "vllm:") -> dict[str, Any]:
    """The `kvzip_*` numbers and the engine's KV / prefix-cache numbers over the load.

    Counters and histograms are deltas `after - before` (`before=None`: totals of `after`); gauges
    are `after`'s values; `peaks` (from `MetricsPoller`) adds the highest gauge values seen during
    the load. Values a server does not export are None (the `kvzip` block says `exported: False`
    when the server has no `kvzip_*` series at all, e.g. a plain engine).
    """
    p = prefix
    e = engine_series(prefix)
    peaks = peaks or {}
    num_blocks, block_size = _int(_gauge_or_info(after, e.num_blocks)), _int(_gauge_or_info(after, e.block_size))
    usage, usage_peak = after.get(e.kv_usage), peaks.get(e.kv_usage)
    hits, queries = _delta(before, after, e.prefix_cache_hits), _delta(before, after, e.prefix_cache_queries)
    engine = {
        "num_gpu_blocks": num_blocks,
        "block_size": block_size,
        "kv_cache_usage_perc": usage,
        "kv_cache_usage_perc_peak": usage_peak,
        "kv_blocks_in_use_peak": (_int(usage_peak * num_blocks) if usage_peak is not None and num_blocks
                                  else None),
        "prefix_cache_queries": _int(queries),
        "prefix_cache_hits": _int(hits),
        "prefix_cache_hit_rate": hits / queries if hits is not None and queries else None,
        "num_requests_running_peak": _int(peaks.get(e.running)),
        "num_requests_waiting_peak": _int(peaks.get(e.waiting)),
        "num_preemptions": _preemptions(before, after, e),
        "prompt_tokens": _int(_delta(before, after, e.prompt_tokens)),
        "generation_tokens": _int(_delta(before, after, e.generation_tokens)),
        "inter_token_latency_ms": _ms(_hist_mean(before, after, e.inter_token_latency)),
        "time_to_first_token_ms": _ms(_hist_mean(before, after, e.time_to_first_token)),
    }
    k = f"{p}kvzip_"
    dec_c = _hist_mean(before, after, f"{k}decode_step_seconds", prefix="compressed")
    dec_f = _hist_mean(before, after, f"{k}decode_step_seconds", prefix="full")
    kvzip = {
        "exported": after.has_prefix(k),
        "prefixes_compressed": _int(_delta(before, after, f"{k}prefixes_compressed_total")),
        "blocks_saved": _int(after.get(f"{k}blocks_saved")),
        "blocks_saved_peak": _int(peaks.get(f"{k}blocks_saved")),
        "bytes_saved": _int(after.get(f"{k}bytes_saved")),
        "jobs": {o: _int(_delta(before, after, f"{k}jobs_total", outcome=o)) for o in JOB_OUTCOMES},
        "jobs_queued": _int(after.get(f"{k}jobs_queued")),
        "jobs_running": _int(after.get(f"{k}jobs_running")),
        "achieved_ratio_mean": _hist_mean(before, after, f"{k}achieved_ratio"),
        "scoring_seconds_total": _delta(before, after, f"{k}scoring_seconds_sum"),
        "scoring_seconds_mean": _hist_mean(before, after, f"{k}scoring_seconds"),
        "compaction_seconds_mean": _hist_mean(before, after, f"{k}compaction_seconds"),
        "scoring_to_prefill_mean": _hist_mean(before, after, f"{k}scoring_to_prefill_ratio"),
        "compressed_prefix_hits": _int(_delta(before, after, f"{k}compressed_prefix_hits_total")),
        "decode_ms_per_token": {"compressed": _ms(dec_c), "full": _ms(dec_f)},
        "decode_compressed_over_full": dec_c / dec_f if dec_c is not None and dec_f else None,
        "fallbacks": {r: _int(_delta(before, after, f"{k}fallbacks_total", reason=r))
                      for r in after.label_values(f"{k}fallbacks_total", "reason")},
    }
    return {"engine": engine, "kvzip": kvzip}


def _preemptions(before: MetricsSnapshot | None, after: MetricsSnapshot, e: EngineSeries) -> int | None:
    """Preemptions over the load (0 when a lazily created counter is absent from a server that exports
    the engine's other series)."""
    delta = _delta(before, after, e.preemptions)
    if delta is None and e.preemptions_created_lazily and after.has_prefix(e.prefix):
        return 0
    return _int(delta)


def _to_float(x: str | None) -> float | None:
    try:
        return float(x) if x is not None else None
    except ValueError:
        return None


KVZIP_PEAK_GAUGES = ("kvzip_blocks_saved", "kvzip_bytes_saved", "kvzip_jobs_queued", "kvzip_jobs_running")


class MetricsPoller:
    """Scrapes `/metrics` every `interval` seconds in a thread and keeps the peak of each gauge in
    `gauges` (summed over label sets), and every scrape's values in `samples` (`(time.monotonic(), {name:
    value})`: when a job was running during the load). Use as a context manager around the load."""

    def __init__(self, base_url: str, interval: float = 0.25, prefix: str = "vllm:",
                 gauges: Sequence[str] = KVZIP_PEAK_GAUGES) -> None:
        self.base_url, self.interval = base_url, interval
        e = engine_series(prefix)
        self.names = [e.running, e.waiting, e.kv_usage, *(f"{prefix}{g}" for g in gauges)]
        self.peaks: dict[str, float] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.scrapes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvzip-metrics-poller", daemon=True)

    def _poll_once(self) -> None:
        try:
            snap = scrape(self.base_url, timeout=max(2.0, 4 * self.interval))
        except Exception:
            self.errors += 1
            return
        self.scrapes += 1
        values = {}
        for name in self.names:
            v = snap.get(name)
            if v is not None:
                values[name] = v
                if v > self.peaks.get(name, float("-inf")):
                    self.peaks[name] = v
        self.samples.append((time.monotonic(), values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_once()
            self._stop.wait(self.interval)

    def __enter__(self) -> MetricsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll_once()  # the state right after the load


def jobs_active(values: MetricsSnapshot | Mapping[str, float], prefix: str = "vllm:") -> bool:
    """Whether a scrape (or one of `MetricsPoller.samples`) shows a KVzip job queued or running."""
    return bool(values.get(f"{prefix}kvzip_jobs_queued") or values.get(f"{prefix}kvzip_jobs_running"))


def wait_kvzip_job(base_url: str, timeout: float, prefix: str = "vllm:", interval: float = 0.1,
                   stop: Callable[[], bool] | None = None) -> bool:
    """Wait until a KVzip job is queued or running (the counterpart of `wait_kvzip_idle`); whether one showed
    within `timeout` seconds (or before `stop()` turned true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop()):
        try:
            if jobs_active(scrape(base_url), prefix):
                return True
        except OSError:
            pass
        time.sleep(interval)
    return False


def wait_kvzip_idle(base_url: str, timeout: float, prefix: str = "vllm:", interval: float = 0.5) -> float:
    """Wait until no KVzip job is queued or running (or `timeout`); returns the seconds waited.
    Returns at once on a server without `kvzip_*` series."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            snap = scrape(base_url)
        except OSError:
            time.sleep(interval)
            continue
        q, r = snap.get(f"{prefix}kvzip_jobs_queued"), snap.get(f"{prefix}kvzip_jobs_running")
        if q is None and r is None:
            break
        if not (q or 0) and not (r or 0):
            break
        time.sleep(interval)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# the load
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    """Model name sent in requests (None: the first id of `/v1/models`)."""
    tenants: int = 4
    questions: int = 8
    concurrency: int = 4
    max_tokens: int = 16
    facts: int = 64
    seed: int = 0
    cache_salt: bool = False
    ignore_eos: bool = False
    timeout: float = 300.0
    metrics: bool = True
    """Scrape `/metrics` before / after and poll it during the load."""
    metrics_interval: float = 0.25
    metrics_prefix: str = "vllm:"
    settle: float = 0.0
    """After the load, wait up to this many seconds for queued / running KVzip jobs to finish
    before the final scrape (0: scrape at once)."""


@dataclass
class LoadReport:
    config: LoadConfig
    model: str
    wall_s: float
    results: list[RequestResult]
    metrics: dict[str, Any] | None = None
    scrapes: int = 0

    def client_summary(self) -> dict[str, Any]:
        return client_summary(self.results, self.wall_s)

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "model": self.model, "wall_s": self.wall_s,
                "client": self.client_summary(), "metrics": self.metrics, "metrics_scrapes": self.scrapes,
                "requests": [asdict(r) for r in self.results]}


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _median(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def client_summary(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    """Client-side numbers: counts, throughput, latency / TTFT percentiles (TTFT split between each
    tenant's first question, whose prefix is cold, and the later ones), decode ms/token."""
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), None),
        "correct": sum(bool(r.correct) for r in ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "latency_s_p50": _pct(lat, 0.5),
        "latency_s_p95": _pct(lat, 0.95),
        "ttft_ms_first_question_p50": _ms(_median(r.ttft_s for r in ok if r.question == 0)),
        "ttft_ms_later_questions_p50": _ms(_median(r.ttft_s for r in ok if r.question > 0)),
        "decode_ms_per_token_p50": _median(r.decode_ms_per_token for r in ok),
        "decode_ms_per_token_mean": (statistics.fmean(d) if (d := [r.decode_ms_per_token for r in ok
                                                                   if r.decode_ms_per_token is not None])
                                     else None),
        "cached_prompt_tokens": (sum(r.cached_tokens for r in ok if r.cached_tokens is not None)
                                 if any(r.cached_tokens is not None for r in ok) else None),
    }


def run_requests(cfg: LoadConfig, model: str, requests: Sequence[TenantRequest]) -> tuple[list[RequestResult], float]:
    """Send `requests` in order with `cfg.concurrency` workers; (results in request order, wall seconds)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="kvzip-load") as pool:
        futures = [pool.submit(stream_chat, cfg.url, r, model, cfg.max_tokens, ignore_eos=cfg.ignore_eos,
                               timeout=cfg.timeout, t0=t0) for r in requests]
        results = [f.result() for f in futures]
    return results, time.perf_counter() - t0


def run_load(cfg: LoadConfig, requests: Sequence[TenantRequest] | None = None) -> LoadReport:
    """Run the workload (default: `build_workload` from `cfg`) and summarize client and server."""
    if requests is None:
        requests = build_workload(cfg.tenants, cfg.questions, cfg.facts, cfg.seed, cfg.cache_salt)
    model = cfg.model or served_model(cfg.url)
    if not cfg.metrics:
        results, wall = run_requests(cfg, model, requests)
        return LoadReport(cfg, model, wall, results)
    before = scrape(cfg.url)
    with MetricsPoller(cfg.url, cfg.metrics_interval, cfg.metrics_prefix) as poller:
        results, wall = run_requests(cfg, model, requests)
        if cfg.settle > 0:
            wait_kvzip_idle(cfg.url, cfg.settle, cfg.metrics_prefix)
    after = scrape(cfg.url)
    summary = summarize(before, after, poller.peaks, cfg.metrics_prefix)
    return LoadReport(cfg, model, wall, results, summary, poller.scrapes)


# ---------------------------------------------------------------------------------------------
# the readable report
# ---------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".2f", none: str = "n/a") -> str:
    if x is None:
        return none
    if isinstance(x, float):
        return format(x, fmt)
    return str(x)


def format_report(report: LoadReport) -> str:
    """A readable multi-line report of `LoadReport`."""
    c = report.config
    s = report.client_summary()
    lines = [
        f"load: {c.tenants} tenants x {c.questions} questions = {s['requests']} requests, concurrency "
        f"{c.concurrency}, max_tokens {c.max_tokens}, {c.facts} facts per tenant document, seed {c.seed}"
        + (", per-tenant cache_salt" if c.cache_salt else "") + (", ignore_eos" if c.ignore_eos else ""),
        f"server: {c.url} model {report.model}",
        f"requests: {s['ok']} ok, {s['errors']} failed; wall {s['wall_s']:.2f} s, "
        f"{_f(s['requests_per_s'])} req/s, {_f(s['output_tokens_per_s'], '.1f')} output tok/s; "
        f"answers containing the expected code: {s['correct']}/{s['ok']}",
        f"latency p50 {_f(s['latency_s_p50'])} s, p95 {_f(s['latency_s_p95'])} s | TTFT p50: first question "
        f"of a tenant {_f(s['ttft_ms_first_question_p50'], '.0f')} ms, later questions "
        f"{_f(s['ttft_ms_later_questions_p50'], '.0f')} ms | decode {_f(s['decode_ms_per_token_p50'])} "
        f"ms/token (p50 over requests)",
    ]
    if s["first_error"]:
        lines.append(f"first error: {s['first_error']}")
    m = report.metrics
    if m is None:
        return "\n".join(lines)
    e, k = m["engine"], m["kvzip"]
    lines += [
        f"engine /metrics ({report.scrapes} scrapes during the load):",
        f"  KV cache: {_f(e['num_gpu_blocks'])} blocks of {_f(e['block_size'])} tokens; usage now "
        f"{_pct_str(e['kv_cache_usage_perc'])}, peak {_pct_str(e['kv_cache_usage_perc_peak'])} "
        f"(~{_f(e['kv_blocks_in_use_peak'])} blocks held by running requests; idle cached blocks count as free)",
        f"  prefix cache: {_f(e['prefix_cache_hits'])} of {_f(e['prefix_cache_queries'])} prompt tokens hit "
        f"({_pct_str(e['prefix_cache_hit_rate'])})",
        f"  requests running peak {_f(e['num_requests_running_peak'])}, waiting peak "
        f"{_f(e['num_requests_waiting_peak'])}, preemptions {_f(e['num_preemptions'])}",
        f"  inter-token latency {_f(e['inter_token_latency_ms'])} ms, TTFT {_f(e['time_to_first_token_ms'], '.0f')} "
        f"ms (means)",
    ]
    if not k["exported"]:
        lines.append("kvzip: this server exports no kvzip_* metrics (compression off, or not implemented yet)")
        return "\n".join(lines)
    jobs = ", ".join(f"{o} {_f(v)}" for o, v in k["jobs"].items())
    dec = k["decode_ms_per_token"]
    fallbacks = ", ".join(f"{r} {v}" for r, v in k["fallbacks"].items()) or "none"
    lines += [
        "kvzip:",
        f"  prefixes compressed {_f(k['prefixes_compressed'])}; blocks saved now {_f(k['blocks_saved'])} "
        f"(peak {_f(k['blocks_saved_peak'])}), {_mib(k['bytes_saved'])} saved",
        f"  jobs: {jobs}; queued {_f(k['jobs_queued'])}, running {_f(k['jobs_running'])}",
        f"  achieved ratio {_f(k['achieved_ratio_mean'], '.3f')} (mean); scoring {_f(k['scoring_seconds_mean'])} s "
        f"per prefix = {_f(k['scoring_to_prefill_mean'])}x its prefill; compaction "
        f"{_f(k['compaction_seconds_mean'], '.3f')} s",
        f"  requests on a compressed prefix {_f(k['compressed_prefix_hits'])}; decode ms/token compressed "
        f"{_f(dec['compressed'])} vs full {_f(dec['full'])} (ratio {_f(k['decode_compressed_over_full'])})",
        f"  fallbacks: {fallbacks}",
    ]
    return "\n".join(lines)


def _pct_str(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"
