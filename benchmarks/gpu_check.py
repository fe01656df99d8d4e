# SPDX-License-Identifier: Apache-2.0
"""Check and time the plugin's own GPU code without an engine (the GPU machine has torch, triton and
transformers, but not vLLM or SGLang). Writes a JSON and prints one PASS/FAIL line.

Checks (each must pass):
* `score_bf16`: the KVzip chunk-score kernel (`scoring.kvzip.chunk_scores`) on the device with bfloat16
  inputs keeps the same top-30 % context pairs per KV head as the float32 CPU reference (overlap >= 0.9).
* `store_kv4d`: a `pair` store written into vLLM 0.33-shaped CUDA KV views (per-layer 4-D
  `[blocks, H_kv, block_size, 2D]`, physically LBNHC, split as FlashAttention splits them; the views
  come from `integrations/vllm/layout.py`) and read back each step gives every layer the full prefix's
  attention masked to the kept pairs (`PagedStore.read_runs` + `PageRuns.attention`, both paths).
* `triton_run_attention` (CUDA with Triton only): the Triton kernel that reads head pages in place
  equals the torch path on the same runs.

Timings (CUDA; `--quick` times tiny shapes so that the script runs in CI on CPU):
* `score_vs_prefill`: one layer's scoring work for an L-token prefix (every 2,048-token chunk's
  repeat queries over the whole cache, the official `full_cache` softmax) vs that layer's causal
  prefill attention (SDPA), Llama-3.1-8B shapes (32 q / 8 KV heads, d 128), bfloat16, random tensors.
  Attention only: the model's linear layers, which both passes also run, are not in either number.

    PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/results/gpu-check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check.json  # CI smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvzip_plugin.paged_store import PagedStore, write_store  # noqa: E402
from kvzip_plugin.prefix_attention import PageRuns, run_attention  # noqa: E402
from kvzip_plugin.scoring.kvzip import chunk_scores  # noqa: E402
from kvzip_plugin.store import place_runs, select_runs  # noqa: E402


def _vllm_layout():
    """`integrations/vllm/layout.py` by path: it needs only torch, and the GPU machine has no vLLM to
    make the `kvzip_plugin.integrations` package importable."""
    spec = importlib.util.spec_from_file_location("kvzip_vllm_layout", ROOT / "integrations" / "vllm" / "layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev: str, repeats: int) -> float:
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_score(dev: str, quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    h_q, h_kv, d, n_p, m = (4, 2, 16, 8, 64) if quick else (32, 8, 128, 32, 2048)
    n_q = m + 16  # the repeat input: the chunk plus its template
    q = torch.randn(h_q, n_q, d, generator=g)
    kp, kc, ks = (torch.randn(h_kv, n, d, generator=g) for n in (n_p, m, n_q))
    kc = kc * torch.linspace(0.5, 1.5, m).view(1, m, 1)  # some structure in which keys win
    want = chunk_scores(q, kp, kc, ks, d ** -0.5)
    got = chunk_scores(*(t.to(dev, torch.bfloat16) for t in (q, kp, kc, ks)), d ** -0.5).float().cpu()
    k = max(1, int(0.3 * m))
    top_w, top_g = want.topk(k, -1).indices, got.topk(k, -1).indices
    overlap = min(len(set(top_w[h].tolist()) & set(top_g[h].tolist())) / k for h in range(h_kv))
    return {"name": "score_bf16", "ok": overlap >= 0.9, "top30_overlap_min": overlap}


def check_store(dev: str, quick: bool) -> dict:
    layout = _vllm_layout()
    g = torch.Generator().manual_seed(1)
    n_layers, h_kv, h_q, d, bs, L = (3, 2, 4, 16, 16, 64) if quick else (4, 8, 32, 128, 16, 2048)
    n_blocks = 2 * L // bs + 8
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    raws = [torch.randn(n_blocks, bs, h_kv, 2 * d, generator=g).to(dev, dtype) for _ in range(n_layers)]
    kvs = [r.permute(0, 2, 1, 3) for r in raws]  # LBNHC: the 0.33 default with FlashAttention
    spec = layout.detect(kvs[0], backend="FLASH_ATTN", isa=None, block_size=bs, num_kv_heads=h_kv, head_size=d)

    def views(i: int):
        return layout.token_major(kvs[i], spec)

    src = list(range(L // bs))
    # the prefix as FlashAttention reads it (0.33: kv.transpose(1, 2).split(D, -1)), before compaction
    prefix = [tuple(x[src].reshape(L, h_kv, d).transpose(0, 1).float().clone()
                    for x in kvs[i].transpose(1, 2).split(d, -1)) for i in range(n_layers)]  # [H_kv, L, D]
    scale_by_layer = torch.logspace(-2, 1, n_layers).view(-1, 1, 1)  # very uneven budgets, like `pair` plans
    keep = select_runs(torch.rand(n_layers, h_kv, L, generator=g) * scale_by_layer, 0, 0.3, "pair", bs)
    plan = place_runs(keep.sum(-1), bs)
    dst = list(range(n_blocks - plan.n_blocks, n_blocks))
    write_store(keep, plan, src, dst, views)
    store = PagedStore.build(plan, dst)
    q = torch.randn(3, h_q, d, generator=g).to(dev, dtype)
    worst = 0.0
    for layer in range(n_layers):
        keys, values = prefix[layer]
        lengths = keep[layer].sum(-1)
        run_k = torch.zeros(h_kv, L, d, device=dev)
        run_v = torch.zeros(h_kv, L, d, device=dev)
        for h in range(h_kv):
            run_k[h, :lengths[h]] = keys[h][keep[layer, h].to(dev)]
            run_v[h, :lengths[h]] = values[h][keep[layer, h].to(dev)]
        want, _ = run_attention(q.float(), run_k, run_v, lengths, d ** -0.5)
        runs = store.read_runs(layer, views)
        assert isinstance(runs, PageRuns)
        for path_rows in (10 ** 6, 0):  # pages where they lie, then the copied runs
            import kvzip_plugin.prefix_attention as pa

            saved, pa.PAGE_ROWS_MAX = pa.PAGE_ROWS_MAX, path_rows
            try:
                got, _ = runs.attention(q, d ** -0.5)
            finally:
                pa.PAGE_ROWS_MAX = saved
            worst = max(worst, float((got.float() - want).abs().max()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return {"name": "store_kv4d", "ok": worst < tol, "max_abs_error": worst, "tolerance": tol, "dtype": str(dtype)}


def check_triton(dev: str) -> dict:
    try:
        from kvzip_plugin.kernels.run_attention import paged_run_attention
    except ImportError as exc:
        return {"name": "triton_run_attention", "ok": False, "error": f"ImportError: {exc}"}
    g = torch.Generator().manual_seed(2)
    h_kv, h_q, d, ps = 8, 32, 128, 16
    lengths = torch.tensor([0, 16, 160, 2048, 48, 1000, 512, 16])
    n_pages = [-(-int(t) // ps) for t in lengths]
    max_pages = max(n_pages)
    # [K/V, blocks, page, H_kv, D]: token-major pages, like vLLM's CUDA views
    pool = torch.randn(2, sum(n_pages) + 4, ps, h_kv, d, generator=g).to(dev, torch.bfloat16)
    perm = torch.randperm(sum(n_pages) + 4, generator=g).tolist()
    k_offs = torch.full((h_kv, max_pages), -1, dtype=torch.long)
    v_offs = torch.full((h_kv, max_pages), -1, dtype=torch.long)
    run_k = torch.zeros(h_kv, max(int(lengths.max()), 1), d, device=dev)
    run_v = torch.zeros_like(run_k)
    at = 0
    for h in range(h_kv):
        for j in range(n_pages[h]):
            blk, slot = perm[at], h  # each head's pages in its own slot of scattered blocks
            at += 1
            k_offs[h, j] = blk * pool.stride(1) + slot * pool.stride(3)
            v_offs[h, j] = pool.stride(0) + blk * pool.stride(1) + slot * pool.stride(3)
            n = min(ps, int(lengths[h]) - j * ps)
            run_k[h, j * ps:j * ps + n] = pool[0, blk, :n, slot].float()
            run_v[h, j * ps:j * ps + n] = pool[1, blk, :n, slot].float()
    q = torch.randn(5, h_q, d, generator=g).to(dev, torch.bfloat16)
    strides = (pool.stride(2), pool.stride(4))
    got, got_lse = paged_run_attention(q, pool.view(-1), k_offs.to(dev), v_offs.to(dev), lengths.to(dev), ps,
                                       strides, strides, d ** -0.5)
    want, want_lse = run_attention(q.float(), run_k, run_v, lengths, d ** -0.5)
    err = float((got - want).abs().max())
    return {"name": "triton_run_attention", "ok": err < 3e-2 and bool(torch.isinf(got_lse[:, :4]).all()),
            "max_abs_error": err}


def time_score_vs_prefill(dev: str, quick: bool, repeats: int) -> list[dict]:
    h_q, h_kv, d, chunk = (4, 2, 16, 64) if quick else (32, 8, 128, 2048)
    lengths = (256,) if quick else (8192, 16384, 32768)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    rows = []
    for L in lengths:
        q = torch.randn(1, h_q, L, d, device=dev, dtype=dtype)
        k = torch.randn(1, h_kv, L, d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        t_prefill = _time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                enable_gqa=True), dev, repeats)
        rq = torch.randn(h_q, chunk, d, device=dev, dtype=dtype)  # the repeat queries of one chunk
        kk = k[0]

        def score_all(L: int = L, kk: torch.Tensor = kk, rq: torch.Tensor = rq) -> None:
            for start in range(0, L, chunk):
                end = min(L, start + chunk)
                chunk_scores(rq[:, :end - start], kk[:, :0], kk[:, start:end], kk[:, start:end], d ** -0.5,
                             keys_other=torch.cat([kk[:, :start], kk[:, end:]], 1))

        t_score = _time(score_all, dev, max(1, repeats // 3))
        rows.append({"L": L, "prefill_attention_ms": 1000 * t_prefill, "score_ms": 1000 * t_score,
                     "score_vs_prefill_attention": t_score / t_prefill})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    dev = args.device
    t0 = time.perf_counter()
    checks = [check_score(dev, args.quick), check_store(dev, args.quick)]
    if dev == "cuda":
        checks.append(check_triton(dev))
    timings = time_score_vs_prefill(dev, args.quick, args.repeats)
    ok = all(c["ok"] for c in checks)
    meta = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "quick": args.quick,
            "wall_s": time.perf_counter() - t0,
            "command": "PYTHONPATH=. python benchmarks/gpu_check.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "ok": ok, "checks": checks, "score_vs_prefill": timings},
                                   indent=1) + "\n")
    for c in checks:
        print(("ok   " if c["ok"] else "FAIL ") + json.dumps(c))
    for r in timings:
        print(f"L={r['L']}: prefill attention {r['prefill_attention_ms']:.2f} ms, scoring {r['score_ms']:.2f} ms "
              f"({r['score_vs_prefill_attention']:.2f}x)")
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} ({dev}{', quick' if args.quick else ''}) -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
