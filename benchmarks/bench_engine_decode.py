# SPDX-License-Identifier: Apache-2.0
"""Decode step time inside the real vLLM engine on a compacted prefix vs the full prefix, per structure.

For each prefix length L and batch size B: B requests share one L-token prefix (a needle-in-filler
document under the chat template) with different 8-token suffixes. With `--kv-compression kvzip` the
prefix is compressed first (two warm-up requests; the second queues the job, run to its commit), then
the B requests are admitted; once all of them decode, `--steps` engine steps are timed one by one
(`LLMEngine.step()`, the whole step: scheduling, forward, sampling) and the median is kept. `none` runs
the same load without compression. Each structure runs in a fresh engine process, one after the other
(never two at once), so the ratios compressed / full come from the same machine state.

What the numbers mean on vLLM's CPU backend: `none` and `head` attend with vLLM's own CPU kernel,
each request reading the prefix (or its `head`-compacted blocks) by itself; `pair` / `layer_budget`
attend through the same kernel over head pages (`integrations/vllm/cpu_kernel.py`), or, with many requests
on a store of long runs, the cascade (`cpu_cascade.py`: each run read once per step for all of them);
`--prefix-attention torch` measures the torch path instead (`integrations/vllm/attention.py`).

`--engine sglang` runs the same grid through the real SGLang server (the CPU harness of the tests: `torch_native`
attention, page size 1, non-overlap scheduler), one fresh server per structure, one after the other. The
prefix is compressed the same way, then the B requests are sent in one `/generate` call (not streamed: no
per-token traffic between the server's processes); the step time is the server's own: SGLang logs every
`--decode-log-interval` (here 4) decode steps the generated tokens per second since its last line, so a line
with B requests running whose previous line also had B running covers B-request decode steps only, and one step
is B / that throughput. What SGLang's numbers mean: `none` and `head` attend with SGLang's `torch_native`
backend (one SDPA per request over its whole row); `pair` / `layer_budget` rows are skipped by that backend and
attended by the plugin (`integrations/sglang/attention.py`: one pass over each entry's runs for all its rows).

    PYTHONPATH=. python benchmarks/bench_engine_decode.py --out benchmarks/results/engine-decode-cpu.json
    PYTHONPATH=. python benchmarks/bench_engine_decode.py --engine sglang --lengths 2048 --batches 1 8 32 \
        --out benchmarks/results/engine-decode-sglang-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import cpu_meta, run_child, vllm_cpu_meta  # noqa: E402

BLOCK_SIZE = 32


def prefix_ids(tokenizer: Any, length: int, seed: int) -> list[int]:
    """A block-aligned `length`-token prompt: the chat-template opening + a needle-in-filler document."""
    from kvzip_plugin.eval.datasets import needles_in_filler
    from kvzip_plugin.hf.template import build_layout

    n_filler = max(20, length // 10)
    while True:
        sample = needles_in_filler(1, n_filler, 8, seed).samples[0]
        layout = build_layout(tokenizer, sample.context)
        ids = list(layout.input_ids)
        if len(ids) >= length:
            return ids[:length]
        n_filler = int(n_filler * 1.5) + 1


def _profiler():
    """torch.profiler over the timed steps when KVZIP_BENCH_PROFILE names a folder (where the op table
    goes; with KVZIP_BENCH_PROFILE_PYTHON=1, cProfile's table of Python functions instead; with
    KVZIP_BENCH_PROFILE_SHAPES=1, torch ops grouped by their input shapes, e.g. to tell vLLM's own attention
    call from the plugin's); a no-op context otherwise. Profiled step times are not the benchmark's numbers."""
    import contextlib

    import torch

    if not os.environ.get("KVZIP_BENCH_PROFILE"):
        return contextlib.nullcontext()
    if os.environ.get("KVZIP_BENCH_PROFILE_PYTHON") == "1":  # Python functions (cProfile) instead of torch ops
        import cProfile

        return cProfile.Profile()
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  record_shapes=os.environ.get("KVZIP_BENCH_PROFILE_SHAPES") == "1")


def _write_profile(prof: Any, name: str) -> None:
    folder = os.environ.get("KVZIP_BENCH_PROFILE")
    if not folder or prof is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    if hasattr(prof, "key_averages"):
        shapes = os.environ.get("KVZIP_BENCH_PROFILE_SHAPES") == "1"
        table = prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=40)
        (Path(folder) / f"{name}.txt").write_text(table)
    elif hasattr(prof, "getstats"):
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(50)
        (Path(folder) / f"{name}.py.txt").write_text(buf.getvalue())


def child(model_dir: str, structure: str, ratio: float, lengths: list[int], batches: list[int], steps: int,
          n_prefixes: int = 1) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")
    from kvzip_plugin.integrations.vllm import kv_transfer_config
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {}
    if structure != "none":
        kwargs["kv_transfer_config"] = kv_transfer_config(ratio=ratio, min_prefix_tokens=64, min_hits=1,
                                                          structure=structure)
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, block_size=BLOCK_SIZE,
              max_model_len=min(8192, max(lengths) + 256), max_num_seqs=max(batches),
              max_num_batched_tokens=max(lengths) + 256,
              enforce_eager=True, seed=0, **kwargs)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    sched = core.scheduler.connector.sched if core.scheduler.connector is not None else None

    def drain() -> None:
        for _ in range(100_000):
            if not core.scheduler.has_requests() and not (sched and (sched.jobs or sched.queue.queued)):
                return
            engine.step()
        raise RuntimeError("engine did not go idle")

    rows = []
    for length in lengths:
        prefixes = [prefix_ids(tokenizer, length, seed=length + 1000 * k) for k in range(n_prefixes)]
        t0 = time.perf_counter()
        for prefix in prefixes:
            for i in range(2):  # the second hit queues the job (min_hits=1)
                llm.generate([{"prompt_token_ids": prefix + [100 + i] * 8}], SamplingParams(max_tokens=1),
                             use_tqdm=False)
            drain()
        compress_s = time.perf_counter() - t0
        compacted = [{"L": p.logical_length, "P": p.physical_length, "head_pages": p.head_pages}
                     for p in (sched.compacted.values() if sched else []) if p.logical_length == length]
        for batch in batches:
            params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
            for i in range(batch):  # request i on prefix i mod K
                engine.add_request(f"L{length}-B{batch}-{i}",
                                   {"prompt_token_ids": prefixes[i % n_prefixes] + [200 + i] * 8}, params)
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or \
                    len(core.scheduler.running) < batch:
                engine.step()  # prefills (the suffixes; the prefix is a cache hit)
            engine.step()  # first decode step (warm-up)
            times = []
            prof = _profiler()
            with prof:
                for _ in range(steps):
                    t = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - t)
            _write_profile(prof, f"{structure}-L{length}-B{batch}")
            drain()
            rows.append({"structure": structure, "ratio": ratio, "L": length, "batch": batch, "prefixes": n_prefixes,
                         "step_ms_median": 1000 * statistics.median(times), "step_ms": [1000 * x for x in times],
                         "compacted": compacted, "compress_s": compress_s})
            print(f"{structure}@{ratio} L={length} B={batch}: {1000 * statistics.median(times):.2f} ms/step "
                  f"(prefix compressed in {compress_s:.1f} s)", file=sys.stderr, flush=True)
    return {"rows": rows}


SGLANG_LOG_INTERVAL = 4
_SGLANG_DECODE = re.compile(r"Decode batch, #running-req: (\d+),.*?gen throughput \(token/s\): ([\d.]+)")


def sglang_step_ms(log: str, batch: int) -> list[float]:
    """Decode step times (ms) from an SGLang server log: one per `Decode batch` line with `batch` requests
    running whose previous such line also had `batch` running (so its interval held only B-request decode
    steps, no prefill); a step is B tokens, so its time is B / the line's tokens per second."""
    lines = [(int(m.group(1)), float(m.group(2))) for m in _SGLANG_DECODE.finditer(log)]
    return [1000.0 * batch / thr for (prev, _), (running, thr) in zip(lines, lines[1:], strict=False)
            if prev == batch and running == batch and thr > 0]


def _compacted_hits(server: Any) -> float:
    """Requests served on a compacted prefix so far (the plugin's counter, once its series settle)."""
    return sum(v for k, v in server.settled_metrics().items()
               if k.partition("{")[0] == "sglang:kvzip_compressed_prefix_hits_total")


def sglang_rows(model_dir: str, structure: str, ratio: float, lengths: list[int], batches: list[int], steps: int,
                work_dir: Path) -> list[dict]:
    """The grid through one real SGLang server (`--kv-compression none` or `kvzip` with `structure`); its log and
    state dumps in a fresh folder of `work_dir` (a structure may be given twice: alternating runs)."""
    from transformers import AutoTokenizer

    from tests.integrations.sglang import harness, scenarios

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{structure}-", dir=work_dir))
    dump = run_dir / "dump"
    dump.mkdir()
    # a job scores with up to 2 L + ~300 slots (`scheduling.py`); the requests hold their own tokens beside it
    total = 2 * max(lengths) + max(batches) * (8 + steps + 4 * SGLANG_LOG_INTERVAL) + 1024
    args = ["--dtype", "float32", "--max-total-tokens", str(total), "--context-length", "8192",  # SmolLM2's
            "--max-running-requests", str(max(batches)), "--random-seed", "0",
            "--decode-log-interval", str(SGLANG_LOG_INTERVAL), "--enable-metrics",
            "--kv-compression", "none" if structure == "none" else "kvzip"]
    if structure != "none":
        args += ["--kv-compression-structure", structure, "--kv-compression-ratio", str(ratio),
                 "--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "1"]
    server = harness.SGLangServer(model_dir, *args, log_path=run_dir / "sglang.log",
                                  env={"KVZIP_DUMP_DIR": str(dump)})
    rows: list[dict] = []
    try:
        for length in lengths:
            prefix = prefix_ids(tokenizer, length, seed=length)
            t0 = time.perf_counter()
            for i in range(2):  # the second hit queues the job (min_hits=1)
                scenarios.generate(server, prefix + [100 + i] * 8, max_new=1, logprobs=False, timeout=3600)
            compacted = []
            if structure != "none":  # this length's job has ended (one job per length)
                state = scenarios.state_after_jobs(dump, lengths.index(length) + 1, timeout=3600)
                compacted = [{"L": e["L"], "P": e["P"]} for e in state["compacted"] if e["L"] == length]
                if not compacted:
                    raise RuntimeError(f"{structure}: no compacted prefix of {length} tokens after its job: {state}")
            compress_s = time.perf_counter() - t0
            for batch in batches:
                hits0 = _compacted_hits(server) if structure != "none" else 0.0
                start = server.log_offset()
                new = steps + 3 * SGLANG_LOG_INTERVAL  # the first lines (admission, prefills) are dropped
                params = {"temperature": 0.0, "max_new_tokens": new, "ignore_eos": True}
                t = time.perf_counter()
                outs = server.post("/generate", {"input_ids": [prefix + [200 + i] * 8 for i in range(batch)],
                                                 "sampling_params": [params] * batch}, timeout=7200)
                wall = time.perf_counter() - t
                cached = [o["meta_info"]["cached_tokens"] for o in outs]
                on_compacted = int(_compacted_hits(server) - hits0) if structure != "none" else 0
                if structure != "none" and on_compacted != batch:  # a silent fall-back to the full prefix
                    raise RuntimeError(f"{structure} L={length} B={batch}: {on_compacted} of {batch} requests on the "
                                       "compacted prefix")
                times = sglang_step_ms(server.log[start:], batch)
                if len(times) < 2:
                    raise RuntimeError(f"{structure} L={length} B={batch}: {len(times)} pure decode log line(s)")
                rows.append({"structure": structure, "ratio": ratio, "L": length, "batch": batch, "prefixes": 1,
                             "step_ms_median": statistics.median(times), "step_ms": times,
                             "decode_steps_per_value": SGLANG_LOG_INTERVAL, "cached_tokens_min": min(cached),
                             "on_compacted_prefix": on_compacted,
                             "request_wall_s": wall, "compacted": compacted, "compress_s": compress_s})
                print(f"[sglang {structure}] {structure}@{ratio} L={length} B={batch}: "
                      f"{statistics.median(times):.2f} ms/step ({len(times)} intervals of {SGLANG_LOG_INTERVAL}; "
                      f"prefix compressed in {compress_s:.1f} s)", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _, model_dir, structure, ratio, lengths, batches, steps, n_prefixes, backend = argv
        os.environ["KVZIP_PREFIX_ATTENTION"] = backend  # the child env drops the caller's KVZIP_* knobs
        out = child(model_dir, structure, float(ratio), [int(x) for x in lengths.split(",")],
                    [int(x) for x in batches.split(",")], int(steps), int(n_prefixes))
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    p.add_argument("--structures", nargs="+", default=["head", "layer_budget", "pair"])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 7680])  # SmolLM2: 8192 positions
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prefixes", type=int, default=1,
                   help="K distinct prefixes of each length, request i on prefix i mod K (a multi-tenant step)")
    p.add_argument("--prefix-attention", choices=["auto", "torch", "triton"], default="auto",
                   help="KVZIP_PREFIX_ATTENTION of the engine processes: how head-page stores attend (README)")
    args = p.parse_args(argv)
    if args.engine == "sglang" and (args.prefixes != 1 or args.prefix_attention != "auto"):
        p.error("--prefixes and --prefix-attention are vLLM's (the SGLang grid runs one prefix per length)")
    from kvzip_plugin.hf.models import DEMO_MODEL, demo_model_dir

    model_dir = str(demo_model_dir())
    rows = []
    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.engine == "sglang":  # the servers' logs and state dumps
        work_dir = Path(tempfile.mkdtemp(prefix="bench-engine-decode-sglang-"))
        print(f"SGLang server logs in {work_dir}", file=sys.stderr, flush=True)
    structures = ["none", *args.structures]  # a structure given twice runs twice (alternating runs)
    for run, structure in enumerate(structures):
        if args.engine == "sglang":
            got = sglang_rows(model_dir, structure, args.ratio, args.lengths, args.batches, args.steps, work_dir)
        else:
            got = run_child([__file__, "--child", model_dir, structure, str(args.ratio),
                             ",".join(map(str, args.lengths)), ",".join(map(str, args.batches)), str(args.steps),
                             str(args.prefixes), args.prefix_attention], structure, 7200, progress="ms/step")["rows"]
        rows += [{**r, "run": run} for r in got]
        args.out.with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    full = {(r["L"], r["batch"]): r["step_ms_median"] for r in rows if r["structure"] == "none"}
    for r in rows:
        r["vs_full"] = r["step_ms_median"] / full[(r["L"], r["batch"])]
    command = "PYTHONPATH=. python benchmarks/bench_engine_decode.py " + " ".join(argv)
    model = DEMO_MODEL + " (SmolLM2-135M-Instruct, float32, de-quantised from Q4_1 GGUF)"
    if args.engine == "sglang":
        from importlib.metadata import version

        meta = cpu_meta(command, model, time.perf_counter() - t0,
                        f"sglang {version('sglang')} (CPU harness: torch_native attention, page size 1)")
    else:
        meta = vllm_cpu_meta(command, model, time.perf_counter() - t0)
    doc = {"meta": {**meta, "ratio": args.ratio, "prefix_attention": args.prefix_attention}, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    where = ("SGLang's CPU server (step: the server's own decode log, intervals of "
             f"{SGLANG_LOG_INTERVAL} steps)" if args.engine == "sglang" else "vLLM's CPU backend")
    how = (f"median of the ~{args.steps // SGLANG_LOG_INTERVAL + 2} log intervals of {SGLANG_LOG_INTERVAL} steps "
           "with the whole batch decoding, one prefix per length" if args.engine == "sglang" else
           f"median of {args.steps} steps, prefix attention `{args.prefix_attention}`, {args.prefixes} distinct "
           f"prefix(es) per length (request i on prefix i mod {args.prefixes})")
    lines = [f"Decode step (whole engine step) on {where}, SmolLM2-135M float32, ratio {args.ratio}, {how}; "
             "cells: ms/step (compressed / full).", "",
             "| L | batch | " + " | ".join(structures) + " |", "|---|---|" + "---|" * len(structures)]
    for length in args.lengths:
        for batch in args.batches:
            cells = []
            for run, s in enumerate(structures):
                r = next(x for x in rows if x["run"] == run and x["L"] == length and x["batch"] == batch)
                cells.append(f"{r['step_ms_median']:.1f}" + ("" if s == "none" else f" ({r['vs_full']:.2f})"))
            lines.append(f"| {length} | {batch} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
