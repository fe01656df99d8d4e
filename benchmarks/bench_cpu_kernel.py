# SPDX-License-Identifier: Apache-2.0
"""Decode attention of B requests on one compacted prefix through vLLM's CPU kernel, every layer of a step,
outside the engine: `full` and `head` as vLLM reads them, `pair` (head pages) as the plugin reads them.

The engine benchmark (`bench_engine_decode.py`) times whole steps, whose other work (the model's GEMMs,
sampling, scheduling) and run-to-run drift hide differences of a few milliseconds in attention. Here only the
attention of the step's layers is timed, all configurations in one process, round-robin, on one pool laid out
as vLLM's CPU backend lays it (`[num_blocks, H_kv, block_size, 2 * D]` per layer, every layer in one
allocation), with random keys and values:

* `full`: vLLM's kernel, each request over the whole L-token prefix + its own tokens (what `none` runs);
* `head`: the same over `K` kept tokens per KV head in whole blocks (`head` at the kept fraction of the `pair`
  plan, rounded to blocks);
* `pair/kernel`: the plugin's path for rows on a head-page store (`integrations/vllm/cpu_kernel.py`):
  the step's plan (`KernelStep.plan`, once per step), then `KernelStep.attend`, one call of vLLM's kernel per
  layer over the runs' head pages (vLLM's own forward is skipped: every row of the step is on the store);
* `pair/cascade`: the same with `cpu_cascade.CascadeGroup` (each run read once for every request).

The `pair` run lengths come from `--layout` (a JSON `{"lengths": [[...] per layer], "page": P}`; the
default one is the real plan of the engine for SmolLM2-135M at 7,680 tokens, ratio 0.3,
`results/pair-layout-smollm2-7680.json`). Each configuration's outputs are checked against the others' where
they must agree (`head` vs `pair` cannot: different kept pairs).

    PYTHONPATH=. python benchmarks/bench_cpu_kernel.py --out benchmarks/results/cpu-kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import vllm_cpu_meta  # noqa: E402

from kvzip_plugin.paged_store import PagedStore  # noqa: E402
from kvzip_plugin.store import place_runs  # noqa: E402

DEFAULT_LAYOUT = Path(__file__).resolve().parent / "results" / "pair-layout-smollm2-7680.json"


def vllm_call(q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              qsl: torch.Tensor, seq_lens: torch.Tensor, table: torch.Tensor, meta: torch.Tensor, scale: float) -> None:
    """One call of vLLM's CPU kernel, as its backend makes it (`cpu_attn.py`)."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                                    query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True,
                                    alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                                    scheduler_metadata=meta, s_aux=None)


def metadata(n_heads: int, n_kv: int, d: int, seq_lens: torch.Tensor, qsl: torch.Tensor) -> torch.Tensor:
    from vllm import _custom_ops as ops
    from vllm import envs as vllm_envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(), num_heads=n_heads, num_kv_heads=n_kv, head_dim=d, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=bool(vllm_envs.VLLM_CPU_ATTN_SPLIT_KV))


def run_batch(b: int, pool: dict, args: argparse.Namespace) -> dict:
    """Time every configuration for `b` requests (round-robin over `args.repeats`); a result row."""
    from kvzip_plugin.integrations.vllm.cpu_cascade import CascadeGroup
    from kvzip_plugin.integrations.vllm.cpu_kernel import KernelStep

    h, g, d, bs, n_layers = pool["h"], args.q_per_kv, args.head_dim, pool["bs"], pool["layers"]
    store, flat, kv, scale = pool["store"], pool["flat"], pool["kv"], d ** -0.5
    cpu = torch.device("cpu")
    q = torch.randn(b, h * g, d)
    qsl = torch.arange(b + 1, dtype=torch.int32)
    own_blocks = -(-args.own // bs)
    own_tab = (pool["own0"] + torch.arange(b * own_blocks).view(b, own_blocks)).to(torch.int32)

    def plain(first: int, n: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        table = torch.cat([(first + torch.arange(n, dtype=torch.int32)).expand(b, n), own_tab], 1).contiguous()
        lens = torch.full((b,), n_tokens + args.own, dtype=torch.int32)
        return table, lens, metadata(h * g, h, d, lens, qsl)

    tables = {"full": plain(pool["full0"], pool["full_blocks"], pool["L"]),
              "head": plain(pool["head0"], pool["head_blocks"], pool["head_blocks"] * bs)}
    # the plugin's rows: the store's blocks head each row's table, its own blocks follow (`runner.py`)
    store_t = torch.cat([torch.arange(store.layout.n_blocks, dtype=torch.int32).expand(b, -1), own_tab],
                        1).contiguous()
    planners = {"pair/kernel": lambda: KernelStep.plan([(store, [(i, i + 1, args.own, i) for i in range(b)])],
                                                       store_t, flat, cpu),
                "pair/cascade": lambda: CascadeGroup.plan(store, [(i, args.own, i) for i in range(b)], store_t,
                                                          flat, cpu)}
    outs = {c: torch.empty_like(q) for c in args.configs}

    def step(config: str) -> None:
        out = outs[config]
        if config in tables:  # what vLLM's backend does: metadata once per step, one call per layer
            table, lens, meta = tables[config]
            for layer in range(n_layers):
                vllm_call(q, out, *kv[layer], qsl, lens, table, meta, scale)
            return
        reader = planners[config]()  # once per step, as the worker does
        for layer in range(n_layers):
            reader.attend(layer, q, out, flat, scale)

    times: dict[str, list[float]] = {c: [] for c in args.configs}
    for c in args.configs:
        step(c)  # warm-up (and the store's kept tables)
    for _ in range(args.repeats):  # round-robin: drift of the machine spreads over every configuration
        for c in args.configs:
            t = time.perf_counter()
            step(c)
            times[c].append(time.perf_counter() - t)
    if "pair/kernel" in outs and "pair/cascade" in outs:  # one softmax over the same pairs, two paths
        torch.testing.assert_close(outs["pair/cascade"], outs["pair/kernel"], rtol=1e-4, atol=1e-4)
    row = {"batch": b, **{f"{c}_ms": 1000 * statistics.median(times[c]) for c in args.configs}}
    for c in args.configs:
        for base in ("full", "head"):
            if c != base and base in args.configs and not (base == "head" and c == "full"):
                row[f"{c}_vs_{base}"] = row[f"{c}_ms"] / row[f"{base}_ms"]
    return row


def main() -> None:
    from kvzip_plugin.integrations.vllm.cpu_kernel import FlatPages

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT)
    p.add_argument("--q-per-kv", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--own", type=int, default=24, help="tokens of each request after the prefix")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--configs", nargs="+", default=["full", "head", "pair/kernel", "pair/cascade"],
                   choices=["full", "head", "pair/kernel", "pair/cascade"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    spec = json.loads(args.layout.read_text())
    lengths = torch.tensor(spec["lengths"], dtype=torch.long)  # [layers, H_kv]
    bs, big_l = int(spec["page"]), int(spec["L"])
    n_layers, h = lengths.shape
    d = args.head_dim
    layout = place_runs(lengths, bs)
    kept = int(lengths.sum()) / (n_layers * h)  # mean kept tokens per (layer, KV head)
    head_blocks = max(1, round(kept / bs))
    full_blocks = -(-big_l // bs)
    # the pool: [store blocks][head blocks][full blocks][own blocks of every request]
    head0 = layout.n_blocks
    full0 = head0 + head_blocks
    own0 = full0 + full_blocks
    n_blocks = own0 + max(args.batches) * -(-args.own // bs)
    torch.manual_seed(0)
    raw = torch.randn(n_layers, n_blocks, h, bs, 2 * d)  # one allocation, every layer a constant stride apart
    caches = [raw[i] for i in range(n_layers)]
    flat = FlatPages.of(caches, h, bs, d)
    assert flat is not None
    pool = {"h": h, "bs": bs, "layers": n_layers, "L": big_l, "store": PagedStore.build(layout, range(layout.n_blocks)),
            "flat": flat, "kv": [c.view(n_blocks, h, 2 * bs, d).chunk(2, dim=2) for c in caches],  # vLLM's split
            "head0": head0, "head_blocks": head_blocks, "full0": full0, "full_blocks": full_blocks, "own0": own0}
    rows = []
    for b in args.batches:
        row = run_batch(b, pool, args)
        rows.append(row)
        print(f"B={b}: " + ", ".join(f"{c} {row[f'{c}_ms']:.2f} ms" for c in args.configs), flush=True)
    meta = {**vllm_cpu_meta("PYTHONPATH=. python benchmarks/bench_cpu_kernel.py " + " ".join(sys.argv[1:]),
                            f"none: random keys and values in {args.layout.name}'s layout", time.perf_counter() - t0),
            "threads": torch.get_num_threads(), "layout": str(args.layout), "L": big_l, "page": bs,
            "layers": n_layers, "kv_heads": h, "q_per_kv": args.q_per_kv, "head_dim": d, "own": args.own,
            "repeats": args.repeats, "kept_per_head_mean": kept, "head_blocks": head_blocks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"Attention of one decode step (all {n_layers} layers, plan included, median of {args.repeats}, "
             f"round-robin), vLLM's CPU kernel, L = {big_l}, `pair` layout `{args.layout.name}` (mean {kept:.0f} kept "
             f"per KV head; `head` keeps {head_blocks * bs}), {h} KV heads x {args.q_per_kv}, D {d}, {args.own} own "
             f"tokens, {meta['threads']} threads. Cells: ms (/ full; / head).", "",
             "| B | " + " | ".join(args.configs) + " |", "|---|" + "---|" * len(args.configs)]
    for r in rows:
        cells = []
        for c in args.configs:
            ratios = [f"{r[k]:.2f}" for k in (f"{c}_vs_full", f"{c}_vs_head") if k in r]
            cells.append(f"{r[f'{c}_ms']:.1f}" + (f" ({'; '.join(ratios)})" if ratios else ""))
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
