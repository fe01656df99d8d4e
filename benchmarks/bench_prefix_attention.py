# SPDX-License-Identifier: Apache-2.0
"""One decode step's attention for B requests on one shared prefix: per-request vs shared-pass, full vs
compacted, measured side by side (torch; CPU, or CUDA with `--device cuda`, where the Triton kernel over
head pages is timed too).

Configurations, for a prefix of L tokens and B requests each with `own` tokens of its own:
* `full/per-request`: every request attends over the full prefix + its own tokens (what a paged
  engine's kernel does: it reads the shared prefix once per request);
* `head/per-request`: the same over a `head`-compacted prefix (r*L tokens per KV head);
* `runs/shared`: the plugin's path for non-uniform runs (`PagedStore.read_runs` + `prefix_attention.attend_rows`):
  ONE pass of all B queries over the runs (each KV head its own length; total kept pairs = r * L * H_kv, from
  a `pair` plan over synthetic uneven scores), gathered from head pages as the engine does each step, plus each
  request's own tokens, merged by log-sum-exp;
* `runs/one-pass`: the torch path the vLLM glue takes for decode rows (`step_decode.DecodeStep`): every
  page (the runs' head pages and each request's own pages) one batch element of one fused attention
  call, the softmax of each row formed over its pages; its own tokens lie in pages of the same pool;
* `runs/triton` (CUDA, or `--triton` under Triton's CPU interpreter): the same prefix part read in place
  from head pages by the Triton kernel (its page table built by `kernel_runs`, as the engines build it), checked
  against torch over the kept pairs before it is timed.

    PYTHONPATH=. python benchmarks/bench_prefix_attention.py --out benchmarks/results/prefix-attention-cpu.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_prefix_attention.py --triton --lengths 256 \
        --batches 2 --q-heads 4 --kv-heads 2 --head-dim 16 --page 16 --repeats 1 --out /tmp/p.json  # CI smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_attention import time_it  # noqa: E402  (median of repeats after warm-up, CUDA synced)

from kvzip_plugin.kernel_runs import backend_name, kernel_runs  # noqa: E402
from kvzip_plugin.paged_store import PagedStore  # noqa: E402
from kvzip_plugin.prefix_attention import OwnTokens, attend_rows, run_attention  # noqa: E402
from kvzip_plugin.step_decode import DecodeStep, PrefixPageCache  # noqa: E402
from kvzip_plugin.store import place_runs, select_runs  # noqa: E402


def per_request(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q `[B, H_kv, G, D]`, k/v `[B, H_kv, T, D]`: each request reads its own copy of the keys."""
    return F.scaled_dot_product_attention(q, k, v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--own", type=int, default=64, help="tokens of each request after the prefix")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--triton", action="store_true",
                   help="also time the Triton kernel off CUDA (Triton's CPU interpreter: TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    dev, h_q, h_kv, d = args.device, args.q_heads, args.kv_heads, args.head_dim
    with_triton = dev == "cuda" or args.triton
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = h_q // h_kv
    scale = d ** -0.5
    torch.manual_seed(0)
    rows = []
    for L in args.lengths:
        # uneven synthetic scores: a global threshold keeps very different counts per head
        spread = torch.logspace(-2, 1, h_kv).view(h_kv, 1)
        scores = (torch.rand(1, h_kv, L) * spread).float()
        keep = select_runs(scores, 0, args.ratio, "pair", args.page)[0]  # [H_kv, L]
        layout = place_runs(keep.sum(-1).view(1, h_kv), args.page)
        k_full = torch.randn(h_kv, L, d, device=dev, dtype=dtype)
        v_full = torch.randn(h_kv, L, d, device=dev, dtype=dtype)
        # head pages: [n_blocks, page, H_kv(slots), D] buffer of one layer (layout over a single layer), then
        # the requests' own blocks (the most requests of any batch)
        own_pages = -(-args.own // args.page)
        kv_pages = torch.zeros(2, layout.n_blocks + max(args.batches) * own_pages, args.page, h_kv, d, device=dev,
                               dtype=dtype)  # one storage
        pages_k, pages_v = kv_pages[0], kv_pages[1]

        def views(_: int) -> tuple[torch.Tensor, torch.Tensor]:  # the one layer's buffer, token-major
            return pages_k, pages_v

        # each head's kept pairs as a padded run `[H_kv, T, D]` (float32): the reference of the Triton check
        run_k = torch.zeros(h_kv, max(int(keep.sum(-1).max()), 1), d, device=dev)
        run_v = torch.zeros_like(run_k)
        for h in range(h_kv):
            idx = keep[h].nonzero().flatten()
            run_k[h, :idx.numel()] = k_full[h, idx.to(dev)].float()
            run_v[h, :idx.numel()] = v_full[h, idx.to(dev)].float()
            for j, pid in enumerate(layout.pages[0, h][layout.pages[0, h] >= 0].tolist()):
                blk, _, slot = (int(x) for x in layout.locate(torch.tensor(pid)))
                tok = idx[j * args.page:(j + 1) * args.page]
                pages_k[blk, :tok.numel(), slot] = k_full[h, tok]
                pages_v[blk, :tok.numel(), slot] = v_full[h, tok]
        kept_head = int(round(args.ratio * L))
        for b in args.batches:
            q = torch.randn(b, h_q, d, device=dev, dtype=dtype)
            own_k = torch.randn(b, h_kv, args.own, d, device=dev, dtype=dtype)
            own_v = torch.randn_like(own_k)
            qf = q.view(b, h_kv, g, d)
            kf = torch.cat([k_full.expand(b, -1, -1, -1), own_k], 2).contiguous()
            vf = torch.cat([v_full.expand(b, -1, -1, -1), own_v], 2).contiguous()
            t_full = time_it(lambda: per_request(qf, kf, vf), dev, args.repeats)
            kh = torch.cat([k_full[:, :kept_head].expand(b, -1, -1, -1), own_k], 2).contiguous()
            vh = torch.cat([v_full[:, :kept_head].expand(b, -1, -1, -1), own_v], 2).contiguous()
            t_head = time_it(lambda: per_request(qf, kh, vh), dev, args.repeats)

            own_lens = torch.full((b,), args.own, dtype=torch.long)

            store = PagedStore.build(layout, list(range(layout.n_blocks)))
            decode_q = torch.arange(b)

            def shared() -> torch.Tensor:  # what the engines' glue does for decode rows (attend_rows)
                out = torch.empty_like(q)
                runs = store.read_runs(0, views)
                attend_rows(q, out, runs, scale, decode_q, OwnTokens.of(own_k, own_v, own_lens), [])
                return out

            t_runs = time_it(shared, dev, args.repeats)
            own_blocks = layout.n_blocks + torch.arange(b * own_pages).view(b, own_pages)
            # the own tokens into the requests' own blocks (token-major, as the engines)
            for dst, src in ((pages_k, own_k), (pages_v, own_v)):  # src [B, H_kv, own, D] -> token-major pages
                dst[own_blocks.flatten()] = torch.nn.functional.pad(
                    src.transpose(1, 2), (0, 0, 0, 0, 0, own_pages * args.page - args.own)).reshape(
                    b * own_pages, args.page, h_kv, d)
            cache = PrefixPageCache()

            step = DecodeStep.plan([store], [list(range(b))], decode_q, own_lens, own_blocks.to(dev), h_kv, args.page,
                                   cache)  # once per step in the engines (for every layer): not timed

            def one_pass() -> torch.Tensor:  # the engines' torch path for decode rows, one layer
                out = torch.empty_like(q)
                step.attend(0, q, out, lambda _, blk, slot: (pages_k[blk, :, slot], pages_v[blk, :, slot]), scale)
                return out

            want = shared()
            torch.testing.assert_close(one_pass().float(), want.float(), rtol=2e-2, atol=2e-2)  # the same attention
            t_one = time_it(one_pass, dev, args.repeats)
            row = {"L": L, "batch": b, "ratio": args.ratio, "kept_fraction": float(keep.float().mean()),
                   "store_fraction": layout.n_blocks * args.page / L,
                   "full_per_request_ms": 1000 * t_full, "head_per_request_ms": 1000 * t_head,
                   "runs_shared_ms": 1000 * t_runs, "runs_one_pass_ms": 1000 * t_one,
                   "runs_shared_path": backend_name(store.read_runs(0, views))}
            if with_triton:
                # the page table the engines' kernel path builds (`kernel_runs`: element offsets into the buffer)
                kruns = kernel_runs(layout, 0, store.block_ids, views)
                assert kruns is not None, "the kernel cannot address these pages"
                # it must give the attention over the kept pairs (prefix part, no own tokens), computed in torch
                # from the full prefix and the plan, independently of the head pages
                got, got_lse = kruns.attention(q, scale)
                ref, ref_lse = run_attention(q.float(), run_k, run_v, layout.lengths[0], scale)
                torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(got_lse.float(), ref_lse, rtol=2e-2, atol=2e-2)
                t_tri = time_it(lambda: kruns.attention(q, scale), dev, args.repeats)
                row["runs_triton_prefix_only_ms"] = 1000 * t_tri
            row["head_vs_full"] = row["head_per_request_ms"] / row["full_per_request_ms"]
            row["runs_vs_full"] = row["runs_shared_ms"] / row["full_per_request_ms"]
            row["runs_vs_head"] = row["runs_shared_ms"] / row["head_per_request_ms"]
            row["one_pass_vs_full"] = row["runs_one_pass_ms"] / row["full_per_request_ms"]
            rows.append(row)
            print(f"L={L} B={b}: full {row['full_per_request_ms']:.3f} ms, head {row['head_per_request_ms']:.3f} ms, "
                  f"runs(shared) {row['runs_shared_ms']:.3f} ms, one pass {row['runs_one_pass_ms']:.3f} ms", flush=True)
    meta = {"device": dev, "dtype": str(dtype), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "shapes": {"q_heads": h_q, "kv_heads": h_kv, "head_dim": d, "page": args.page, "own": args.own},
            "command": "PYTHONPATH=. python benchmarks/bench_prefix_attention.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"One decode step's attention, B requests on one shared L-token prefix (median of {args.repeats}), "
             f"{dev} {meta['gpu'] or meta['cpu']}, {dtype}, {h_q} q / {h_kv} KV heads, head_dim {d}, "
             f"{args.own} own tokens per request, ratio {args.ratio}, torch {meta['torch']} "
             f"({meta['threads']} threads). Time relative to full/per-request. runs/shared read the runs with "
             f"{rows[0]['runs_shared_path'] if rows else '-'}."
             + (" runs/triton: the kernel alone (prefix part, no own tokens), checked against torch first."
                if with_triton else ""), "",
             "| L | B | full/per-request ms | head/per-request | runs/shared (attend_rows) | runs / head | "
             "runs/one-pass (step_decode) |" + (" runs/triton |" if with_triton else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if with_triton else "")]
    for r in rows:
        lines.append(f"| {r['L']} | {r['batch']} | {r['full_per_request_ms']:.2f} | {r['head_vs_full']:.2f} | "
                     f"{r['runs_vs_full']:.2f} | {r['runs_vs_head']:.2f} | {r['one_pass_vs_full']:.2f} |"
                     + (f" {r['runs_triton_prefix_only_ms'] / r['full_per_request_ms']:.2f} |" if with_triton else ""))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
