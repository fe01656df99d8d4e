# SPDX-License-Identifier: Apache-2.0
"""The paged run-attention Triton kernel against `prefix_attention.run_attention` on the gathered runs.

Runs live in head pages scattered in random order over two layer buffers carved from one flat
storage (the rest of the storage holds noise the kernel must not read). Without a GPU the kernel
runs in Triton's interpreter, so shapes are tiny. TRITON_INTERPRET=1 must be set before triton is first
imported (`triton.jit` picks the interpreter when it decorates, triton.language's own functions
included): this module sets it when it can and is skipped, saying so, when triton came in first.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.language's own jit functions (tl.max, tl.sum) were built for the GPU compiler, and
        # the interpreter cannot call them: TRITON_INTERPRET=1 has to be set before triton is
        # imported (here tests/conftest.py's imports pull it in through torch._dynamo).
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set: run with "
                    "TRITON_INTERPRET=1 in the environment", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kvzip_plugin.kernels.run_attention import paged_run_attention  # noqa: E402
from kvzip_plugin.prefix_attention import run_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_BUFFERS = 2  # layer buffers carved from the one storage


class PagedRuns:
    """Runs of `lengths` tokens per KV head, in pages of `page_size` tokens placed at random head
    pages of two buffers that are views of one flat storage.

    Each buffer holds `blocks` blocks of `slots` head pages (`[blocks, page, slots, D]` like vLLM's
    token-major layout), or with `transposed_keys` its keys as `[blocks, slots, D, page]` (vLLM CPU).
    """

    def __init__(self, lengths: list[int], d: int, page_size: int, transposed_keys: bool, seed: int,
                 dtype: torch.dtype = torch.float32, slots: int = 3):
        gen = torch.Generator().manual_seed(seed)
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.page_size, self.d = page_size, d
        h_kv = len(lengths)
        n_pages = [-(-t // page_size) for t in lengths]
        self.max_pages = max(max(n_pages), 1)
        total = sum(n_pages)
        blocks = -(-total // (N_BUFFERS * slots)) + 1  # one spare block of noise per buffer
        page_elems = page_size * d
        buf_elems = 2 * blocks * slots * page_elems  # keys then values
        gap = 7 * d  # noise between and around the buffers
        self.storage = torch.randn(gap + N_BUFFERS * (buf_elems + gap), generator=gen).to(dtype)
        bases = [gap + b * (buf_elems + gap) for b in range(N_BUFFERS)]

        def k_offset(buf: int, blk: int, slot: int) -> int:
            if transposed_keys:  # [blocks, slots, D, page]
                return bases[buf] + (blk * slots + slot) * page_elems
            return bases[buf] + blk * page_size * slots * d + slot * d  # [blocks, page, slots, D]

        def v_offset(buf: int, blk: int, slot: int) -> int:  # values token-major after the keys
            return bases[buf] + blocks * slots * page_elems + blk * page_size * slots * d + slot * d

        self.k_strides = (1, page_size) if transposed_keys else (slots * d, 1)
        self.v_strides = (slots * d, 1)
        free = [(b, blk, s) for b in range(N_BUFFERS) for blk in range(blocks) for s in range(slots)]
        order = torch.randperm(len(free), generator=gen).tolist()
        self.k_pages = torch.full((h_kv, self.max_pages), -1, dtype=torch.long)
        self.v_pages = torch.full((h_kv, self.max_pages), -1, dtype=torch.long)
        i = 0
        for h in range(h_kv):
            for p in range(n_pages[h]):
                where = free[order[i]]
                i += 1
                self.k_pages[h, p] = k_offset(*where)
                self.v_pages[h, p] = v_offset(*where)
        self.n_kv = h_kv

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `[H_kv, max_pages * page_size, D]` keys and values read with torch (zeros past a run)."""
        ps, d = self.page_size, self.d
        t = torch.arange(ps).view(ps, 1)
        dim = torch.arange(d).view(1, d)
        out = []
        for pages, (ts, ds) in ((self.k_pages, self.k_strides), (self.v_pages, self.v_strides)):
            idx = pages.clamp(min=0).view(self.n_kv, -1, 1, 1) + t * ts + dim * ds  # [H, P, ps, D]
            x = self.storage[idx] * (pages >= 0).view(self.n_kv, -1, 1, 1)
            out.append(x.reshape(self.n_kv, self.max_pages * ps, d))
        return out[0], out[1]

    def run(self, q: torch.Tensor, scale: float, k_pages: torch.Tensor | None = None, **kw):
        return paged_run_attention(
            q.to(DEVICE), self.storage.to(DEVICE), (self.k_pages if k_pages is None else k_pages).to(DEVICE),
            self.v_pages.to(DEVICE), self.lengths.to(DEVICE), self.page_size, self.k_strides, self.v_strides,
            scale, **kw)


def reference(runs: PagedRuns, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = runs.gathered()
    return run_attention(q.float(), keys.float(), values.float(), runs.lengths, scale)


def check(out, lse, ref_out, ref_lse, tol=1e-4):
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=tol, atol=tol)


# (H_q, H_kv, run lengths): an empty run where H_kv > 1, partial last pages (page_size 4), <= 12 pages.
CASES = [
    (4, 2, [0, 45]),
    (6, 1, [23]),
    (3, 3, [17, 0, 48]),
    (4, 4, [4, 9, 1, 0]),
]


@pytest.mark.parametrize("h_q,h_kv,lengths", CASES)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("transposed_keys", [False, True])
def test_matches_run_attention(h_q, h_kv, lengths, n, transposed_keys):
    assert len(lengths) == h_kv
    d, scale = 16, 0.3
    runs = PagedRuns(lengths, d, page_size=4, transposed_keys=transposed_keys, seed=h_q * 10 + h_kv + n)
    q = torch.randn(n, h_q, d, generator=torch.Generator().manual_seed(n))
    ref_out, ref_lse = reference(runs, q, scale)
    out, lse = runs.run(q, scale, block_n=16)  # 16 tokens = 4 pages per step: several steps per run
    check(out, lse, ref_out, ref_lse)
    assert (out.cpu()[:, [j for j in range(h_q) if lengths[j // (h_q // h_kv)] == 0]] == 0).all()


@pytest.mark.parametrize("page_size,block_n", [(1, 16), (3, 32), (4, 64)])
def test_other_page_sizes_and_blocks(page_size, block_n):
    d, h_q, lengths = 32, 4, [0, 31]
    runs = PagedRuns(lengths, d, page_size=page_size, transposed_keys=page_size == 3, seed=page_size)
    q = torch.randn(5, h_q, d, generator=torch.Generator().manual_seed(1))
    out, lse = runs.run(q, 0.2, block_n=block_n)
    check(out, lse, *reference(runs, q, 0.2))


def test_many_rows_span_row_blocks():
    """G * n = 3 * 7 = 21 rows > block_m = 16: two row blocks per KV head; q non-contiguous."""
    d, lengths = 16, [13, 6]
    runs = PagedRuns(lengths, d, page_size=4, transposed_keys=False, seed=5)
    q = torch.randn(6, 7, d, generator=torch.Generator().manual_seed(2)).transpose(0, 1)  # [7, 6, D]
    out, lse = runs.run(q, 0.25, block_m=16, block_n=16)
    check(out, lse, *reference(runs, q, 0.25))


def test_all_runs_empty():
    runs = PagedRuns([0], 16, page_size=4, transposed_keys=False, seed=0)
    q = torch.randn(2, 3, 16)
    out, lse = runs.run(q, 0.5)
    assert (out.cpu() == 0).all() and torch.isneginf(lse.cpu()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage(dtype):
    """Half queries and pages: half-precision dots with float32 accumulation, loose tolerance (under the
    interpreter bfloat16 dots run in float32: its bfloat16 `tl.dot` is broken)."""
    d, lengths = 16, [10, 21]
    runs = PagedRuns(lengths, d, page_size=4, transposed_keys=True, seed=3, dtype=dtype)
    q = torch.randn(5, 4, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, lse = runs.run(q, 0.3, block_n=16)
    check(out, lse, *reference(runs, q, 0.3), tol=2e-2)


def test_check_can_fail():
    """Swapping two heads' page tables (and the runs' lengths with them) changes the result, so the
    comparison above does see which pages each head reads."""
    d, lengths = 16, [24, 24]
    runs = PagedRuns(lengths, d, page_size=4, transposed_keys=False, seed=11)
    q = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(4))
    ref_out, ref_lse = reference(runs, q, 0.5)
    out, lse = runs.run(q, 0.5, k_pages=runs.k_pages.flip(0))
    assert not torch.allclose(out.cpu(), ref_out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(lse.cpu(), ref_lse, rtol=1e-4, atol=1e-4)


def test_rejects_bad_head_dim():
    runs = PagedRuns([4], 16, page_size=4, transposed_keys=False, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        paged_run_attention(torch.randn(1, 1, 24), runs.storage, runs.k_pages, runs.v_pages, runs.lengths, 4,
                            runs.k_strides, runs.v_strides, 1.0)


# ------------------------------------------------------------------ the kernel behind PagedStore.read_runs


def _pools(kind: str, n_layers: int, n_blocks: int, page_size: int, h_kv: int, d: int, gen: torch.Generator):
    """Per layer token-major `[n_blocks, page, H_kv, D]` (keys, values) views, laid out as an engine does:
    `separate` one allocation per layer and per keys/values (SGLang's token pool); `vllm_cpu` one
    allocation for all layers, a (block, head) row holding its keys transposed `[D, page]` then its values."""
    if kind == "separate":
        return [(torch.randn(n_blocks, page_size, h_kv, d, generator=gen),
                 torch.randn(n_blocks, page_size, h_kv, d, generator=gen)) for _ in range(n_layers)]
    raw = torch.randn(n_layers, n_blocks, h_kv, 2, page_size * d, generator=gen)
    return [(raw[i, :, :, 0].unflatten(-1, (d, page_size)).permute(0, 3, 1, 2),
             raw[i, :, :, 1].unflatten(-1, (page_size, d)).permute(0, 2, 1, 3)) for i in range(n_layers)]


@pytest.mark.parametrize("kind,page_size", [("separate", 1), ("separate", 4), ("vllm_cpu", 4)])
def test_store_reads_through_the_kernel_like_torch(kind, page_size, monkeypatch):
    """A `pair` store spread over several layers' buffers: with KVZIP_PREFIX_ATTENTION=triton
    `read_runs` hands the kernel's runs (pages read in place across separate allocations), whose
    attention equals the torch path's on the same store."""
    from kvzip_plugin.kernel_runs import KernelRuns
    from kvzip_plugin.paged_store import PagedStore, write_store
    from kvzip_plugin.store import place_runs, select_runs

    gen = torch.Generator().manual_seed(page_size)
    n_layers, h_kv, h_q, d, length, n_blocks = 3, 2, 4, 16, 24, 40
    scores = torch.rand(n_layers, h_kv, length, generator=gen) * torch.tensor([0.01, 1.0, 3.0]).view(-1, 1, 1)
    keep = select_runs(scores, 0, 0.4, "pair", page_size)
    layout = place_runs(keep.sum(-1), page_size)
    pool = _pools(kind, n_layers, n_blocks, page_size, h_kv, d, gen)
    dst = list(range(n_blocks - layout.n_blocks, n_blocks))
    write_store(keep, layout, list(range(length // page_size)), dst, lambda i: pool[i])
    store = PagedStore.build(layout, dst)
    assert any(len(lr.gathers) > 1 for lr in store.layers)  # some layer's runs span buffers
    q = torch.randn(3, h_q, d, generator=gen)
    for layer in range(n_layers):
        monkeypatch.setenv("KVZIP_PREFIX_ATTENTION", "torch")
        want = store.read_runs(layer, lambda i: pool[i]).attention(q, 0.4)
        monkeypatch.setenv("KVZIP_PREFIX_ATTENTION", "triton")
        runs = store.read_runs(layer, lambda i: pool[i])
        if not store.layers[layer].gathers:
            continue  # a layer that keeps nothing: no pages to read
        assert isinstance(runs, KernelRuns)
        check(*runs.attention(q, 0.4), *want)
