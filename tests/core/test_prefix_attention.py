# SPDX-License-Identifier: Apache-2.0
"""Attention over per-head runs merged with the request's own tokens equals the full cache's
attention masked to the kept pairs (the definition of a compacted prefix)."""

from __future__ import annotations

import pytest
import torch

from kvzip_plugin.prefix_attention import causal_attention, merge, run_attention


def masked_reference(q, keys, values, keep, scale):
    """q `[n, H_q, D]` are the last n of the T tokens; keys/values `[H_kv, T, D]`; keep `[H_kv, T]`."""
    n, h_q, _ = q.shape
    h_kv, t, _ = keys.shape
    g = h_q // h_kv
    out = torch.empty(n, h_q, keys.shape[-1], dtype=torch.float64)
    for j in range(h_q):
        h = j // g
        s = (q[:, j].double() @ keys[h].double().T) * scale  # [n, T]
        pos = t - n + torch.arange(n)
        mask = keep[h].view(1, -1) & (torch.arange(t).view(1, -1) <= pos.view(-1, 1))
        out[:, j] = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ values[h].double()
    return out


@pytest.mark.parametrize("h_q,h_kv", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("n", [1, 5])
def test_runs_merged_with_own_tokens_equal_masked_full_attention(h_q, h_kv, n):
    g = torch.Generator().manual_seed(h_q * 10 + n)
    L, own, d, scale = 24, 7, 16, 0.25
    keys = torch.randn(h_kv, L + own, d, generator=g)
    values = torch.randn(h_kv, L + own, d, generator=g)
    q = torch.randn(n, h_q, d, generator=g)
    keep = torch.rand(h_kv, L + own, generator=g) < 0.4
    keep[:, L:] = True
    keep[0, :L] = False  # one head keeps nothing of the prefix
    lengths = keep[:, :L].sum(-1)
    T = int(lengths.max()) + 3  # padded runs; padding holds garbage that must be ignored
    run_k = torch.randn(h_kv, T, d, generator=g) * 100
    run_v = torch.randn(h_kv, T, d, generator=g) * 100
    for h in range(h_kv):
        run_k[h, :lengths[h]] = keys[h, :L][keep[h, :L]]
        run_v[h, :lengths[h]] = values[h, :L][keep[h, :L]]
    out_p, lse_p = run_attention(q, run_k, run_v, lengths, scale)
    out_o, lse_o = causal_attention(q, keys[:, L:], values[:, L:], scale)
    got = merge(out_p, lse_p, out_o, lse_o)
    want = masked_reference(q, keys, values, keep, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if h_kv > 1:  # the check can fail: ignoring the per-head runs changes the result
        wrong = merge(out_p, torch.full_like(lse_p, float("-inf")), out_o, lse_o)
        assert not torch.allclose(wrong.double(), want, atol=1e-3)


def test_batched_queries_of_several_requests_share_one_pass():
    g = torch.Generator().manual_seed(0)
    run_k, run_v = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    lengths = torch.tensor([9, 4])
    qa, qb = torch.randn(3, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    out, lse = run_attention(torch.cat([qa, qb]), run_k, run_v, lengths, 0.3)
    out_a, lse_a = run_attention(qa, run_k, run_v, lengths, 0.3)
    torch.testing.assert_close(out[:3], out_a)
    torch.testing.assert_close(lse[:3], lse_a)


def test_batched_decode_rows_equal_one_by_one():
    """`decode_attention` (one query per request, own tokens padded to the longest) equals each request's
    `causal_attention` over exactly its own tokens; the padding (finite garbage here) is never attended."""
    from kvzip_plugin.prefix_attention import decode_attention

    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, 1, 9])
    keys = torch.randn(3, 2, 9, 8, generator=g)
    values = torch.randn(3, 2, 9, 8, generator=g)
    for r, n in enumerate(lens.tolist()):
        keys[r, :, n:] = 1e4  # padding
        values[r, :, n:] = -1e4  # finite (the engines pad with copies of real tokens: own_positions)
    q = torch.randn(3, 4, 8, generator=g)
    out, lse = decode_attention(q, keys, values, lens, 0.5)
    for r, n in enumerate(lens.tolist()):
        want_out, want_lse = causal_attention(q[r:r + 1], keys[r, :, :n], values[r, :, :n], 0.5)
        torch.testing.assert_close(out[r:r + 1], want_out)
        torch.testing.assert_close(lse[r:r + 1], want_lse)



@pytest.mark.parametrize("with_prefill", [True, False])
def test_attend_rows_writes_each_request_its_masked_full_attention(with_prefill):
    """Both engines' glue: two decode requests (own tokens padded to the longest) and, or not, one prefill request
    on the same runs; each output row equals the full cache masked to the kept pairs (+ its own tokens, causal);
    other rows untouched. Decode rows alone take one softmax over the runs and their own tokens."""
    from kvzip_plugin.prefix_attention import OwnTokens, SegmentRuns, attend_rows

    g = torch.Generator().manual_seed(7)
    h_kv, h_q, d, L = 2, 4, 8, 12
    keys, values = torch.randn(h_kv, L, d, generator=g), torch.randn(h_kv, L, d, generator=g)
    keep = torch.rand(h_kv, L, generator=g) < 0.5
    lengths = keep.sum(-1)
    run_k, run_v = torch.zeros(h_kv, L, d), torch.zeros(h_kv, L, d)
    for h in range(h_kv):
        run_k[h, :lengths[h]], run_v[h, :lengths[h]] = keys[h][keep[h]], values[h][keep[h]]
    own_d = (torch.randn(2, h_kv, 3, d, generator=g), torch.randn(2, h_kv, 3, d, generator=g), torch.tensor([3, 1]))
    own_p = (torch.randn(h_kv, 5, d, generator=g), torch.randn(h_kv, 5, d, generator=g))
    q_all = torch.randn(7, h_q, d, generator=g)  # tokens 0, 4: decode rows; 1..3: 3 prefill queries; 5, 6: others
    out_all = torch.full((7, h_q, d), 7.0)
    runs = SegmentRuns(run_k.reshape(-1, d), run_v.reshape(-1, d), [0, L], lengths.tolist())
    attend_rows(q_all, out_all, runs, 0.4, torch.tensor([0, 4]), OwnTokens.of(*own_d),
                [(1, 4, *own_p)] if with_prefill else [])
    for i, (row, n_own) in enumerate([(0, 3), (4, 1)]):
        mask_d = torch.cat([keep, torch.ones(h_kv, n_own, dtype=torch.bool)], 1)
        want_d = masked_reference(q_all[row:row + 1], torch.cat([keys, own_d[0][i, :, :n_own]], 1),
                                  torch.cat([values, own_d[1][i, :, :n_own]], 1), mask_d, 0.4)
        torch.testing.assert_close(out_all[row:row + 1].double(), want_d, rtol=1e-5, atol=1e-5)
    if with_prefill:
        mask_p = torch.cat([keep, torch.ones(h_kv, 5, dtype=torch.bool)], 1)
        want_p = masked_reference(q_all[1:4], torch.cat([keys, own_p[0]], 1), torch.cat([values, own_p[1]], 1),
                                  mask_p, 0.4)
        torch.testing.assert_close(out_all[1:4].double(), want_p, rtol=1e-5, atol=1e-5)
    else:
        assert bool((out_all[1:4] == 7.0).all())
    assert bool((out_all[5:] == 7.0).all())


def test_own_positions_pad_with_the_last_real_token():
    from kvzip_plugin.prefix_attention import own_positions

    pos = own_positions(torch.tensor([3, 1, 5]))
    assert pos.tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("n", [1, 2, 7])
def test_page_attention_equals_run_attention(n, monkeypatch):
    """Pages attended where they lie (split over two chunks, one of them strided, a partial last page, a
    head without pages) give the runs' attention; `PageRuns` takes the page path for few query rows and
    copies the runs for many, with the same result."""
    from kvzip_plugin import prefix_attention as pa

    g = torch.Generator().manual_seed(n)
    h_kv, h_q, d, ps = 3, 6, 8, 4
    lengths = [10, 0, 16]  # head 0: 3 pages, the last one half used; head 1: none
    keys = [torch.randn(t, d, generator=g) for t in lengths]
    values = [torch.randn(t, d, generator=g) for t in lengths]
    pages_k, pages_v, heads, valid = [], [], [], []
    for h, t in enumerate(lengths):
        for p0 in range(0, t, ps):
            k, v = torch.full((ps, d), 3.0), torch.full((ps, d), -3.0)  # unused slots: finite garbage
            k[:min(ps, t - p0)], v[:min(ps, t - p0)] = keys[h][p0:p0 + ps], values[h][p0:p0 + ps]
            pages_k.append(k)
            pages_v.append(v)
            heads.append(h)
            valid.append(min(ps, t - p0))
    pk, pv, hd = torch.stack(pages_k), torch.stack(pages_v), torch.tensor(heads)
    used = torch.arange(ps).view(1, ps) < torch.tensor(valid).view(-1, 1)
    mask = torch.zeros(used.shape).masked_fill(~used, float("-inf")).view(-1, 1, 1, ps)
    split = 2
    chunks = [(pk[:split].transpose(1, 2).contiguous().transpose(1, 2), pv[:split], hd[:split], mask[:split]),
              (pk[split:], pv[split:], hd[split:], mask[split:])]
    q = torch.randn(n, h_q, d, generator=g)
    run_k, run_v = torch.zeros(h_kv, max(lengths), d), torch.zeros(h_kv, max(lengths), d)
    for h, t in enumerate(lengths):
        run_k[h, :t], run_v[h, :t] = keys[h], values[h]
    want_out, want_lse = run_attention(q, run_k, run_v, torch.tensor(lengths), 0.5)
    got_out, got_lse = pa.page_attention(q, chunks, h_kv, 0.5)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    assert bool(torch.isinf(got_lse[:, 2:4]).all())  # the query heads of KV head 1
    runs = pa.PageRuns(chunks, [torch.arange(split), torch.arange(split, len(heads))], [0, 12, 12], lengths)
    for rows_max in (0, 10 ** 6):  # the copied runs (many query rows), the pages where they lie (few)
        monkeypatch.setattr(pa, "PAGE_ROWS_MAX", rows_max)
        out, lse = runs.attention(q, 0.5)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_decode_rows_over_pages_take_one_softmax(n, monkeypatch):
    """A step of only decode rows on pages (`PageRuns.decode_attention`, the one-softmax path) writes what
    the two-part path (runs, own tokens, log-sum-exp merge) writes: the full cache masked to the kept pairs
    plus each request's own tokens (padded to the longest, the padding masked); transposed key pages, a
    partial last page, a head without pages, pages in two buffers; other rows untouched."""
    from kvzip_plugin import prefix_attention as pa

    g = torch.Generator().manual_seed(10 + n)
    h_kv, h_q, d, ps, L = 3, 6, 8, 4, 24
    keys, values = torch.randn(h_kv, L, d, generator=g), torch.randn(h_kv, L, d, generator=g)
    keep = torch.zeros(h_kv, L, dtype=torch.bool)
    keep[0, torch.randperm(L, generator=g)[:10]] = True  # 3 pages, the last half used
    keep[2, torch.randperm(L, generator=g)[:16]] = True  # 4 full pages; head 1 keeps nothing
    pages_k, pages_v, heads, valid = [], [], [], []
    for h in range(h_kv):
        kept = keep[h].nonzero().flatten()
        for p0 in range(0, kept.numel(), ps):
            tok = kept[p0:p0 + ps]
            k, v = torch.full((ps, d), 5.0), torch.full((ps, d), -5.0)  # unused slots: finite garbage
            k[:tok.numel()], v[:tok.numel()] = keys[h, tok], values[h, tok]
            pages_k.append(k)
            pages_v.append(v)
            heads.append(h)
            valid.append(tok.numel())
    pk, pv, hd = torch.stack(pages_k), torch.stack(pages_v), torch.tensor(heads)
    used = torch.arange(ps).view(1, ps) < torch.tensor(valid).view(-1, 1)
    mask = torch.zeros(used.shape).masked_fill(~used, float("-inf")).view(-1, 1, 1, ps)
    chunks = [(pk[:2].transpose(1, 2).contiguous().transpose(1, 2), pv[:2], hd[:2], mask[:2]),
              (pk[2:], pv[2:], hd[2:], None if bool(used[2:].all()) else mask[2:])]
    runs = pa.PageRuns(chunks, [torch.arange(2), torch.arange(2, len(heads))], [0, 12, 12],
                       keep.sum(-1).tolist())
    own_lens = torch.tensor([5, 1, 3][:n])
    own_k = torch.randn(n, h_kv, 5, d, generator=g)
    own_v = torch.randn(n, h_kv, 5, d, generator=g)
    own = pa.OwnTokens.of(own_k, own_v, own_lens)
    q_all = torch.randn(n + 2, h_q, d, generator=g)
    decode_q = torch.arange(1, n + 1)  # rows 0 and n + 1 belong to other requests
    fused = torch.full((n + 2, h_q, d), 7.0)
    pa.attend_rows(q_all, fused, runs, 0.35, decode_q, own, [])
    monkeypatch.setattr(pa, "PAGE_ROWS_MAX", 0)  # the two-part path
    assert runs.decode_attention(q_all[decode_q], own, 0.35) is None
    two_part = torch.full((n + 2, h_q, d), 7.0)
    pa.attend_rows(q_all, two_part, runs, 0.35, decode_q, own, [])
    torch.testing.assert_close(fused, two_part, rtol=1e-5, atol=1e-5)
    for i in range(n):
        t = int(own_lens[i])
        want = masked_reference(q_all[1 + i:2 + i], torch.cat([keys, own_k[i, :, :t]], 1),
                                torch.cat([values, own_v[i, :, :t]], 1),
                                torch.cat([keep, torch.ones(h_kv, t, dtype=torch.bool)], 1), 0.35)
        torch.testing.assert_close(fused[1 + i:2 + i].double(), want, rtol=1e-5, atol=1e-5)
    assert bool((fused[0] == 7.0).all()) and bool((fused[n + 1] == 7.0).all())


def test_keys_stored_transposed_give_the_same_attention():
    """vLLM CPU stores keys transposed per page, so the views the engines hand over have a last-dimension
    stride != 1 (torch's CPU flash kernel silently misreads those; `attend` must not)."""
    from kvzip_plugin.prefix_attention import decode_attention, segment_attention

    g = torch.Generator().manual_seed(5)
    h_kv, h_q, t, d = 2, 4, 14, 16
    keys = torch.randn(h_kv, d, t, generator=g).transpose(1, 2)  # [H_kv, T, D], stride(-1) == T
    values = torch.randn(h_kv, d, t, generator=g).transpose(1, 2)
    assert keys.stride(-1) != 1
    q = torch.randn(5, h_q, d, generator=g)
    for got, want in [
        (causal_attention(q, keys, values, 0.3), causal_attention(q, keys.contiguous(), values.contiguous(), 0.3)),
        (decode_attention(q[:2], keys.unsqueeze(0).expand(2, -1, -1, -1), values.unsqueeze(0).expand(2, -1, -1, -1),
                          torch.tensor([t, 3]), 0.3),
         decode_attention(q[:2], keys.contiguous().unsqueeze(0).expand(2, -1, -1, -1).contiguous(),
                          values.contiguous().unsqueeze(0).expand(2, -1, -1, -1).contiguous(), torch.tensor([t, 3]),
                          0.3)),
        (segment_attention(q, keys[0], values[0], [0, 4], [4, 10], 0.3),
         segment_attention(q, keys[0].contiguous(), values[0].contiguous(), [0, 4], [4, 10], 0.3)),
    ]:
        torch.testing.assert_close(got, want)
    want = masked_reference(q, keys, values, torch.ones(h_kv, t, dtype=torch.bool), 0.3)
    torch.testing.assert_close(causal_attention(q, keys, values, 0.3)[0].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (9, torch.float32), (9, torch.float16)])
def test_decode_rows_over_runs_in_one_pass_equal_masked_full_attention(n, dtype):
    """The cascade (`segment_decode_attention`: every run read once for all rows, keys as columns, the own
    tokens in the same softmax) gives each row the full cache masked to the kept pairs plus its own tokens;
    a head without a run, runs of very different lengths, padding of the own tokens masked."""
    from kvzip_plugin.prefix_attention import length_mask, segment_decode_attention

    g = torch.Generator().manual_seed(20 + n)
    h_kv, h_q, d, L = 3, 9, 16, 40
    keys = torch.randn(h_kv, L, d, generator=g).to(dtype).float()  # values a half pool can hold exactly
    values = torch.randn(h_kv, L, d, generator=g).to(dtype).float()
    keep = torch.zeros(h_kv, L, dtype=torch.bool)
    keep[0, torch.randperm(L, generator=g)[:37]] = True  # nearly all; head 1 keeps nothing
    keep[2, torch.randperm(L, generator=g)[:3]] = True
    kept = [keep[h].nonzero().flatten() for h in range(h_kv)]
    lengths = [int(k.numel()) for k in kept]
    starts = [sum(lengths[:h]) for h in range(h_kv)]
    keys_t = torch.cat([keys[h, kept[h]] for h in range(h_kv)]).T.contiguous()  # [D, N]
    run_values = torch.cat([values[h, kept[h]] for h in range(h_kv)])
    own_lens = torch.tensor([6, 1, 4, 2, 6, 3, 5, 1, 2][:n])
    own_k = torch.randn(n, h_kv, 6, d, generator=g).to(dtype).float()
    own_v = torch.randn(n, h_kv, 6, d, generator=g).to(dtype).float()
    q = torch.randn(n, h_q, d, generator=g).to(dtype).float()
    out = segment_decode_attention(q.to(dtype), keys_t.to(dtype), run_values.to(dtype), starts, lengths,
                                   own_k.transpose(-1, -2).to(dtype), own_v.to(dtype), length_mask(own_lens, 6), 0.3)
    assert out.dtype == torch.float32 and out.shape == (n, h_q, d)
    for i in range(n):
        t = int(own_lens[i])
        want = masked_reference(q[i:i + 1], torch.cat([keys, own_k[i, :, :t]], 1),
                                torch.cat([values, own_v[i, :, :t]], 1),
                                torch.cat([keep, torch.ones(h_kv, t, dtype=torch.bool)], 1), 0.3)
        torch.testing.assert_close(out[i:i + 1].double(), want, rtol=1e-5, atol=1e-5)
