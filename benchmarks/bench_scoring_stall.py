# SPDX-License-Identifier: Apache-2.0
"""How much a compression job slows the requests that decode beside it, inside the real vLLM engine.

B client requests decode steadily (short unrelated prompts, long outputs). Their step times are taken
without a job (`baseline`), then a shared prefix of L tokens is hit twice, which queues a KVzip job, and
every step is timed until the job commits (`during`; the two hits' own prefill steps are left out: they
are client work, the same with or without KVzip). Configurations, each in a fresh engine process, one
after the other: `--kv-compression-scoring-step-tokens 0` (no slicing: each scoring request's prefill
runs whole in one step beside the decoding clients) and the default (256, adaptive slices after client
prefills). Reported: step-time p50 / p99 / max during the job over the same configuration's baseline p50
(the decoding clients' inter-token latency in this synchronous engine loop), and how long the job took.

    PYTHONPATH=. python benchmarks/bench_scoring_stall.py --out benchmarks/results/scoring-stall-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine_decode import BLOCK_SIZE, prefix_ids  # noqa: E402
from run_info import run_child, vllm_cpu_meta  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def child(model_dir: str, step_tokens: int, length: int, batch: int, baseline_steps: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from kvzip_plugin.integrations.vllm import kv_transfer_config
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, block_size=BLOCK_SIZE,
              max_model_len=length + 1024, max_num_seqs=batch + 4, max_num_batched_tokens=length + 1024,
              enforce_eager=True, seed=0,
              kv_transfer_config=kv_transfer_config(ratio=0.3, min_prefix_tokens=64, min_hits=2,
                                                    scoring_step_tokens=step_tokens))
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    sched = core.scheduler.connector.sched
    clients = SamplingParams(max_tokens=100_000 // batch, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"c{i}", {"prompt_token_ids": [300 + i] * 24}, clients)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or \
            len(core.scheduler.running) < batch:
        engine.step()
    for _ in range(3):
        engine.step()  # warm-up decode steps

    def timed_step() -> float:
        t = time.perf_counter()
        engine.step()
        return time.perf_counter() - t

    baseline = [timed_step() for _ in range(baseline_steps)]
    prefix = prefix_ids(tokenizer, length, seed=length)
    hit = SamplingParams(max_tokens=1, temperature=0.0)
    during: list[float] = []
    t_job = time.perf_counter()
    for i in range(2):  # the second hit queues the job
        engine.add_request(f"hit{i}", {"prompt_token_ids": prefix + [100 + i] * 8}, hit)
        while any(r.request_id.startswith(f"hit{i}") for r in core.scheduler.running) or \
                any(r.request_id.startswith(f"hit{i}") for r in core.scheduler.waiting):
            engine.step()  # the hit's own prefill: client work, not timed
    for _ in range(100_000):
        if not sched.jobs and not sched.queue.queued and not sched.to_add:
            break
        during.append(timed_step())
    else:
        raise RuntimeError("the job did not end")
    job_s = time.perf_counter() - t_job
    finished = {s.value: n for s, n in sched.queue.finished.items()}
    base = statistics.median(baseline)
    row = {"step_tokens": step_tokens, "L": length, "batch": batch,
           "baseline_ms": [1000 * x for x in baseline], "during_ms": [1000 * x for x in during],
           "baseline_p50_ms": 1000 * base, "during_p50_ms": 1000 * statistics.median(during),
           "during_p99_ms": 1000 * _pct(during, 0.99), "during_max_ms": 1000 * max(during),
           "p50_ratio": statistics.median(during) / base, "p99_ratio": _pct(during, 0.99) / base,
           "max_ratio": max(during) / base, "job_steps": len(during), "job_s": job_s,
           "committed": finished.get("committed", 0),
           "final_slice": sched.gate.step_tokens, "held_steps": sched.gate.held_steps}
    print(f"step_tokens={step_tokens}: baseline {row['baseline_p50_ms']:.1f} ms, during p50 x{row['p50_ratio']:.2f} "
          f"p99 x{row['p99_ratio']:.2f} max x{row['max_ratio']:.2f}, {len(during)} steps, {job_s:.1f} s",
          file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _, model_dir, step_tokens, length, batch, baseline_steps = argv
        print("RESULT " + json.dumps(child(model_dir, int(step_tokens), int(length), int(batch),
                                           int(baseline_steps))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-tokens", type=int, nargs="+", default=[0, 256])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--baseline-steps", type=int, default=40)
    args = p.parse_args(argv)
    from kvzip_plugin.hf.models import DEMO_MODEL, demo_model_dir

    model_dir = str(demo_model_dir())
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for step_tokens in args.step_tokens:
        rows.append(run_child([__file__, "--child", model_dir, str(step_tokens), str(args.length), str(args.batch),
                               str(args.baseline_steps)], f"step_tokens={step_tokens}", 3600))
    doc = {"meta": vllm_cpu_meta("PYTHONPATH=. python benchmarks/bench_scoring_stall.py " + " ".join(argv),
                                 DEMO_MODEL + " (SmolLM2-135M-Instruct, float32, de-quantised from Q4_1 GGUF)",
                                 time.perf_counter() - t0),
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"Decode steps of {args.batch} client requests while a KVzip job scores a {args.length}-token prefix "
             "(vLLM CPU, SmolLM2-135M float32, ratio 0.3, pair); step times over the same engine's steps "
             "without a job.", "",
             "| --kv-compression-scoring-step-tokens | baseline p50 ms | during p50 | during p99 | during max | "
             "job steps | job s | final slice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step_tokens']} | {r['baseline_p50_ms']:.1f} | {r['p50_ratio']:.2f}x | "
                     f"{r['p99_ratio']:.2f}x | {r['max_ratio']:.2f}x | {r['job_steps']} | {r['job_s']:.1f} | "
                     f"{r['final_slice']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
