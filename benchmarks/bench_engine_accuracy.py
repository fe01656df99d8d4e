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

Real data (`kvzip_plugin.eval.datasets`: `squad-group`, several SQuAD v2.0 dev paragraphs of one article
per context, 1-2 questions per paragraph; `hotpotqa-group`, the gold and distractor paragraphs of 2 HotpotQA
dev items per context, both questions; `ruler-mk`, RULER's multi-key needle in its essay haystack, every
key asked): answers are free-form. Both paths feed the same prompt tokens and decode greedily until a stop
token (EOS / `<|im_end|>`) or the first newline, at most `MAX_NEW_TOKENS`; the answer text is scored by the
set's own metric (`kvzip_plugin.eval.metrics.score_text`: SQuAD's normalised exact match and token F1, the
max over the gold answers; HotpotQA's, with its yes/no rule; RULER's string match, reported as both EM and
F1). The report adds, per (structure, ratio), the questions
that flip right -> wrong and wrong -> right against `none` on the same path (with the sign-test p), the
questions where engine and transformers agree, and 95% intervals (Wilson for EM, bootstrap for F1).
Free-form sets run on both engines (SGLang: the same stop tokens and newline stop in its sampling params).

`--model` names the model (the demo model by default, or an evidence model of
`kvzip_plugin.hf.evidence_models`, e.g. `qwen2.5-coder-0.5b-instruct`); the engine child and the
transformers path both load it from `kvzip_plugin.hf.models.model_dir`.

    PYTHONPATH=. python benchmarks/bench_engine_accuracy.py --out benchmarks/results/engine-accuracy-smollm2.json
    PYTHONPATH=. python benchmarks/bench_engine_accuracy.py --engine sglang \
        --out benchmarks/results/engine-accuracy-sglang-smollm2.json
    PYTHONPATH=. python benchmarks/bench_engine_accuracy.py --model qwen2.5-coder-0.5b-instruct \
        --datasets squad-group --max-samples 8 --configs none pair@0.3 layer_budget@0.3 head@0.3 pair@0.5 \
        --out benchmarks/results/engine-accuracy-squad-qwen0.5b.json

Writes the JSON (every question of every configuration, with the path that answered it) and a
Markdown table next to it. As it goes it keeps `OUT.partial.json` (each finished engine configuration and
transformers context): `--resume` continues an interrupted run from it; `--time-budget-s` starts no new
configuration or context after that many seconds and reports what finished (`meta.left_out`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import cpu_name, git_commit, run_child  # noqa: E402

logger = logging.getLogger("bench_engine_accuracy")

BLOCK_SIZE = 32
DEFAULT_STRUCTURES = ("head", "layer_budget", "pair")
DEFAULT_RATIOS = (0.3, 0.5)
DEFAULT_DATASETS = ("kv-300", "needle-300")


MAX_NEW_TOKENS = 24
"""Free-form answers: greedy tokens after the prompt, at most this many (SQuAD answers are short)."""

FREE_FORM_FAMILIES = ("squad_group", "hotpotqa_group", "ruler_niah")
"""Data-set families answered free-form, each scored by its own metric (`kvzip_plugin.eval.metrics.score_text`:
SQuAD / HotpotQA EM and F1, RULER string match); the others: exact token match."""

MAX_MODEL_LEN = 4096
"""Both engines' context length: the longest prompt plus `MAX_NEW_TOKENS` must fit (checked up front)."""


def is_free_form(data: Any) -> bool:
    """Whether a `kvzip_plugin.eval.datasets.Dataset` is answered free-form (scored by `score_text`)."""
    return data.family in FREE_FORM_FAMILIES


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a free-form answer: the tokenizer's EOS and the chat end-of-turn tokens it has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab}
    return sorted(i for i in ids if i is not None)


def prompt_tail(tokenizer: Any, layout: Any, item: Any) -> list[int]:
    """Ids after the compressed span: `"\\n\\n" question` + chat postfix + the answer prefix's ids
    (what `bench_accuracy.answer_ids` takes as the prefix)."""
    from kvzip_plugin.hf.template import encode, question_ids

    prefix = encode(tokenizer, item.answer_prefix) if item.answer_prefix else []
    return question_ids(tokenizer, layout, item.question) + prefix


def cut_answer(tokenizer: Any, tokens: list[int], stop_ids: list[int]) -> tuple[list[int], str]:
    """The answer in greedy `tokens`: up to (not including) the first stop token and up to (including)
    the first token after which the text holds a newline; its text is the part before the newline,
    stripped. Both paths apply it, so an engine that decoded past the stop gives the same answer."""
    stops = set(stop_ids)
    kept: list[int] = []
    for token in tokens:
        if token in stops:
            break
        kept.append(token)
        if "\n" in tokenizer.decode(kept, skip_special_tokens=True):
            break
    return kept, tokenizer.decode(kept, skip_special_tokens=True).split("\n")[0].strip()


def score_answer(tokenizer: Any, question: dict[str, Any], tokens: list[int], stop_ids: list[int]) -> dict[str, Any]:
    """`correct` (exact token match, or free-form the family's EM / string match) plus, free-form, `em`,
    `f1`, `answer`."""
    from kvzip_plugin.eval.metrics import score_text

    if question["mode"] == "exact":
        return {"correct": int(tokens == question["answer"])}
    kept, text = cut_answer(tokenizer, tokens, stop_ids)
    scores = score_text(question["family"], text, question["golds"])
    return {"correct": int(scores["em"]), **scores, "answer": text, "answer_tokens": kept}


def load_samples(dataset: str, max_samples: int | None) -> tuple[Any, tuple[Any, ...]]:
    """(the named set, its first `max_samples` samples)."""
    from kvzip_plugin.eval import datasets as data_sets

    data = data_sets.load(dataset)
    return data, data.samples[:max_samples] if max_samples else data.samples


def prompts(tokenizer: Any, dataset: str, max_samples: int | None = None) -> list[dict[str, Any]]:
    """One record per context: its questions' prompts and, exact match, answer ids; free-form, the golds."""
    from bench_accuracy import answer_ids

    from kvzip_plugin.hf.template import build_layout

    data, samples = load_samples(dataset, max_samples)
    mode = "free" if is_free_form(data) else "exact"
    out = []
    for sample in samples:
        layout = build_layout(tokenizer, sample.context)
        base = list(layout.input_ids)
        questions = []
        for item in sample.items:
            q = {"prompt": base + prompt_tail(tokenizer, layout, item), "text": item.answer, "mode": mode}
            if mode == "exact":
                q["answer"] = answer_ids(tokenizer, item)[1]
            else:
                q["golds"] = list(item.golds)
                q["family"] = data.family
            questions.append(q)
        out.append({"dataset": dataset, "sample": sample.id, "n_prefix": layout.n_prefix,
                    "n_context": layout.n_context, "mode": mode, "questions": questions})
    return out


def parse_configs(specs: list[str] | None, structures: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """`none` first, then `STRUCTURE@RATIO` specs (or every structure x ratio when none are given)."""
    configs = [("none", 1.0)]
    if specs:
        for spec in specs:
            if spec == "none":
                continue
            structure, _, ratio = spec.partition("@")
            if not ratio:
                raise ValueError(f"config {spec!r}: expected STRUCTURE@RATIO or none")
            configs.append((structure, float(ratio)))
    else:
        configs += [(st, r) for st in structures for r in ratios]
    return configs


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
    """Run every context through one vLLM engine; return per-question greedy tokens (scored by the parent)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process: drain jobs
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from kvzip_plugin.integrations.vllm import kv_transfer_config
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if structure != "none":
        kwargs["kv_transfer_config"] = kv_transfer_config(ratio=ratio, min_prefix_tokens=64, min_hits=1,
                                                          **_structure_settings(structure))
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, block_size=BLOCK_SIZE,
              max_model_len=MAX_MODEL_LEN, max_num_seqs=16, enforce_eager=True, seed=0, **kwargs)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    connector = core.scheduler.connector
    doc = json.loads(Path(contexts_file).read_text())
    contexts, stop_ids, max_new_tokens = doc["contexts"], doc["stop_ids"], doc["max_new_tokens"]
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
        if ctx["mode"] == "exact":
            params = [SamplingParams(max_tokens=len(q["answer"]), temperature=0.0, ignore_eos=True) for q in qs]
        else:  # free-form: greedy to a stop token or a newline (`cut_answer` applies the same rule)
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids,
                                     stop=["\n"]) for _ in qs]
        outs = llm.generate([{"prompt_token_ids": q["prompt"]} for q in qs], params, use_tqdm=False)
        for q_idx, out in enumerate(outs):
            tokens = list(out.outputs[0].token_ids)
            results.append({"dataset": ctx["dataset"], "sample": ctx["sample"], "question": q_idx,
                            "tokens": tokens, "reply": out.outputs[0].text,
                            "num_cached_tokens": out.num_cached_tokens})
    compacted = []
    if connector is not None:
        for p in connector.sched.compacted.values():
            compacted.append({"L": p.logical_length, "P": p.physical_length, "head_pages": p.head_pages})
    return {"results": results, "jobs": jobs, "compacted": compacted, "wall_s": time.perf_counter() - t0}


def run_engine(model_dir: str, structure: str, ratio: float, contexts_file: Path) -> dict[str, Any]:
    """One configuration in a fresh child process (`engine_child`)."""
    return run_child([__file__, "--child", model_dir, structure, str(ratio), str(contexts_file)],
                     f"engine run {structure}@{ratio}", timeout=3600)


def common_prefix(prompts: list[list[int]]) -> list[int]:
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return prompts[0][:i]
    return prompts[0][:n]


def run_sglang(model_dir: str, structure: str, ratio: float, contexts: list[dict[str, Any]],
               work_dir: Path, tokenizer_vocab: int, stop_ids: list[int],
               max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Every context through one SGLang server (a subprocess of this one); per-question results."""
    from tests.integrations.sglang import harness, scenarios

    dump = work_dir / f"dump-{structure}-{ratio:g}"
    dump.mkdir(parents=True, exist_ok=True)
    args = ["--dtype", "float32", "--max-total-tokens", "16384", "--context-length", str(MAX_MODEL_LEN),
            "--random-seed", "0",
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
                finished = scenarios.state_after_jobs(dump, len(jobs) + 1, timeout=600)["finished"]
            hits0 = server.metric("sglang:kvzip_compressed_prefix_hits_total")
            if ctx["mode"] == "exact":
                params = [{"temperature": 0.0, "max_new_tokens": len(q["answer"]), "ignore_eos": True} for q in qs]
            else:  # free-form: greedy to a stop token or a newline (`cut_answer` applies the same rule)
                params = [{"temperature": 0.0, "max_new_tokens": max_new_tokens, "stop_token_ids": stop_ids,
                           "stop": ["\n"]} for _ in qs]
            payload = {"input_ids": [q["prompt"] for q in qs], "sampling_params": params}
            outs = server.post("/generate", payload, timeout=1800)
            time.sleep(1.5)  # the metrics are published at most once a second
            hits = server.metric("sglang:kvzip_compressed_prefix_hits_total") - hits0
            jobs.append({"sample": ctx["sample"], "finished": finished, "shared_tokens": len(shared),
                         "questions_on_compacted_prefix": int(hits)})
            for q_idx, out in enumerate(outs):
                tokens = list(out["output_ids"])
                results.append({"dataset": ctx["dataset"], "sample": ctx["sample"], "question": q_idx,
                                "tokens": tokens, "reply": out["text"],
                                "cached_tokens": out["meta_info"]["cached_tokens"]})
        compacted = []
        if structure != "none":
            compacted = [{"L": e["L"], "P": e["P"]} for e in scenarios.read_state(dump, timeout=120)["compacted"]]
    finally:
        server.stop()
    return {"results": results, "jobs": jobs, "compacted": compacted, "wall_s": time.perf_counter() - t0}


# ---- the transformers side ----------------------------------------------------------------------------

def greedy_tokens(model: Any, tokenizer: Any, ctx: Any, tail: list[int], stop_ids: list[int],
                  max_new_tokens: int) -> list[int]:
    """Greedy tokens after `tail` (question ids + answer prefix) on a fresh view of the compressed
    context `ctx`, stopped by the rule of `cut_answer` (stop token, newline) or `max_new_tokens`."""
    import torch

    stops = set(stop_ids)
    with torch.inference_mode():
        cache = ctx.new_cache()
        logits = model(input_ids=torch.tensor([tail], device=model.device), past_key_values=cache,
                       use_cache=True).logits
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in stops or "\n" in tokenizer.decode(out, skip_special_tokens=True):
                break
            logits = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                           use_cache=True).logits
    return out


def transformers_path(model_name: str, configs: list[tuple[str, float]], datasets: list[str],
                      max_samples: int | None = None, done: frozenset[tuple[str, str]] = frozenset(),
                      on_context: Callable[[list[dict[str, Any]]], None] | None = None,
                      deadline: float | None = None) -> list[dict[str, Any]]:
    """Same questions on the transformers reference path (one scoring pass per context): exact token
    match (one teacher-forced forward) or, free-form, greedy decoding (`greedy_tokens`).

    Args:
        done: (dataset, sample) pairs already answered (a resumed run): skipped.
        on_context: called with each context's rows when it is done (the run's checkpoint).
        deadline: `time.perf_counter()` after which no new context starts.
    """
    import torch
    from bench_accuracy import compressed_context as hf_context
    from bench_accuracy import greedy_exact_match, prefill

    from kvzip_plugin import KVzipConfig
    from kvzip_plugin.eviction import plan_eviction
    from kvzip_plugin.hf.compressor import KVzipCompressor
    from kvzip_plugin.hf.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model(model_name)
    stop_ids = stop_token_ids(tokenizer)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig())
    rows = []
    for name in datasets:
        data, samples = load_samples(name, max_samples)
        free = is_free_form(data)
        for sample in samples:
            if (name, sample.id) in done:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                logger.info("time budget spent: transformers path stops before %s %s", name, sample.id)
                break
            t0 = time.perf_counter()
            first_row = len(rows)
            layout = compressor.layout(sample.context)
            full, prefill_s = prefill(compressor, layout)
            scores = compressor.score(layout, full)
            contexts = []
            for structure, ratio in configs:
                if structure == HEAD_LEVEL:
                    continue
                plan = None if structure == "none" else plan_eviction(scores, ratio, structure)
                contexts.append((structure, ratio, hf_context(layout, full, plan, "none" if plan is None else "kvzip",
                                                              prefill_s, 0.0)))
            for structure, ratio, ctx in contexts:
                for q_idx, item in enumerate(sample.items):
                    row = {"path": "transformers", "structure": structure, "ratio": ratio, "dataset": name,
                           "sample": sample.id, "question": q_idx}
                    if free:
                        tokens = greedy_tokens(model, tokenizer, ctx, prompt_tail(tokenizer, layout, item), stop_ids,
                                               MAX_NEW_TOKENS)
                        q = {"mode": "free", "golds": list(item.golds), "family": data.family}
                        row.update(score_answer(tokenizer, q, tokens, stop_ids))
                    else:
                        row["correct"] = int(greedy_exact_match(model, tokenizer, ctx, item))
                    rows.append(row)
            if on_context is not None:
                on_context(rows[first_row:])
            logger.info("transformers %s %s done in %.0f s (load %.1f)", name, sample.id, time.perf_counter() - t0,
                        os.getloadavg()[0])
    return rows


# ---- report -------------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (path, dataset, structure, ratio): accuracy (EM) with its Wilson 95% interval, free-form F1 with
    a bootstrap 95% interval, the paired flips against `none` on the same path, and (engines) the paired
    counts against the transformers path."""
    from kvzip_plugin.eval.metrics import bootstrap_interval, paired_flips, sign_test_p, wilson_interval

    table: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        table.setdefault((r["path"], r["dataset"], r["structure"], r["ratio"]), []).append(r)
    by_q = {(r["path"], r["dataset"], r["structure"], r["ratio"], r["sample"], r["question"]): r for r in rows}
    out = []
    for (path, ds, structure, ratio), recs in sorted(table.items()):
        vals = [r["correct"] for r in recs]
        lo, hi = wilson_interval(sum(vals), len(vals))
        rec: dict[str, Any] = {"engine": path, "dataset": ds, "structure": structure, "ratio": ratio, "n": len(vals),
                               "correct": sum(vals), "accuracy": 100.0 * sum(vals) / len(vals),
                               "accuracy_ci95": [100 * lo, 100 * hi]}
        free = all("f1" in r for r in recs)
        if free:
            f1 = [r["f1"] for r in recs]
            flo, fhi = bootstrap_interval(f1)
            rec.update(f1=100 * sum(f1) / len(f1), f1_ci95=[100 * flo, 100 * fhi])
        keys = [(r["sample"], r["question"]) for r in recs]
        if structure != "none":
            base = [by_q.get((path, ds, "none", 1.0, *k)) for k in keys]
            if all(b is not None for b in base):
                rec["vs_none"] = paired_flips([b["correct"] for b in base], vals)
                if free:
                    rec["vs_none"]["f1_delta"] = 100 * sum(r["f1"] - b["f1"] for r, b in zip(recs, base, strict=True)) \
                        / len(recs)
        if path != "transformers":
            pairs = [(r, by_q.get(("transformers", ds, structure, ratio, *k))) for r, k in zip(recs, keys, strict=True)]
            pairs = [(a, b) for a, b in pairs if b is not None]
            if pairs:
                eo = sum(a["correct"] and not b["correct"] for a, b in pairs)
                to = sum(b["correct"] and not a["correct"] for a, b in pairs)
                vs = {"n": len(pairs), "both": sum(a["correct"] and b["correct"] for a, b in pairs),
                      "engine_only": eo, "transformers_only": to,
                      "neither": sum(not a["correct"] and not b["correct"] for a, b in pairs),
                      "same_correct": sum(a["correct"] == b["correct"] for a, b in pairs), "p": sign_test_p(eo, to)}
                if free:
                    vs["same_answer"] = sum(a["answer"] == b["answer"] for a, b in pairs)
                rec["vs_transformers"] = vs
        out.append(rec)
    return out


def _ci(rec: dict[str, Any], key: str) -> str:
    lo, hi = rec[f"{key}_ci95"]
    return f"{rec[key]:.1f} [{lo:.0f}, {hi:.0f}]"


def _flips(rec: dict[str, Any] | None) -> str:
    if rec is None or "vs_none" not in rec:
        return "-"
    f = rec["vs_none"]
    return f"{f['right_to_wrong']} / {f['wrong_to_right']} (p {f['p']:.2f})"


_STRUCTURE_ORDER = ("none", "pair", "layer_budget", "head", HEAD_LEVEL)


def _row_order(key: tuple) -> tuple:
    """Table order: per data set, `none` first, then by ratio, then pair, layer_budget, head, kvzip_head."""
    _path, ds, structure, ratio = key
    rank = _STRUCTURE_ORDER.index(structure) if structure in _STRUCTURE_ORDER else len(_STRUCTURE_ORDER)
    return (ds, structure != "none", ratio, rank, structure)


def markdown(doc: dict[str, Any]) -> str:
    name = {"vllm": "vLLM", "sglang": "SGLang"}[doc["meta"].get("engine", "vllm")]
    rows = {(r["engine"], r["dataset"], r["structure"], r["ratio"]): r for r in doc["summary"]}
    exact = [k for k in sorted(rows, key=_row_order) if k[0] != "transformers" and "f1" not in rows[k]]
    free = [k for k in sorted(rows, key=_row_order) if k[0] != "transformers" and "f1" in rows[k]]
    lines: list[str] = []
    if exact:
        lines += [f"| data set | structure | ratio | {name} engine | transformers | "
                  "engine-only / transformers-only right |", "|---|---|---|---|---|---|"]
        for path, ds, structure, ratio in exact:
            r, t = rows[(path, ds, structure, ratio)], rows.get(("transformers", ds, structure, ratio))
            vs = r.get("vs_transformers", {})
            lines.append(f"| {ds} | {structure} | {ratio:g} | {r['correct']}/{r['n']} ({r['accuracy']:.1f}) | "
                         + (f"{t['correct']}/{t['n']} ({t['accuracy']:.1f})" if t else "-")
                         + f" | {vs.get('engine_only', '-')} / {vs.get('transformers_only', '-')} |")
    if free:
        if lines:
            lines.append("")
        lines += [f"| data set | structure | ratio | {name} EM [95% CI] | {name} F1 [95% CI] | transformers EM "
                  f"[95% CI] | transformers F1 [95% CI] | {name} flips vs none: right->wrong / wrong->right (p) | "
                  f"transformers flips vs none | {name} vs transformers: same EM / same answer (n) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for path, ds, structure, ratio in free:
            r, t = rows[(path, ds, structure, ratio)], rows.get(("transformers", ds, structure, ratio))
            vs = r.get("vs_transformers")
            lines.append(f"| {ds} | {structure} | {ratio:g} | {_ci(r, 'accuracy')} | {_ci(r, 'f1')} | "
                         + (f"{_ci(t, 'accuracy')} | {_ci(t, 'f1')}" if t else "- | -")
                         + f" | {_flips(r)} | {_flips(t)} | "
                         + (f"{vs['same_correct']} / {vs['same_answer']} ({vs['n']})" if vs else "-") + " |")
    return "\n".join(lines) + "\n"


def model_note(name: str) -> str:
    """The model's name as the meta block records it (with what its weights are)."""
    from kvzip_plugin.hf.evidence_models import EVIDENCE_MODELS
    from kvzip_plugin.hf.models import DEMO_MODEL

    if name == DEMO_MODEL:
        return DEMO_MODEL + " (SmolLM2-135M-Instruct, de-quantised from Q4_1 GGUF)"
    if name in EVIDENCE_MODELS:
        m = EVIDENCE_MODELS[name]
        return f"{name} ({m.arch}; float32 weights de-quantised from the {m.quant} GGUF of {m.describe()})"
    return name


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _, model_dir, structure, ratio, contexts_file = argv
        print("RESULT " + json.dumps(engine_child(model_dir, structure, float(ratio), contexts_file)), flush=True)
        return 0
    from kvzip_plugin.hf.models import DEMO_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--model", default=DEMO_MODEL,
                        help=f"{DEMO_MODEL} (default), an evidence model name, or a model folder")
    parser.add_argument("--structures", nargs="+", default=list(DEFAULT_STRUCTURES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--configs", nargs="+", default=None,
                        help="STRUCTURE@RATIO list (none is always run); replaces --structures x --ratios")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--max-samples", type=int, default=None, help="first N contexts of each data set")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="no engine configuration or transformers context starts after this many seconds; "
                             "the report covers what finished and says what was left out")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished work in OUT.partial.json (written as the run goes) of the same run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    from kvzip_plugin.eval import datasets as data_sets
    from kvzip_plugin.hf.models import model_dir as resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = stop_token_ids(tokenizer)
    configs = parse_configs(args.configs, args.structures, args.ratios)
    contexts = [c for ds in args.datasets for c in prompts(tokenizer, ds, args.max_samples)]
    longest = max(len(q["prompt"]) for c in contexts for q in c["questions"]) + MAX_NEW_TOKENS
    if longest > MAX_MODEL_LEN:
        parser.error(f"a prompt plus its answer takes {longest} tokens, over the engines' {MAX_MODEL_LEN}")
    questions = {(c["dataset"], c["sample"], i): q for c in contexts for i, q in enumerate(c["questions"])}
    contexts_file = args.out.with_suffix(".contexts.tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contexts_file.write_text(json.dumps({"contexts": contexts, "stop_ids": stop_ids, "max_new_tokens": MAX_NEW_TOKENS}))
    load_start = os.getloadavg()
    load_samples_1m: list[float] = []  # the 1-minute load average every 30 s: the CPU may be shared
    stop_sampling = threading.Event()

    def sample_load() -> None:
        while not stop_sampling.wait(30.0):
            load_samples_1m.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    t0 = time.perf_counter()
    deadline = None if args.time_budget_s is None else t0 + args.time_budget_s
    rows: list[dict[str, Any]] = []
    engine_runs: list[dict[str, Any]] = []
    partial = args.out.with_suffix(".partial.json")
    run_key = {"model": args.model, "engine": args.engine, "datasets": args.datasets, "max_samples": args.max_samples,
               "configs": [list(c) for c in configs]}
    if args.resume and partial.is_file():
        saved = json.loads(partial.read_text())
        if saved["run"] != run_key:
            parser.error(f"{partial} is of another run: {saved['run']}")
        rows, engine_runs = saved["rows"], saved["engine_runs"]
        logger.info("resumed %d rows, %d engine configurations from %s", len(rows), len(engine_runs), partial)

    def checkpoint() -> None:
        partial.write_text(json.dumps({"run": run_key, "rows": rows, "engine_runs": engine_runs}))

    done_configs = {(r["structure"], r["ratio"]) for r in engine_runs}
    left_out: list[str] = []
    work_dir = Path(tempfile.mkdtemp(prefix="kvzip-engine-accuracy-"))  # server logs and state dumps
    logger.info("model %s (%s); %d contexts, %d questions, configs %s; logs in %s", args.model, model_dir,
                len(contexts), len(questions), configs, work_dir)
    for structure, ratio in configs:
        if (structure, ratio) in done_configs:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            left_out.append(f"{args.engine} {structure}@{ratio:g}")
            continue
        t = time.perf_counter()
        if args.engine == "vllm":
            res = run_engine(model_dir, structure, ratio, contexts_file)
        else:
            res = run_sglang(model_dir, structure, ratio, contexts, work_dir, len(tokenizer), stop_ids)
        for r in res["results"]:
            q = questions[(r["dataset"], r["sample"], r["question"])]
            rows.append({"path": args.engine, "structure": structure, "ratio": ratio, **r,
                         **score_answer(tokenizer, q, r["tokens"], stop_ids)})
        got = [x["correct"] for x in rows[-len(res["results"]):]] if res["results"] else []
        engine_runs.append({"structure": structure, "ratio": ratio, "jobs": res["jobs"], "compacted": res["compacted"],
                            "wall_s": res["wall_s"], "run_s": time.perf_counter() - t,
                            "load_average_at_end": os.getloadavg()})
        checkpoint()
        logger.info("%s %s@%g: %.1f%% in %.0f s (load %.1f)", args.engine, structure, ratio,
                    100 * sum(got) / max(1, len(got)), time.perf_counter() - t, os.getloadavg()[0])
    t_engine = time.perf_counter() - t0
    if not args.skip_transformers:
        done = frozenset((r["dataset"], r["sample"]) for r in rows if r["path"] == "transformers")

        def on_context(ctx_rows: list[dict[str, Any]]) -> None:
            rows.extend(ctx_rows)
            checkpoint()

        transformers_path(args.model, configs, args.datasets, args.max_samples, done, on_context, deadline)
        answered = {(r["dataset"], r["sample"]) for r in rows if r["path"] == "transformers"}
        left_out += [f"transformers {c['dataset']} {c['sample']}" for c in contexts
                     if (c["dataset"], c["sample"]) not in answered]
    contexts_file.unlink()
    stop_sampling.set()
    from importlib.metadata import version

    import torch
    import transformers

    from kvzip_plugin.eval.metrics import ANSWER_METRICS

    described = [data_sets.load(ds).describe() for ds in args.datasets]
    engine_version = version("sglang") if args.engine == "sglang" else __import__("vllm").__version__
    doc = {
        "meta": {"command": "PYTHONPATH=. python benchmarks/bench_engine_accuracy.py " + " ".join(argv),
                 "engine": args.engine,
                 "model": model_note(args.model), "model_dir": model_dir,
                 "datasets": described,
                 "max_samples": args.max_samples, "configs": [list(c) for c in configs],
                 "answers": ({"mode": "free-form greedy", "metrics": {
                                  ds["family"]: ANSWER_METRICS[ds["family"]] for ds in described
                                  if ds["family"] in ANSWER_METRICS},
                              "max_new_tokens": MAX_NEW_TOKENS, "stop_token_ids": stop_ids, "stop": "first newline"}
                             if any(c["mode"] == "free" for c in contexts) else {"mode": "exact token match"}),
                 "commit": git_commit(), "versions": {args.engine: engine_version, "torch": torch.__version__,
                                                      "transformers": transformers.__version__},
                 "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                              "load_1m_every_30s": {"mean": sum(load_samples_1m) / max(1, len(load_samples_1m)),
                                                    "max": max(load_samples_1m, default=0.0),
                                                    "samples": load_samples_1m}},
                 "block_size": BLOCK_SIZE if args.engine == "vllm" else 1,
                 "trigger": {"min_prefix_tokens": 64, "min_hits": 1},
                 "engine_wall_s": t_engine, "wall_s": time.perf_counter() - t0,
                 "time_budget_s": args.time_budget_s, "left_out": left_out, "resumed": bool(args.resume)},
        "contexts": [{k: c[k] for k in ("dataset", "sample", "n_prefix", "n_context")} for c in contexts],
        "engine_runs": engine_runs, "questions": rows,
    }
    doc["summary"] = summarize(rows)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    partial.unlink(missing_ok=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
