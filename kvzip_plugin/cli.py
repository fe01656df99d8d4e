# SPDX-License-Identifier: Apache-2.0
"""`kvzip` console script: `kvzip demo`, `kvzip calibrate-heads` and `kvzip load`."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from kvzip_plugin.config import KVzipConfig


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from kvzip_plugin.demo import demo_context, run_demo
    from kvzip_plugin.hf.compressor import KVzipCompressor
    from kvzip_plugin.hf.models import load_model

    config = KVzipConfig(ratio=args.ratio, structure=args.structure, chunk_size=args.chunk_size)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    print(f"loading {args.model} ...", flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    context, items = demo_context(args.people, args.questions, args.seed)
    compressor = KVzipCompressor(model, tokenizer, config)
    full, comp, rows = run_demo(compressor, context, items, args.max_new_tokens)
    s = comp.stats
    print()
    print(f"model: {args.model} (weights de-quantised from 4-bit GGUF)" if args.model.startswith("smollm2")
          else f"model: {args.model}")
    print(f"context: {s.n_context} tokens (+{s.n_prefix} protected prefix); structure={s.structure}, "
          f"ratio asked {config.ratio}, achieved {s.achieved_ratio:.3f}")
    print(f"KV cache: full {_mib(full.stats.full_kv_bytes)} | compressed kept {_mib(s.kept_kv_bytes)} "
          f"(stored {_mib(s.stored_kv_bytes)}) -> {full.stats.full_kv_bytes / max(s.stored_kv_bytes, 1):.2f}x smaller")
    print(f"prefill {s.prefill_seconds:.2f} s | scoring pass {s.scoring_seconds:.2f} s "
          f"({s.scoring_seconds / max(s.prefill_seconds, 1e-9):.1f}x prefill)")
    print()
    header = f"{'question':<42} {'expected':<9} {'full cache':<32} {'compressed':<32}"
    print(header)
    print("-" * len(header))
    ok_full = ok_comp = 0
    for row in rows:
        ok_full += row.item.answer in row.full.text
        ok_comp += row.item.answer in row.compressed.text
        full_text, comp_text = (" ".join(a.text.split()) for a in (row.full, row.compressed))
        print(f"{row.item.question[:41]:<42} {row.item.answer:<9} {full_text[:31]:<32} {comp_text[:31]:<32}")
    print("-" * len(header))
    full_ms = statistics.median(r.full.decode_ms_per_token for r in rows)
    comp_ms = statistics.median(r.compressed.decode_ms_per_token for r in rows)
    print(f"correct: full {ok_full}/{len(rows)}, compressed {ok_comp}/{len(rows)}")
    print(f"decode ms/token (median over questions): full {full_ms:.2f}, compressed {comp_ms:.2f} "
          f"(ratio {comp_ms / full_ms:.2f})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from kvzip_plugin.head_scores import head_scores_from, save_head_scores
    from kvzip_plugin.hf.cache import KVzipCache
    from kvzip_plugin.hf.compressor import KVzipCompressor
    from kvzip_plugin.hf.models import load_model

    model, tokenizer = load_model(args.model)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=args.chunk_size))
    maps = []
    for path in args.text:
        layout = compressor.layout(Path(path).read_text())
        cache = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
        maps.append(compressor.score(layout, cache, progress=True))
    scores = head_scores_from(maps)
    save_head_scores(Path(args.out), scores, model.config, args.model,
                     calibration=", ".join(Path(p).name for p in args.text))
    print(f"wrote {args.out}: {tuple(scores.shape)} head scores")
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from kvzip_plugin.eval.loadgen import LoadConfig, format_report, run_load, wait_healthy

    cfg = LoadConfig(url=args.url, model=args.model, tenants=args.tenants, questions=args.questions,
                     concurrency=args.concurrency, max_tokens=args.max_tokens, facts=args.facts, seed=args.seed,
                     cache_salt=args.cache_salt, ignore_eos=args.ignore_eos, timeout=args.timeout,
                     metrics=not args.no_metrics, metrics_interval=args.metrics_interval,
                     metrics_prefix=args.metrics_prefix, settle=args.settle)
    try:
        if args.wait > 0:
            wait_healthy(cfg.url, args.wait)
        report = run_load(cfg)
    except (OSError, TimeoutError, ValueError, KeyError) as err:  # unreachable server, bad /v1/models, bad sizes
        print(f"kvzip load: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            print(f"wrote {args.json}")
    return 0 if all(r.ok for r in report.results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzip", description="KVzip KV-cache compression")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress one long context, answer several questions from it")
    demo.add_argument("--model", default="smollm2-135m-instruct", help="demo alias, local folder or hub name")
    demo.add_argument("--ratio", type=float, default=0.5,
                      help="fraction of context KV pairs kept (0.5 by default: the 135M demo model is "
                           "far less robust to eviction than the paper's 7B+ models)")
    demo.add_argument("--structure", default="head",
                      help="head (default: real memory savings, the paged layout) | pair | layer")
    demo.add_argument("--chunk-size", type=int, default=2000)
    demo.add_argument("--people", type=int, default=40, help="directory lines (about 20 tokens each)")
    demo.add_argument("--questions", type=int, default=4, help="people asked about (2 questions each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--threads", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    cal = sub.add_parser("calibrate-heads", help="compute a context-independent head-score file")
    cal.add_argument("--model", default="smollm2-135m-instruct")
    cal.add_argument("--text", nargs="+", required=True, help="calibration text file(s)")
    cal.add_argument("--out", required=True)
    cal.add_argument("--chunk-size", type=int, default=2000)
    cal.set_defaults(func=_cmd_calibrate)
    load = sub.add_parser("load", help="multi-tenant chat load on an OpenAI-compatible server, with its /metrics")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    load.add_argument("--model", default=None, help="model name in requests (default: first of /v1/models)")
    load.add_argument("--tenants", type=int, default=4, help="tenants, each with its own long system prompt")
    load.add_argument("--questions", type=int, default=8, help="questions per tenant")
    load.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--facts", type=int, default=64,
                      help="facts in each tenant's document (64: ~1,100 prompt tokens with SmolLM2's template)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--cache-salt", action="store_true", help="send a per-tenant cache_salt (vLLM)")
    load.add_argument("--ignore-eos", action="store_true", help="always decode --max-tokens tokens (vLLM, SGLang)")
    load.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    load.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for /health first")
    load.add_argument("--settle", type=float, default=0.0,
                      help="after the load, wait up to this many seconds for KVzip jobs to finish before the last "
                           "/metrics scrape")
    load.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    load.add_argument("--metrics-interval", type=float, default=0.25, help="seconds between /metrics polls")
    load.add_argument("--metrics-prefix", default="vllm:", help="engine prefix of the metric names")
    load.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                      help="print the full result as JSON instead of the report (no PATH), or also write it to PATH")
    load.set_defaults(func=_cmd_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValidationError as err:
        print(f"kvzip: invalid configuration: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
