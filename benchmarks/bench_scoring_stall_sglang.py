# SPDX-License-Identifier: Apache-2.0
"""How much a compression job slows the requests that decode beside it, on the real SGLang server (CPU).

The SGLang side of `bench_scoring_stall.py`: B streaming clients decode steadily (short unrelated prompts,
long outputs, `/generate` with one chunk per token); the gaps between their tokens are taken without a job
(`baseline`, the last seconds before it), then a shared prefix of L tokens is hit twice, which queues a
KVzip job, and every gap that overlaps the time from the second hit's answer to the job's commit is
`during` (a gap that spans the whole job counts: that is the stall; the hits' own prefills are client work,
the same with or without KVzip, and are left out, but a gap that began during the second hit's prefill
counts whole). Configurations, each a fresh server, one after the other:
`--kv-compression-scoring-step-tokens 0` (each scoring request's prefill runs whole, ahead of the decode
batches) and the default (256: slices between decode rounds, `integrations/sglang/slicing.py`). Reported:
inter-token gap p50 / p99 / max during the job over the same server's baseline p50, and how long the job
took (from the second hit's answer to the commit line, or to `--job-timeout`: the row then says it did not
commit, and how many scoring tokens SGLang still had pending).

    PYTHONPATH=. python benchmarks/bench_scoring_stall_sglang.py --out benchmarks/results/scoring-stall-sglang-cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import cpu_name, git_commit  # noqa: E402

COMMIT = re.compile(r"kvzip-plugin: job \d+ committed.*")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _client(url: str, ids: list[int], max_new: int, stamps: list[float], stop: threading.Event) -> None:
    """Stream one generation of `max_new` tokens after another, appending each token's arrival time (a NaN
    between requests: no gap is taken across two)."""
    host, port = url[len("http://"):].split(":")
    while not stop.is_set():
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        body = {"input_ids": ids, "stream": True,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}}
        conn.request("POST", "/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = 0
        while not stop.is_set():
            line = resp.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data:"):
                chunk = json.loads(line[5:])
                if "meta_info" not in chunk:
                    raise RuntimeError(f"SGLang stream chunk without meta_info: {chunk}")
                n = chunk["meta_info"]["completion_tokens"]  # tokens so far (output_ids only without a tokenizer)
                now = time.perf_counter()
                stamps.extend([now] * (n - seen))
                seen = n
        conn.close()
        stamps.append(float("nan"))  # a new request: no gap across it


def _gaps(stamps: list[float], start: float, end: float, overlap: bool = False) -> list[float]:
    """Gaps between consecutive tokens of one client that end in [start, end], or with `overlap` that overlap
    it (a job that stalls decoding entirely leaves one gap spanning it, ending after the commit)."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)
            if a == a and b == b  # NaN marks a request boundary
            and ((a <= end and b >= start) if overlap else start <= b <= end)]


def _pending(log: str, offset: int) -> int | None:
    """SGLang's last `#pending-token` count in the log after `offset` (how much of a prefill was left)."""
    found = re.findall(r"#pending-token: (\d+)", log[offset:])
    return int(found[-1]) if found else None


def run(model_dir: str, step_tokens: int, length: int, batch: int, baseline_s: float, work: Path,
        job_timeout: float = 1800.0) -> dict[str, Any]:
    from bench_engine_decode import prefix_ids
    from transformers import AutoTokenizer

    from tests.integrations.sglang import harness

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    server = harness.SGLangServer(
        model_dir, "--dtype", "float32", "--kv-compression", "kvzip", "--kv-compression-ratio", "0.3",
        "--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "2",
        "--kv-compression-scoring-step-tokens", str(step_tokens), "--max-running-requests", str(batch + 4),
        "--max-total-tokens", str(4 * length + 4096), "--context-length", str(2 * length + 1024),
        "--chunked-prefill-size", str(length + 1024), log_path=work / f"sglang-{step_tokens}.log")
    stop = threading.Event()
    stamps: list[list[float]] = [[] for _ in range(batch)]
    threads = [threading.Thread(target=_client, args=(server.url, [300 + i] * 24, 512, stamps[i], stop),
                                daemon=True) for i in range(batch)]
    try:
        for t in threads:
            t.start()
        time.sleep(5.0)  # the clients' prefills are done: steady decoding
        t_base = time.perf_counter()
        time.sleep(baseline_s)
        t_hit = time.perf_counter()
        prefix = prefix_ids(tokenizer, length, seed=length)
        offset = server.log_offset()
        for i in range(2):  # the second hit queues the job
            server.post("/generate", {"input_ids": prefix + [100 + i] * 8,
                                      "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}}, timeout=600)
        t_job = time.perf_counter()
        deadline = t_job + job_timeout
        found = None
        while found is None and time.perf_counter() < deadline:
            found = COMMIT.search(server.log, offset)
            time.sleep(0.05)
        t_commit = time.perf_counter()
        time.sleep(1.0)
    finally:
        stop.set()
        log_text = server.log
        server.stop()
    baseline = [g for s in stamps for g in _gaps(s, t_base, t_hit)]
    during = [g for s in stamps for g in _gaps(s, t_job, t_commit, overlap=True)]
    base = statistics.median(baseline)
    row = {"step_tokens": step_tokens, "L": length, "batch": batch, "baseline_gaps": len(baseline),
           "baseline_p50_ms": 1000 * base, "during_gaps": len(during),
           "during_p50_ms": 1000 * statistics.median(during), "during_p99_ms": 1000 * _pct(during, 0.99),
           "during_max_ms": 1000 * max(during), "p50_ratio": statistics.median(during) / base,
           "p99_ratio": _pct(during, 0.99) / base, "max_ratio": max(during) / base, "job_s": t_commit - t_job,
           "committed": found is not None, "commit_line": found.group(0) if found else None,
           "pending_tokens_at_end": _pending(log_text, offset)}
    print(f"step_tokens={step_tokens}: baseline {row['baseline_p50_ms']:.1f} ms, during p50 x{row['p50_ratio']:.2f} "
          f"p99 x{row['p99_ratio']:.2f} max x{row['max_ratio']:.2f}, job {row['job_s']:.1f} s"
          f"{'' if found else ' (NOT committed: stopped at --job-timeout)'}", file=sys.stderr,
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-tokens", type=int, nargs="+", default=[0, 256])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--baseline-s", type=float, default=10.0)
    p.add_argument("--job-timeout", type=float, default=1800.0,
                   help="stop waiting for the commit after this many seconds (the row says committed: false)")
    args = p.parse_args(argv)
    import tempfile
    from importlib.metadata import version

    from kvzip_plugin.hf.models import DEMO_MODEL, demo_model_dir

    model_dir = str(demo_model_dir())
    work = Path(tempfile.mkdtemp(prefix="kvzip-stall-sglang-"))
    t0 = time.perf_counter()
    rows = [run(model_dir, s, args.length, args.batch, args.baseline_s, work, args.job_timeout)
            for s in args.step_tokens]
    doc = {"meta": {"command": "PYTHONPATH=. python benchmarks/bench_scoring_stall_sglang.py " + " ".join(argv),
                    "engine": "sglang", "model": DEMO_MODEL + " (SmolLM2-135M-Instruct, float32)",
                    "commit": git_commit(), "versions": {"sglang": version("sglang")},
                    "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                                 "load_average_at_end": os.getloadavg()},
                    "server": "CPU, torch_native attention, page size 1, non-overlap scheduler (the CI harness)",
                    "logs": str(work), "wall_s": time.perf_counter() - t0},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"Inter-token gaps of {args.batch} streaming clients while a KVzip job scores a {args.length}-token "
             "prefix (SGLang CPU server, SmolLM2-135M float32, ratio 0.3, pair); over the same server's gaps "
             "without a job.", "",
             "| --kv-compression-scoring-step-tokens | baseline p50 ms | during p50 | during p99 | during max | "
             "gaps during | job s | committed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step_tokens']} | {r['baseline_p50_ms']:.1f} | {r['p50_ratio']:.2f}x | "
                     f"{r['p99_ratio']:.2f}x | {r['max_ratio']:.2f}x | {r['during_gaps']} | {r['job_s']:.1f} | "
                     f"{'yes' if r['committed'] else 'no (' + str(r['pending_tokens_at_end']) + ' tokens left)'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
