# SPDX-License-Identifier: Apache-2.0
"""Decode ms/token vs the fraction of KV kept, and the scoring pass's cost relative to prefill.

For each context length: prefill once (timed), run each scorer once (timed; ratio to prefill),
then for every structure and ratio compact the cache and time `--steps` greedy decode steps on a
fresh view. Each compressed configuration is timed right after a full-cache run, in `--repeats`
rounds; its ratio to the full cache is the median of those paired ratios, so slow drifts of the
machine's load cancel.

Run (CPU, offline demo model; ~10 min on 2 cores):

    PYTHONPATH=. python benchmarks/bench_speed.py --out benchmarks/results/speed-smollm2.json

Writes the JSON, `<out>.md` and `<out>.png` next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_accuracy import (  # noqa: E402
    METHODS,
    RESULTS_DIR,
    compressed_context,
    compute_scores,
    make_plan,
    prefill,
    run_meta,
    write_json,
)

from kvzip_plugin import KVzipConfig  # noqa: E402
from kvzip_plugin.eval import datasets as data_sets  # noqa: E402
from kvzip_plugin.hf.compressor import CompressedContext, KVzipCompressor  # noqa: E402
from kvzip_plugin.hf.models import load_model  # noqa: E402
from kvzip_plugin.hf.template import question_ids  # noqa: E402

logger = logging.getLogger("bench_speed")

DEFAULT_LENGTHS = (500, 2000, 4000)
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
TOKENS_PER_FILLER = 12.5  # demo-model tokens per filler sentence (measured)


@torch.inference_mode()
def time_decode(model: Any, ctx: CompressedContext, prompt: list[int], steps: int) -> float:
    """Mean ms per decode step: the prompt runs first (not timed), then `steps` greedy steps."""
    cache = ctx.new_cache()
    logits = model(input_ids=torch.tensor([prompt], device=model.device), past_key_values=cache, use_cache=True).logits
    token = int(logits[0, -1].argmax())
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                       use_cache=True).logits
        token = int(logits[0, -1].argmax())
    return 1000 * (time.perf_counter() - t0) / steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=args.chunk_size))
    doc: dict[str, Any] = {"meta": run_meta(args, args.model), "contexts": [], "decode": []}
    for length in args.lengths:
        data = data_sets.needles_in_filler(1, n_filler=max(8, round(length / TOKENS_PER_FILLER)), n_needles=4,
                                           seed=0, name=f"speed-{length}")
        sample = data.samples[0]
        layout = compressor.layout(sample.context)
        prompt = question_ids(tokenizer, layout, sample.items[0].question)
        prefill_runs = []
        for _ in range(args.prefill_repeats):
            full, seconds = prefill(compressor, layout)
            prefill_runs.append(seconds)
        prefill_s = statistics.median(prefill_runs)
        scoring_s = {}
        scores = {}
        for scorer in args.scorers:
            scores[scorer], scoring_s[scorer] = compute_scores(compressor, layout, full, scorer, prompt)
        doc["contexts"].append({"length_asked": length, "n_context": layout.n_context, "n_prefix": layout.n_prefix,
                                "data": data.describe(), "prefill_s": prefill_s, "prefill_runs": prefill_runs,
                                "scoring_s": scoring_s,
                                "scoring_over_prefill": {k: v / prefill_s for k, v in scoring_s.items()}})
        logger.info("%d tokens: prefill %.2f s, scoring %s", layout.n_context, prefill_s,
                    {k: round(v, 2) for k, v in scoring_s.items()})
        configs: list[tuple[str, float, CompressedContext]] = [
            ("full", 1.0, compressed_context(layout, full, None, "none", prefill_s, 0.0))]
        for name in args.methods:
            method = METHODS[name]
            for ratio in args.ratios:
                plan = make_plan(compressor, method, scores.get(method.scorer), layout, full, ratio)
                configs.append((name, ratio, compressed_context(layout, full, None if plan.is_identity else plan,
                                                                method.scorer, prefill_s, 0.0)))
        # each configuration is timed right after its own full-cache run, round after round: the
        # ratio of the pair cancels slow drifts of the machine's load
        times: dict[int, list[float]] = {i: [] for i in range(1, len(configs))}
        full_times: dict[int, list[float]] = {i: [] for i in range(1, len(configs))}
        time_decode(model, configs[0][2], prompt, 4)  # warm-up
        for _ in range(args.repeats):
            for i in range(1, len(configs)):
                full_times[i].append(time_decode(model, configs[0][2], prompt, args.steps))
                times[i].append(time_decode(model, configs[i][2], prompt, args.steps))
        all_full = [t for ts in full_times.values() for t in ts]
        full_ms = statistics.median(all_full)
        full_bytes = configs[0][2].stats.full_kv_bytes
        doc["decode"].append({
            "n_context": layout.n_context, "method": "full", "ratio": 1.0, "achieved_ratio": 1.0,
            "kv_kept_bytes": full_bytes, "kv_stored_bytes": full_bytes, "kv_full_bytes": full_bytes,
            "kv_stored_fraction": 1.0, "decode_ms_per_token": full_ms, "decode_runs_ms": all_full,
            "decode_vs_full": 1.0,
        })
        for i in range(1, len(configs)):
            name, ratio, ctx = configs[i]
            doc["decode"].append({
                "n_context": layout.n_context, "method": name, "ratio": ratio,
                "achieved_ratio": ctx.stats.achieved_ratio, "kv_kept_bytes": ctx.stats.kept_kv_bytes,
                "kv_stored_bytes": ctx.stats.stored_kv_bytes, "kv_full_bytes": full_bytes,
                "kv_stored_fraction": ctx.stats.stored_kv_bytes / full_bytes,
                "decode_ms_per_token": statistics.median(times[i]), "decode_runs_ms": times[i],
                "full_runs_ms": full_times[i],
                "decode_vs_full": statistics.median(t / f for t, f in zip(times[i], full_times[i], strict=True)),
            })
        logger.info("%d tokens: decode full %.1f ms/token; %s", layout.n_context, full_ms,
                    ", ".join(f"{d['method']}@{d['ratio']:g}={d['decode_vs_full']:.2f}" for d in doc["decode"]
                              if d["n_context"] == layout.n_context and d["method"] != "full"))
    doc["meta"]["wall_s"] = time.perf_counter() - t_start
    return doc


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    ratios = sorted({d["ratio"] for d in doc["decode"] if d["method"] != "full"})
    out = [f"Model: {meta['model']} ({meta['model_note']}). CPU: {meta['hardware']['cpu']}, "
           f"{meta['hardware']['torch_threads']} torch thread(s), batch 1. "
           f"Run wall time {meta['wall_s'] / 60:.1f} min.",
           f"Command: `{meta['command']}`", "",
           "Decode ms/token relative to the full cache (median over rounds of the ratio to a full-cache run timed "
           "just before):", "",
           "| context tokens | full ms/token | method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
           "|---|---|---|" + "---|" * len(ratios)]
    for c in doc["contexts"]:
        n = c["n_context"]
        rows = [d for d in doc["decode"] if d["n_context"] == n]
        full = next(d for d in rows if d["method"] == "full")
        for m in sorted({d["method"] for d in rows if d["method"] != "full"}):
            cells = []
            for r in ratios:
                d = next((d for d in rows if d["method"] == m and d["ratio"] == r), None)
                cells.append("-" if d is None else f"{d['decode_vs_full']:.2f} ({d['kv_stored_fraction']:.2f})")
            out.append(f"| {n} | {full['decode_ms_per_token']:.1f} | {m} | " + " | ".join(cells) + " |")
    out += ["", "Cells: decode time ratio (stored KV bytes / full KV bytes, prefix included).", "",
            "Scoring pass time / prefill time:", ""]
    scorers = sorted({s for c in doc["contexts"] for s in c["scoring_s"]})
    out.append("| context tokens | prefill s | " + " | ".join(scorers) + " |")
    out.append("|---|---|" + "---|" * len(scorers))
    for c in doc["contexts"]:
        out.append(f"| {c['n_context']} | {c['prefill_s']:.2f} | "
                   + " | ".join(f"{c['scoring_over_prefill'][s]:.2f}" for s in scorers) + " |")
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.3))
    for j, c in enumerate(doc["contexts"]):
        n = c["n_context"]
        for k, m in enumerate(sorted({d["method"] for d in doc["decode"] if d["method"] != "full"})):
            pts = sorted((d["kv_stored_fraction"], d["decode_vs_full"]) for d in doc["decode"]
                         if d["n_context"] == n and d["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^v"[k % 4], color=f"C{j}",
                    ls=["-", "--", ":", "-."][k % 4], label=f"{m}, {n} tokens")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("stored KV / full KV (prefix included)")
    ax.set_ylabel("decode ms/token, relative to full")
    ax.set_title("decode time vs KV kept (batch 1, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    scorers = sorted({s for c in doc["contexts"] for s in c["scoring_s"]})
    width = 0.8 / max(len(doc["contexts"]), 1)
    for j, c in enumerate(doc["contexts"]):
        bx.bar([i + j * width for i in range(len(scorers))], [c["scoring_over_prefill"][s] for s in scorers],
               width=width, color=f"C{j}", label=f"{c['n_context']} tokens")
    bx.set_xticks([i + width * (len(doc["contexts"]) - 1) / 2 for i in range(len(scorers))], scorers)
    bx.set_ylabel("scoring time / prefill time")
    bx.set_title("scoring pass cost")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    fig.suptitle(f"{doc['meta']['model']}: speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS), help="context tokens (approx.)")
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument("--methods", nargs="+", default=["kvzip-head", "kvzip-pair"], choices=list(METHODS),
                   help="methods whose caches are timed (decode speed depends on the structure, not the scorer)")
    p.add_argument("--scorers", nargs="+", default=["kvzip", "snapkv", "h2o"],
                   help="scorers whose cost is timed against prefill")
    p.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurement rounds")
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "speed.json")
    p.add_argument("--replot", action="store_true", help="only re-make the table and plot from --out")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.replot:
        doc = json.loads(args.out.read_text())
    else:
        doc = run(args)
        write_json(args.out, doc)
    stem = args.out.with_suffix("")
    md = markdown(doc)
    stem.with_suffix(".md").write_text(md)
    plot(doc, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
