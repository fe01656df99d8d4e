# SPDX-License-Identifier: Apache-2.0
"""Decode-attention time vs the fraction of KV kept, compressed / full, measured side by side.

One decode step's attention (one query per sequence, GQA folded so each KV head is read once) over
a full cache of T tokens and over `head`-structured compacted caches of r*T tokens (what KVzip's
uniform structure stores), for several T, batch sizes and ratios. Runs on CPU, and on CUDA when
available (`--device cuda`). Writes a JSON and a Markdown table next to it.

    PYTHONPATH=. python benchmarks/bench_decode_attention.py --out benchmarks/results/decode-attention-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q `[B, H_kv, G, D]` (the G query heads of a KV head folded as query rows), k/v `[B, H_kv, T, D]`."""
    return F.scaled_dot_product_attention(q, k, v)


def time_it(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    g = args.q_heads // args.kv_heads
    rows = []
    for t_full in args.contexts:
        for b in args.batches:
            q = torch.randn(b, args.kv_heads, g, args.head_dim, device=args.device, dtype=dtype)
            k = torch.randn(b, args.kv_heads, t_full, args.head_dim, device=args.device, dtype=dtype)
            v = torch.randn_like(k)
            full = time_it(lambda: attention_step(q, k, v), args.device, args.repeats)
            for r in args.ratios:
                kept = max(1, int(r * t_full))
                # a head-structured compacted cache: each head its own kept tokens, same count
                idx = torch.stack([torch.randperm(t_full, device=args.device)[:kept].sort().values
                                   for _ in range(args.kv_heads)])
                gather = idx[None, :, :, None].expand(b, args.kv_heads, kept, args.head_dim)
                kc, vc = torch.gather(k, 2, gather).contiguous(), torch.gather(v, 2, gather).contiguous()
                comp = time_it(lambda: attention_step(q, kc, vc), args.device, args.repeats)
                rows.append({"context": t_full, "batch": b, "ratio": r, "full_ms": 1000 * full,
                             "compressed_ms": 1000 * comp, "time_ratio": comp / full})
                print(f"T={t_full:6d} B={b:2d} r={r:.1f}: full {1000 * full:8.3f} ms, "
                      f"compressed {1000 * comp:8.3f} ms, ratio {comp / full:.2f}", flush=True)
    meta = {"device": args.device, "dtype": str(dtype), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "shapes": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
            "command": "python benchmarks/bench_decode_attention.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "out") + f" --out {args.out}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"Decode attention, compressed / full time (median of {args.repeats}), {meta['device']} "
             f"{meta['gpu'] or meta['cpu']}, {meta['dtype']}, {args.q_heads} q / {args.kv_heads} KV heads, "
             f"head_dim {args.head_dim}, torch {meta['torch']} ({meta['threads']} threads).", "",
             "| context | batch | full ms | " + " | ".join(f"r={r}" for r in args.ratios) + " |",
             "|---|---|---|" + "---|" * len(args.ratios)]
    for t_full in args.contexts:
        for b in args.batches:
            sel = [x for x in rows if x["context"] == t_full and x["batch"] == b]
            lines.append(f"| {t_full} | {b} | {sel[0]['full_ms']:.3f} | "
                         + " | ".join(f"{x['time_ratio']:.2f}" for x in sel) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
