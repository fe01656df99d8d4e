# SPDX-License-Identifier: Apache-2.0
"""Client latency while a KVzip job scores a prefix, against the same server's load without a job (issue 17).

Issue 17's target: while a job runs, the p99 inter-token latency of the running requests and the TTFT of
new requests stay within 1.2x of the same load without a job. This benchmark measures both with the
engine's own client (`bench_engine_clients.run_client`: `vllm bench serve` / `sglang.bench_serving`, its
`random` load of `--input-len` + `--output-len` tokens: no shared prefix, so the load itself never makes a
job) on one fresh `--kv-compression kvzip` server per repeat, in two phases:

* `no-job`: the load alone (no job queued or running, checked by a /metrics poller);
* `job`: a document of `--job-prefix-len` tokens is sent as a few short requests (`/v1/completions`, one
  token each, a different question after the same document) until the plugin queues a job on it; the
  same load starts the moment the job shows in `kvzip_jobs_queued` / `kvzip_jobs_running`, and the
  poller records which part of the load ran beside it (`job_active_fraction`: a ratio over a load the
  job only partly covered understates the stall; size `--job-prefix-len` so it covers it all).

Both phases send the same load (client seed `--seed + 1`: the same prompts and, with `--load-fraction`, the
same Poisson arrival times; a warm-up load with seed `--seed` comes first), and the engine's prefix cache is
reset before each phase (vLLM `POST /reset_prefix_cache`, SGLang `POST /flush_cache`, with no request
running) so the second phase never hits the first one's cache. (Before 2026-12-03 the phases used seeds
`--seed + 1` and `--seed + 2`: different prompts and arrival bursts, a bias of up to ~10 % between phases.)
The phase order flips every repeat (no-job first, then job first, ...): a drift of the machine does not
favour one phase. Each phase also records the host's own scheduling gaps during its load
(`eval/host_stalls.py`: a probe process unscheduled for >= 0.1 s), which a client records as latency. After the job phase the benchmark waits for the job to end
and records its outcome from the plugin's counters.

Per repeat and as the median over repeats (JSON `summary`): `itl_p99_during_job_ratio` (p99 ITL, job /
no-job), `ttft_during_job_ratio` (p99 TTFT, job / no-job), the same at p50, the maximum ITL and p99 end-to-end
latency where the client reports them, and `load_s_during_job_ratio` (the load's wall time). `meets_target`
says whether the p99 ITL, p99 TTFT and wall-time medians are all <= 1.2: one stall of the whole server (an
unsliced scoring prefill) delays only the few requests then running, by one gap each, which stays below
every p99 of a short load, while the same work takes longer.

    PYTHONPATH=. python benchmarks/bench_during_job.py --engine vllm --repeats 3 \\
        --out benchmarks/results/during-job-vllm-cpu.json

Arguments after `--` go to the server (e.g. `--kv-compression-scoring-step-tokens 128`). Writes the JSON
and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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

from bench_engine_clients import (  # noqa: E402
    add_server_arguments,
    complete,
    run_client,
    same_names,
    server_args,
    thread_setup,
    write_doc,
)
from bench_multitenant import Server, meta, server_command, server_env  # noqa: E402

from kvzip_plugin.eval.host_stalls import HostStallMonitor  # noqa: E402
from kvzip_plugin.eval.loadgen import MetricsPoller, jobs_active, scrape, summarize, wait_kvzip_idle, wait_kvzip_job  # noqa: E402

TARGET = 1.2
PHASES = ("no-job", "job")
# (JSON name, client field) of the job / no-job ratios
RATIOS = (("itl_p99_during_job_ratio", "p99_itl_ms"), ("ttft_during_job_ratio", "p99_ttft_ms"),
          ("itl_max_during_job_ratio", "max_itl_ms"), ("itl_p50_during_job_ratio", "p50_itl_ms"),
          ("ttft_p50_during_job_ratio", "p50_ttft_ms"), ("tpot_p50_during_job_ratio", "p50_tpot_ms"),
          ("e2el_p99_during_job_ratio", "p99_e2el_ms"))
ALL_RATIOS = RATIOS + (("load_s_during_job_ratio", None),)  # and the load's wall time (`ratios`)
_WORDS = ("river", "stone", "lantern", "harbor", "meadow", "copper", "violet", "summit", "orchard", "falcon",
          "canyon", "ember", "glacier", "willow", "beacon", "prairie", "marble", "thistle", "cobalt", "juniper")


def document(tokenizer: Any, n_tokens: int, seed: int) -> str:
    """A seeded text of about `n_tokens` tokens (random sentences of common words, cut at `n_tokens`)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < n_tokens:
        words += [rng.choice(_WORDS) for _ in range(max(16, n_tokens // 2))]
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def active_fraction(samples: list[tuple[float, dict[str, float]]], prefix: str, start: float,
                    end: float) -> float | None:
    """Share of the poller's scrapes in `[start, end]` that saw a job queued or running (None: no scrape)."""
    inside = [jobs_active(v, prefix) for t, v in samples if start <= t <= end]
    return sum(inside) / len(inside) if inside else None


def start_job(url: str, doc: str, prefix: str, wait_s: float, timeout: float, max_requests: int = 4) -> dict[str, Any]:
    """Send `doc` with different questions, one at a time, until the plugin queues a job on it (or
    `max_requests` went out and `wait_s` passed without one)."""
    t0 = time.monotonic()
    for i in range(max_requests):
        complete(url, f"{doc}\n\nQuestion {i + 1}: which word comes first above?\nAnswer:", timeout)
        if wait_kvzip_job(url, wait_s if i == max_requests - 1 else 2.0, prefix=prefix):
            return {"started": True, "requests": i + 1, "seconds": time.monotonic() - t0}
    return {"started": False, "requests": max_requests, "seconds": time.monotonic() - t0}


def client_args(args: argparse.Namespace, seed: int, rate: float | None = None) -> argparse.Namespace:
    """`bench_engine_clients.client_argv`'s view of this load: its `control` scenario with `seed`, sent at
    `rate` requests/s (Poisson; None: as fast as `--concurrency` allows)."""
    return argparse.Namespace(**{**vars(args), "prefix_len": args.input_len, "suffix_len": 0, "seed": seed,
                                 "num_prefixes": 1, "request_rate": rate})


def capacity_rps(result: dict[str, Any]) -> float | None:
    """Requests/s a closed-loop load at `--concurrency` got through (the client's own figure)."""
    rps = result.get("request_throughput")
    if isinstance(rps, (int, float)) and rps > 0:
        return float(rps)
    done, dur = result.get("completed"), result.get("duration")
    return done / dur if isinstance(done, (int, float)) and isinstance(dur, (int, float)) and dur else None


def job_end(samples: list[tuple[float, dict[str, float]]], prefix: str, start: float) -> float | None:
    """Seconds after `start` of the first scrape that saw no job queued or running (None: none did)."""
    for t, v in samples:
        if t >= start and not jobs_active(v, prefix):
            return t - start
    return None


def pool_blocks(args: argparse.Namespace) -> int:
    """Room for the document (its blocks, the scoring pass's copy and the store) and the load beside it."""
    bs = args.block_size
    job = 3 * math.ceil((args.job_prefix_len + 64) / bs)
    load = 2 * args.concurrency * (math.ceil((args.input_len + args.output_len) / bs) + 1)
    return max(job + load, math.ceil(args.max_model_len / bs) + 1)


def reset_cache(url: str, engine: str) -> None:
    """Empty the engine's prefix cache (no request runs: both engines accept it then)."""
    path = "/reset_prefix_cache" if engine == "vllm" else "/flush_cache"
    req = urllib.request.Request(url.rstrip("/") + path, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def run_phase(args: argparse.Namespace, phase: str, repeat: int, url: str, work: Path, doc: str,
              rate: float | None) -> dict[str, Any]:
    prefix = f"{args.engine}:"
    rec: dict[str, Any] = {"phase": phase, "load_average_at_start": os.getloadavg(), "request_rate": rate}
    reset_cache(url, args.engine)  # the same prompts as the other phase: none may hit its cache
    before = scrape(url)
    if phase == "job":
        rec["trigger"] = start_job(url, doc, prefix, args.job_wait, args.request_timeout)
    seed = args.seed + 1
    with MetricsPoller(url, interval=args.metrics_interval, prefix=prefix) as poller, HostStallMonitor() as stalls:
        t0 = time.monotonic()
        rec["client"] = run_client(client_args(args, seed, rate), "control", args.num_prompts, url, work)
        t1 = time.monotonic()
    rec["load_s"] = t1 - t0
    rec["host_stalls"] = stalls.summary(start=t0)  # the host's own scheduling gaps during the load
    rec["job_active_fraction"] = active_fraction(poller.samples, prefix, t0, t1)
    if phase == "job":  # did the job finish while the load ran (issue 17: it must, under a 50 % load)
        end = job_end(poller.samples, prefix, t0)
        rec["job_end_s"] = end
        rec["job_finished_during_load"] = end is not None and end <= t1 - t0
    rec["settle_s"] = wait_kvzip_idle(url, args.settle, prefix=prefix)
    rec["metrics"] = summarize(before, scrape(url), poller.peaks, prefix=prefix)
    c = rec["client"]
    print(f"   {phase}: {c.get('completed')} completed, {c.get('failed', 0)} failed, TTFT p99 "
          f"{c.get('p99_ttft_ms') or 0:.0f} ms, ITL p99 {c.get('p99_itl_ms') or 0:.1f} ms, load {rec['load_s']:.1f} s, "
          f"job active {rec['job_active_fraction']}; host stalls {rec['host_stalls']['count']} "
          f"(max {rec['host_stalls']['max_s']:.2f} s)", flush=True)
    return rec


def run_repeat(args: argparse.Namespace, repeat: int, tokenizer: Any, work: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    blocks = pool_blocks(args)
    cmd = server_command(server_args(args), "kvzip", blocks)
    log = work / f"server-{repeat}.log"
    order = PHASES if repeat % 2 == 0 else tuple(reversed(PHASES))
    print(f"== repeat {repeat} ({' then '.join(order)}): pool {blocks} blocks; log {log}", flush=True)
    rec: dict[str, Any] = {"repeat": repeat, "order": list(order), "pool_blocks": blocks, "command": cmd,
                           "log": str(log)}
    doc = document(tokenizer, args.job_prefix_len, args.seed + 100 + repeat)
    t0 = time.monotonic()
    env = server_env(server_args(args))
    if args.engine == "vllm":
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    with Server(cmd, env, log, url, args.startup_timeout) as server:
        rec["startup_s"] = server.startup_s
        rec["warm"] = run_client(client_args(args, args.seed), "control", args.num_prompts, url, work)
        rec["capacity_rps"] = capacity_rps(rec["warm"])
        rate = None
        if args.load_fraction is not None:
            if rec["capacity_rps"] is None:
                raise RuntimeError(f"the warm-up load reported no throughput: {rec['warm']}")
            rate = args.load_fraction * rec["capacity_rps"]
            print(f"   capacity {rec['capacity_rps']:.3f} req/s at concurrency {args.concurrency}; load "
                  f"{args.load_fraction:.0%} of it: {rate:.3f} req/s (Poisson)", flush=True)
        rec["request_rate"] = rate
        rec["phases"] = {phase: run_phase(args, phase, repeat, url, work, doc, rate) for phase in order}
    rec["thread_setup"] = thread_setup(log)
    rec["wall_s"] = time.monotonic() - t0
    rec["ratios"] = ratios(rec)
    return rec


def ratios(rec: dict[str, Any]) -> dict[str, float | None]:
    """Job / no-job of each `RATIOS` field in one repeat, and of the load's wall time (`load_s`: a stall that
    only a few tokens wait through can stay below the p99 of every request's gaps, yet lengthen the load)."""
    job, base = rec["phases"]["job"], rec["phases"]["no-job"]
    out = {}
    for name, field in ALL_RATIOS:
        src = (job["client"], base["client"]) if field else (job, base)
        a, b = (x.get(field or "load_s") for x in src)
        out[name] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median [min, max] of each ratio over the repeats whose job started, and the target check."""
    ok = [r for r in runs if r["phases"]["job"].get("trigger", {}).get("started")]
    out: dict[str, Any] = {"repeats": [r["repeat"] for r in ok], "target": TARGET}
    for name, _ in ALL_RATIOS:
        vals = [r["ratios"][name] for r in ok if r["ratios"][name] is not None]
        out[name] = statistics.median(vals) if vals else None
        out[f"{name}_per_repeat"] = vals
    out["job_active_fraction"] = [r["phases"]["job"]["job_active_fraction"] for r in ok]
    out["job_finished_during_load"] = [r["phases"]["job"].get("job_finished_during_load") for r in ok]
    out["request_rate"] = [r.get("request_rate") for r in ok]
    out["capacity_rps"] = [r.get("capacity_rps") for r in ok]
    out["no_job_active_fraction"] = [r["phases"]["no-job"]["job_active_fraction"] for r in ok]
    # the host's own scheduling gaps (>= 0.1 s) during each phase's load: a client records them as latency
    out["host_stalls"] = {ph: [{k: r["phases"][ph].get("host_stalls", {}).get(k) for k in ("count", "max_s", "total_s")}
                               for r in ok] for ph in PHASES}
    # the load's inter-token gaps >= 0.4 s (vLLM's client), and how many of them end at other requests' first
    # tokens (a decode step that also ran newly admitted requests' prefills: the engine's own interference)
    out["itl_gaps"] = {ph: [{k: (r["phases"][ph]["client"].get("itl_gaps") or {}).get(k)
                             for k in ("count", "max_s", "ending_at_first_tokens")} for r in ok] for ph in PHASES}
    out["failed_requests"] = sum(int(p["client"].get("failed") or 0) for r in runs for p in r["phases"].values())
    # the load's wall time too: a stall that only the few requests then running wait through (one gap each)
    # stays below the p99 of every gap and every TTFT, yet the same work takes longer
    main = (out["itl_p99_during_job_ratio"], out["ttft_during_job_ratio"], out["load_s_during_job_ratio"])
    out["meets_target"] = None if None in main else all(x <= TARGET for x in main)
    return out


def markdown(doc: dict[str, Any]) -> str:
    s, st = doc["summary"], doc["settings"]
    lines = [f"Client latency while a KVzip job scores a {st['job_prefix_len']}-token document, over the same "
             f"server's load without a job ({doc['meta'].get('engine', st['engine'])}, {len(s['repeats'])} repeats, "
             f"phase order flipped each repeat; load: {st['num_prompts']} random prompts of {st['input_len']} + "
             f"{st['output_len']} tokens at concurrency {st['concurrency']}"
             + ("" if st.get("load_fraction") is None else
                f", sent as Poisson arrivals at {st['load_fraction']:.0%} of the rate the warm-up load measured ("
                + ", ".join(f"{x:.3f}" for x in s.get("request_rate") or []) + " req/s)")
             + f"). Target <= {TARGET}x.", "",
             "| job / no-job | median | per repeat |", "|---|---|---|"]
    for name, _ in ALL_RATIOS:
        med = s[name]
        lines.append(f"| {name} | {'n/a' if med is None else f'{med:.2f}'} | "
                     + ", ".join(f"{x:.2f}" for x in s[f"{name}_per_repeat"]) + " |")
    lines += ["", "Share of the job-phase load that ran beside the job (poller): "
              + ", ".join("n/a" if x is None else f"{x:.2f}" for x in s["job_active_fraction"])
              + f"; failed requests: {s['failed_requests']}; meets the target: {s['meets_target']}.", ""]
    if s.get("job_finished_during_load"):
        lines[-1:] = [f"Job finished while the load ran: {', '.join(str(x) for x in s['job_finished_during_load'])}.",
                      ""]
    if s.get("host_stalls"):
        lines += ["Host stalls during the load (the probe process unscheduled >= 0.1 s; count / longest): "
                  + "; ".join(f"{ph}: " + ", ".join(f"{h['count']} / {h['max_s']:.2f} s" for h in hs)
                              for ph, hs in s["host_stalls"].items() if all(h.get("count") is not None for h in hs))
                  + ".", ""]
    if any(g["count"] is not None for gs in s.get("itl_gaps", {}).values() for g in gs):
        lines += ["Inter-token gaps >= 0.4 s during the load (count / ended by other requests' first tokens / "
                  "longest): " + "; ".join(f"{ph}: " + ", ".join(
                      f"{g['count']} / {g['ending_at_first_tokens']} / {g['max_s']:.2f} s" for g in gs)
                      for ph, gs in s["itl_gaps"].items() if all(g["count"] is not None for g in gs)) + ".", ""]
    if doc.get("caveat"):
        lines += [f"**Caveat:** {doc['caveat']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens of the client load")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--load-fraction", type=float, default=None,
                   help="send the phases' load as Poisson arrivals at this fraction of the requests/s the warm-up "
                   "load (closed loop at --concurrency) got through, e.g. 0.5 (issue 17's 50 %% load); default: "
                   "closed loop, as many requests in flight as --concurrency (a server never idle)")
    p.add_argument("--job-prefix-len", type=int, default=2048, help="tokens of the document the job scores")
    p.add_argument("--job-wait", type=float, default=60.0, help="max seconds to wait for the job to be queued")
    p.add_argument("--max-model-len", type=int, default=None, help="default job prefix + 512")
    p.add_argument("--settle", type=float, default=600.0, help="max seconds to wait for the job after the load")
    add_server_arguments(p, port=8132)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replot", action="store_true", help="recompute the ratios, summary and .md of --out's JSON")
    args = p.parse_args(argv)
    if args.replot:
        doc = json.loads(args.out.read_text())
        for rec in doc["runs"]:
            for phase in rec["phases"].values():
                same_names(phase["client"])
            rec["ratios"] = ratios(rec)
        doc["summary"] = summary(doc["runs"])
        write_doc(args.out, doc, markdown(doc))
        return 0
    args.server_args = extra
    if args.block_size is None:
        args.block_size = 32 if args.engine == "vllm" else 1
    if args.max_model_len is None:
        args.max_model_len = max(args.job_prefix_len, args.input_len) + 512
    if args.model is None:
        from kvzip_plugin.hf.models import demo_model_dir

        args.model = str(demo_model_dir())
    if args.load_fraction is not None and not 0 < args.load_fraction <= 1:
        p.error("--load-fraction must be in (0, 1]")
    if min(args.repeats, args.num_prompts, args.concurrency) < 1:
        p.error("--repeats, --num-prompts and --concurrency must be >= 1")
    if args.job_prefix_len < args.min_prefix_tokens:
        p.error("--job-prefix-len must be >= --min-prefix-tokens (no job would start)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    work = Path(tempfile.mkdtemp(prefix=f"kvzip-during-job-{args.engine}-"))

    def _term(signum, frame):  # SIGTERM runs the server's clean-up as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "python")}
    doc: dict[str, Any] = {"benchmark": f"during-job-{args.engine}", "meta": meta(args), "settings": settings,
                           "runs": []}
    t0 = time.monotonic()
    for rep in range(args.repeats):
        doc["runs"].append(run_repeat(args, rep, tokenizer, work))
        args.out.with_suffix(".partial.json").write_text(json.dumps(doc, indent=1, default=str))
    doc["meta"]["wall_s"] = time.monotonic() - t0
    doc["meta"]["load_average_at_end"] = os.getloadavg()
    doc["summary"] = summary(doc["runs"])
    write_doc(args.out, doc, markdown(doc))
    print(f"wrote {args.out} in {doc['meta']['wall_s']:.0f} s; server log in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
