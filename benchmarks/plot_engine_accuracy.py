# SPDX-License-Identifier: Apache-2.0
"""Plot what `bench_engine_accuracy.py` measured: per data set, each (structure, ratio) answered
through the engine beside the transformers path, with 95% intervals.

Reads one or more result JSONs (any engine, model and data sets: their `summary` rows), and draws one
panel per (model, data set): a bar per path (`vllm`, `sglang`, `transformers`) for every
configuration, `none` first; the bar is the accuracy (SQuAD / HotpotQA exact match, RULER string
match) with its Wilson 95% interval, and a dot marks the F1 where the set has one. The full-cache
accuracy of the engine is drawn as a dashed line, so a compressed configuration is read against it.

    PYTHONPATH=. python benchmarks/plot_engine_accuracy.py benchmarks/results/engine-accuracy-squad-qwen0.5b.json \
        benchmarks/results/engine-accuracy-hotpotqa-ruler-qwen0.5b.json \
        --out benchmarks/results/engine-accuracy-qwen0.5b.png

Needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PATH_STYLE = {"vllm": ("C0", "vLLM"), "sglang": ("C2", "SGLang"), "transformers": ("C7", "transformers")}
_STRUCTURE_ORDER = ("none", "pair", "layer_budget", "head", "kvzip_head")


def panels(docs: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """`(model, data set)` -> the summary rows of every document on it (each row's `engine` names its path;
    a transformers row measured by several documents is kept once)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for doc in docs:
        model = doc["meta"]["model"].split(" (")[0]
        for row in doc["summary"]:
            rows = out.setdefault((model, row["dataset"]), [])
            key = (row["engine"], row["structure"], row["ratio"])
            if all((r["engine"], r["structure"], r["ratio"]) != key for r in rows):
                rows.append(row)
    return out


def config_order(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The configurations of a panel: `none` first, then by ratio, then pair, layer_budget, head."""
    configs = {(r["structure"], r["ratio"]) for r in rows}

    def rank(c: tuple[str, float]) -> tuple:
        s = _STRUCTURE_ORDER.index(c[0]) if c[0] in _STRUCTURE_ORDER else len(_STRUCTURE_ORDER)
        return (c[0] != "none", c[1], s, c[0])

    return sorted(configs, key=rank)


def plot(docs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    from kvzip_plugin.eval.metrics import wilson_interval

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(docs)
    ncol = min(3, len(groups))
    nrow = (len(groups) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol, 4.4 * nrow), squeeze=False)
    for ax, ((model, ds), rows) in zip(axes.flat, sorted(groups.items()), strict=False):
        configs = config_order(rows)
        paths = [p for p in _PATH_STYLE if any(r["engine"] == p for r in rows)]
        width = 0.8 / len(paths)
        by = {(r["engine"], r["structure"], r["ratio"]): r for r in rows}
        for j, path in enumerate(paths):
            color, label = _PATH_STYLE[path]
            for i, (structure, ratio) in enumerate(configs):
                r = by.get((path, structure, ratio))
                if r is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                lo, hi = r.get("accuracy_ci95") or [100 * b for b in wilson_interval(r["correct"], r["n"])]
                ax.bar(x, r["accuracy"], width * 0.92, color=color, label=label if i == 0 else None,
                       yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], capsize=2, error_kw={"lw": 0.8})
                if "f1" in r and r["f1"] != r["accuracy"]:
                    ax.plot(x, r["f1"], "k.", ms=6, label="F1" if (i, j) == (0, 0) else None)
        base = next((r for r in rows if r["structure"] == "none" and r["engine"] != "transformers"), None)
        if base is not None:
            ax.axhline(base["accuracy"], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(["none" if s == "none" else f"{s}\n@{r:g}" for s, r in configs], fontsize=8)
        n = max(r["n"] for r in rows)
        ax.set_title(f"{model}\n{ds} ({n} questions)", fontsize=9)
        ax.set_ylabel("accuracy (%), 95% CI")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("answers on a compressed prefix: engine vs transformers path (dashed: engine, full cache)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench_engine_accuracy.py result JSONs")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in args.results]
    bad = [str(p) for p, d in zip(args.results, docs, strict=True) if "summary" not in d]
    if bad:
        parser.error(f"not bench_engine_accuracy.py results (no summary): {', '.join(bad)}")
    print(plot(docs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
