# SPDX-License-Identifier: Apache-2.0
"""Answers through the real engines (vLLM, SGLang) on compacted prefixes, per structure and ratio, beside
the transformers path on the same questions.

For every context of a data set, the engine (vLLM's CPU backend, `LLM` in this process's child,
prefix caching on, `--kv-compression kvzip` with the given structure and ratio) first sees two short
requests on the context (the second one hits the cached prefix and queues a KVzip job; the trigger is
lowered to 1 hit and 64 tokens), runs the job to its commit, then gets every question of the context
in one batch: each question's prompt is `[template prefix | context | "\\n\\n" question + postfix |
answer prefix]` and it is right when vLLM's greedy tokens are exactly the answer's tokens (what
`bench_accuracy.greedy_exact_match` checks on the transformers path). `none` runs the same load
without compression. Each configuration runs in a fresh process (the plugin's settings are per engine).

`--engine sglang`: the real SGLang server (`python -m sglang.launch_server`, CPU, torch_native attention,
page size 1, float32, with the CI's test-harness shims) per configuration, `--kv-compression kvzip` with
the structure and ratio, trigger 64 tokens / 1 hit. Each context is warmed up with the span the
transformers path compresses (template opening + context; two prompts that continue it differently: the
second hits it and queues the job; with pages of one token SGLang compresses exactly that span), the job
is run to its
end (the plugin's state dump, `KVZIP_DUMP_DIR`), then all its questions go in one batched `/generate`;
`sglang:kvzip_compressed_prefix_hits_total` counts how many were served by the compacted prefix.

Beside it, the transformers path (`kvzip_plugin.hf`, the reference) answers the same questions from a
cache compressed with the same structure and ratio by its own scoring pass (`bench_accuracy`).
Differences to expect: the engine compresses the block-aligned part of the shared prompt (the tail of
the context up to 31 tokens stays uncompressed), and rounds every (layer, KV head) run up to whole
32-token pages with that head's next-best pairs (it keeps a little more than the ratio); its scores
come from the engine's own attention (float32 CPU kernels): the same algorithm, not the same bits.

    PYTHONPATH=. python benchmarks/bench_engine_accuracy.py --out benchmarks/results/engine-accuracy-smollm2.json
    PYTHONPATH=. python benchmarks/bench_engine_accuracy.py --engine sglang \
        --out benchmarks/results/engine-accuracy-sglang-smollm2.json

Writes the JSON (every question of every configuration, with the path that answered it) and a
Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import cpu_name, git_commit  # noqa: E402

logger = logging.getLogger("bench_engine_accuracy")

BLOCK_SIZE = 32
DEFAULT_STRUCTURES = ("head", "layer_budget", "pair")
DEFAULT_RATIOS = (0.3, 0.5)
DEFAULT_DATASETS = ("kv-300", "needle-300")


def prompts(tokenizer: Any, dataset: str) -> list[dict[str, Any]]:
    """One record per context: its warm-up prompts and its questions' prompts and answer ids."""
    from bench_accuracy import answer_ids

    from kvzip_plugin import datasets as data_sets
    from kvzip_plugin.hf.template import build_layout, question_ids

    out = []
    for sample in data_sets.load(dataset).samples:
        layout = build_layout(tokenizer, sample.context)
        base = list(layout.input_ids)
        questions = []
        for item in sample.items:
            prefix, answer = answer_ids(tokenizer, item)
            questions.append({"prompt": base + question_ids(tokenizer, layout, item.question) + prefix,
                              "answer": answer, "text": item.answer})
        out.append({"dataset": dataset, "sample": sample.id, "n_prefix": layout.n_prefix,
                    "n_context": layout.n_context, "questions": questions})
    return out


# ---- the engine side (a child process per configuration) ----------------------------------------------

HEAD_LEVEL = "kvzip_head"
"""Pseudo-structure of `--structures`: the `pair` store with `--kv-compression-scorer kvzip_head` (the
context-independent head-level variant: no scoring pass; the head-score file shipped for the model).
Engine-only: the transformers side has no such configuration here."""


def _structure_settings(structure: str) -> dict[str, str]:
    if structure == HEAD_LEVEL:
        return {"structure": "pair", "scorer": "kvzip_head"}
    return {"structure": structure, "scorer": "kvzip"}


def engine_child(model_dir: str, structure: str, ratio: float, contexts_file: str) -> dict[str, Any]:
    """Run every context through one vLLM engine; return per-question results."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process: drain jobs
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from kvzip_plugin.integrations.vllm import kv_transfer_config
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if structure != "none":
        kwargs["kv_transfer_config"] = kv_transfer_config(ratio=ratio, min_prefix_tokens=64, min_hits=1,
                                                          **_structure_settings(structure))
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, block_size=BLOCK_SIZE,
              max_model_len=2048, max_num_seqs=16, enforce_eager=True, seed=0, **kwargs)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    connector = core.scheduler.connector
    contexts = json.loads(Path(contexts_file).read_text())
    results, jobs = [], []
    t0 = time.perf_counter()
    for ctx in contexts:
        qs = ctx["questions"]
        warm = SamplingParams(max_tokens=1, temperature=0.0)
        for q in qs[:2]:  # the 2nd hits the cached prefix: with min_hits=1 it queues a job
            llm.generate([{"prompt_token_ids": q["prompt"]}], warm, use_tqdm=False)
        sched = connector.sched if connector is not None else None
        for _ in range(500):  # run the job (queued -> scoring requests -> compaction -> commit) to its end
            if not core.scheduler.has_requests() and not (sched and (sched.jobs or sched.queue.queued)):
                break
            engine.step()
        committed = None
        if sched is not None:
            committed = {s.value: n for s, n in sched.queue.finished.items()}
        jobs.append({"sample": ctx["sample"], "finished": committed})
        params = [SamplingParams(max_tokens=len(q["answer"]), temperature=0.0, ignore_eos=True) for q in qs]
        outs = llm.generate([{"prompt_token_ids": q["prompt"]} for q in qs], params, use_tqdm=False)
        for q_idx, (q, out) in enumerate(zip(qs, outs, strict=True)):
            tokens = list(out.outputs[0].token_ids)
            results.append({"dataset": ctx["dataset"], "sample": ctx["sample"], "question": q_idx,
                            "correct": int(tokens == q["answer"]), "reply": out.outputs[0].text,
                            "num_cached_tokens": out.num_cached_tokens})
    compacted = []
    if connector is not None:
        for p in connector.sched.compacted.values():
            compacted.append({"L": p.logical_length, "P": p.physical_length, "head_pages": p.head_pages})
    return {"results": results, "jobs": jobs, "compacted": compacted, "wall_s": time.perf_counter() - t0}


def run_engine(model_dir: str, structure: str, ratio: float, contexts_file: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH"))
                                        if p)
    cmd = [sys.executable, __file__, "--child", model_dir, structure, str(ratio), str(contexts_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine run {structure}@{ratio} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def common_prefix(prompts: list[list[int]]) -> list[int]:
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return prompts[0][:i]
    return prompts[0][:n]


def run_sglang(model_dir: str, structure: str, ratio: float, contexts: list[dict[str, Any]],
               work_dir: Path, tokenizer_vocab: int) -> dict[str, Any]:
    """Every context through one SGLang server (a subprocess of this one); per-question results."""
    from tests.integrations.sglang import harness, scenarios

    dump = work_dir / f"dump-{structure}-{ratio:g}"
    dump.mkdir(parents=True, exist_ok=True)
    args = ["--dtype", "float32", "--max-total-tokens", "16384", "--context-length", "2048", "--random-seed", "0",
            "--enable-metrics", "--kv-compression", "none" if structure == "none" else "kvzip"]
    if structure != "none":
        flags = _structure_settings(structure)
        args += ["--kv-compression-structure", flags["structure"], "--kv-compression-scorer", flags["scorer"],
                 "--kv-compression-ratio", str(ratio),
                 "--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "1"]
    server = harness.SGLangServer(model_dir, *args, log_path=work_dir / f"sglang-{structure}-{ratio:g}.log",
                                  env={"KVZIP_DUMP_DIR": str(dump)})
    results, jobs = [], []
    t0 = time.perf_counter()
    try:
        for ctx in contexts:
            qs = ctx["questions"]
            # the span the transformers path compresses (template opening + context); every question
            # continues it. Two different prompts extend it by one token: the 2nd hits it (a whole prompt
            # sent again is not a shared prefix) and, with min_hits=1, queues its job.
            shared = qs[0]["prompt"][:ctx["n_prefix"] + ctx["n_context"]]
            assert common_prefix([q["prompt"] for q in qs])[:len(shared)] == shared
            nxt = qs[0]["prompt"][len(shared)]
            for token in (nxt, nxt + 1 if nxt + 1 < tokenizer_vocab else nxt - 1):
                scenarios.generate(server, shared + [token], max_new=1, logprobs=False)
            finished = None
            if structure != "none":  # this context's job has ended (one job per context)
                state = scenarios.read_state(dump, timeout=600)
                deadline = time.monotonic() + 600
                while (state["jobs_live"] or sum(state["finished"].values()) < len(jobs) + 1) \
                        and time.monotonic() < deadline:
                    state = scenarios.read_state(dump, timeout=600, after=state["seq"])
                finished = state["finished"]
            hits0 = server.metric("sglang:kvzip_compressed_prefix_hits_total")
            payload = {"input_ids": [q["prompt"] for q in qs],
                       "sampling_params": [{"temperature": 0.0, "max_new_tokens": len(q["answer"]), "ignore_eos": True}
                                           for q in qs]}
            outs = server.post("/generate", payload, timeout=1800)
            time.sleep(1.5)  # the metrics are published at most once a second
            hits = server.metric("sglang:kvzip_compressed_prefix_hits_total") - hits0
            jobs.append({"sample": ctx["sample"], "finished": finished, "shared_tokens": len(shared),
                         "questions_on_compacted_prefix": int(hits)})
            for q_idx, (q, out) in enumerate(zip(qs, outs, strict=True)):
                tokens = list(out["output_ids"])
                results.append({"dataset": ctx["dataset"], "sample": ctx["sample"], "question": q_idx,
                                "correct": int(tokens == q["answer"]), "reply": out["text"],
                                "cached_tokens": out["meta_info"]["cached_tokens"]})
        compacted = []
        if structure != "none":
            compacted = [{"L": e["L"], "P": e["P"]} for e in scenarios.read_state(dump, timeout=120)["compacted"]]
    finally:
        server.stop()
    return {"results": results, "jobs": jobs, "compacted": compacted, "wall_s": time.perf_counter() - t0}


# ---- the transformers side ----------------------------------------------------------------------------

def transformers_path(structures: list[str], ratios: list[float], datasets: list[str]) -> list[dict[str, Any]]:
    """Same questions on the transformers reference path (one scoring pass per context)."""
    import torch
    from bench_accuracy import compressed_context as hf_context
    from bench_accuracy import greedy_exact_match, prefill

    from kvzip_plugin import KVzipConfig
    from kvzip_plugin import datasets as data_sets
    from kvzip_plugin.eviction import plan_eviction
    from kvzip_plugin.hf.compressor import KVzipCompressor
    from kvzip_plugin.hf.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model()
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig())
    rows = []
    for name in datasets:
        for sample in data_sets.load(name).samples:
            layout = compressor.layout(sample.context)
            full, prefill_s = prefill(compressor, layout)
            scores = compressor.score(layout, full)
            configs = [("none", 1.0, hf_context(layout, full, None, "none", prefill_s, 0.0))]
            for structure in [x for x in structures if x != HEAD_LEVEL]:
                for ratio in ratios:
                    plan = plan_eviction(scores, ratio, structure)
                    configs.append((structure, ratio, hf_context(layout, full, plan, "kvzip", prefill_s, 0.0)))
            for structure, ratio, ctx in configs:
                for q_idx, item in enumerate(sample.items):
                    rows.append({"path": "transformers", "structure": structure, "ratio": ratio, "dataset": name,
                                 "sample": sample.id, "question": q_idx,
                                 "correct": int(greedy_exact_match(model, tokenizer, ctx, item))})
            logger.info("transformers %s %s done", name, sample.id)
    return rows


# ---- report -------------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per (path, dataset, structure, ratio), and engine-vs-transformers paired counts."""
    table: dict[tuple, list[int]] = {}
    for r in rows:
        table.setdefault((r["path"], r["dataset"], r["structure"], r["ratio"]), []).append(r["correct"])
    by_q = {(r["path"], r["dataset"], r["structure"], r["ratio"], r["sample"], r["question"]): r["correct"]
            for r in rows}
    out = []
    for (path, ds, structure, ratio), vals in sorted(table.items()):
        rec = {"engine": path, "dataset": ds, "structure": structure, "ratio": ratio, "n": len(vals),
               "correct": sum(vals), "accuracy": 100.0 * sum(vals) / len(vals)}
        if path != "transformers":
            pairs = [(v, by_q.get(("transformers", ds, structure, ratio, k[4], k[5])))
                     for k, v in by_q.items() if k[:4] == (path, ds, structure, ratio)]
            pairs = [(a, b) for a, b in pairs if b is not None]
            rec["vs_transformers"] = {"both": sum(a and b for a, b in pairs),
                                      "engine_only": sum(a and not b for a, b in pairs),
                                      "transformers_only": sum(b and not a for a, b in pairs),
                                      "neither": sum(not a and not b for a, b in pairs)}
        out.append(rec)
    return out


def markdown(doc: dict[str, Any]) -> str:
    name = {"vllm": "vLLM", "sglang": "SGLang"}[doc["meta"].get("engine", "vllm")]
    lines = [f"| data set | structure | ratio | {name} engine | transformers | engine-only / transformers-only right |",
             "|---|---|---|---|---|---|"]
    rows = {(r["engine"], r["dataset"], r["structure"], r["ratio"]): r for r in doc["summary"]}
    for (path, ds, structure, ratio), r in sorted(rows.items()):
        if path == "transformers":
            continue
        t = rows.get(("transformers", ds, structure, ratio))
        vs = r.get("vs_transformers", {})
        lines.append(f"| {ds} | {structure} | {ratio:g} | {r['correct']}/{r['n']} ({r['accuracy']:.1f}) | "
                     + (f"{t['correct']}/{t['n']} ({t['accuracy']:.1f})" if t else "-")
                     + f" | {vs.get('engine_only', '-')} / {vs.get('transformers_only', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _, model_dir, structure, ratio, contexts_file = argv
        print("RESULT " + json.dumps(engine_child(model_dir, structure, float(ratio), contexts_file)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--structures", nargs="+", default=list(DEFAULT_STRUCTURES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    from kvzip_plugin.hf.models import DEMO_MODEL, demo_model_dir

    model_dir = str(demo_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    contexts = [c for ds in args.datasets for c in prompts(tokenizer, ds)]
    contexts_file = args.out.with_suffix(".contexts.tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contexts_file.write_text(json.dumps(contexts))
    t0 = time.perf_counter()
    rows, engine_runs = [], []
    configs = [("none", 1.0)] + [(s, r) for s in args.structures for r in args.ratios]
    work_dir = Path(tempfile.mkdtemp(prefix="kvzip-engine-accuracy-"))  # server logs and state dumps
    logger.info("server logs and state dumps in %s", work_dir)
    for structure, ratio in configs:
        t = time.perf_counter()
        if args.engine == "vllm":
            res = run_engine(model_dir, structure, ratio, contexts_file)
        else:
            res = run_sglang(model_dir, structure, ratio, contexts, work_dir, len(tokenizer))
        for r in res["results"]:
            rows.append({"path": args.engine, "structure": structure, "ratio": ratio, **r})
        engine_runs.append({"structure": structure, "ratio": ratio, "jobs": res["jobs"], "compacted": res["compacted"],
                            "wall_s": res["wall_s"]})
        acc = sum(r["correct"] for r in res["results"]) / max(1, len(res["results"]))
        logger.info("%s %s@%g: %.1f%% in %.0f s", args.engine, structure, ratio, 100 * acc, time.perf_counter() - t)
    if not args.skip_transformers:
        rows += transformers_path(args.structures, args.ratios, args.datasets)
    contexts_file.unlink()
    from importlib.metadata import version

    import torch
    import transformers

    engine_version = version("sglang") if args.engine == "sglang" else __import__("vllm").__version__
    doc = {
        "meta": {"command": "PYTHONPATH=. python benchmarks/bench_engine_accuracy.py " + " ".join(argv),
                 "engine": args.engine,
                 "model": DEMO_MODEL + " (SmolLM2-135M-Instruct, de-quantised from Q4_1 GGUF)",
                 "commit": git_commit(), "versions": {args.engine: engine_version, "torch": torch.__version__,
                                                      "transformers": transformers.__version__},
                 "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                              "load_average_at_end": os.getloadavg()},
                 "block_size": BLOCK_SIZE if args.engine == "vllm" else 1,
                 "trigger": {"min_prefix_tokens": 64, "min_hits": 1},
                 "wall_s": time.perf_counter() - t0},
        "engine_runs": engine_runs, "questions": rows,
    }
    doc["summary"] = summarize(rows)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
