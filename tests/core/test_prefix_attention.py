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
    `causal_attention` over exactly its own tokens; the padding (garbage here) is never attended."""
    from kvzip_plugin.prefix_attention import decode_attention

    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, 1, 9])
    keys = torch.randn(3, 2, 9, 8, generator=g)
    values = torch.randn(3, 2, 9, 8, generator=g)
    for r, n in enumerate(lens.tolist()):
        keys[r, :, n:] = 1e4  # padding
        values[r, :, n:] = float("nan")
    q = torch.randn(3, 4, 8, generator=g)
    out, lse = decode_attention(q, keys, values, lens, 0.5)
    for r, n in enumerate(lens.tolist()):
        want_out, want_lse = causal_attention(q[r:r + 1], keys[r, :, :n], values[r, :, :n], 0.5)
        torch.testing.assert_close(out[r:r + 1], want_out)
        torch.testing.assert_close(lse[r:r + 1], want_lse)



def test_attend_rows_writes_each_request_its_masked_full_attention():
    """Both engines' glue: one decode request and one prefill request on the same runs; each output row
    equals the full cache masked to the kept pairs (+ its own tokens, causal); other rows untouched."""
    from kvzip_plugin.prefix_attention import attend_rows

    g = torch.Generator().manual_seed(7)
    h_kv, h_q, d, L = 2, 4, 8, 12
    keys, values = torch.randn(h_kv, L, d, generator=g), torch.randn(h_kv, L, d, generator=g)
    keep = torch.rand(h_kv, L, generator=g) < 0.5
    lengths = keep.sum(-1)
    run_k, run_v = torch.zeros(h_kv, L, d), torch.zeros(h_kv, L, d)
    for h in range(h_kv):
        run_k[h, :lengths[h]], run_v[h, :lengths[h]] = keys[h][keep[h]], values[h][keep[h]]
    own_d = (torch.randn(1, h_kv, 3, d, generator=g), torch.randn(1, h_kv, 3, d, generator=g), torch.tensor([3]))
    own_p = (torch.randn(h_kv, 5, d, generator=g), torch.randn(h_kv, 5, d, generator=g))
    q_all = torch.randn(6, h_q, d, generator=g)  # token 0: the decode row; 1..3: 3 prefill queries; 4, 5: others
    out_all = torch.full((6, h_q, d), 7.0)
    attend_rows(q_all, out_all, (run_k, run_v, lengths), 0.4, torch.tensor([0]), own_d, [(1, 4, *own_p)])
    mask_d = torch.cat([keep, torch.ones(h_kv, 3, dtype=torch.bool)], 1)
    want_d = masked_reference(q_all[0:1], torch.cat([keys, own_d[0][0]], 1), torch.cat([values, own_d[1][0]], 1),
                              mask_d, 0.4)
    mask_p = torch.cat([keep, torch.ones(h_kv, 5, dtype=torch.bool)], 1)
    want_p = masked_reference(q_all[1:4], torch.cat([keys, own_p[0]], 1), torch.cat([values, own_p[1]], 1), mask_p,
                              0.4)
    torch.testing.assert_close(out_all[0:1].double(), want_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_all[1:4].double(), want_p, rtol=1e-5, atol=1e-5)
    assert bool((out_all[4:] == 7.0).all())
