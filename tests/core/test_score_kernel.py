# SPDX-License-Identifier: Apache-2.0
"""The KVzip chunk-score kernel against a slow loop-by-loop reference of its formula."""

from __future__ import annotations

import math

import pytest
import torch

from kvzip_plugin.scoring.kvzip import chunk_scores

D = 8


def reference_scores(query, keys_prefix, keys_chunk, keys_self, scaling, keys_other=None):
    """Straight from the definition, in float64 with explicit loops.

    For KV head h, group member g and query i: softmax over
    [prefix keys, (other keys,) chunk keys, self keys 0..i] of scaling * q . k;
    score[h, c] = max over g and i of the probability at chunk key c.
    """
    n_heads_q, n_q, _ = query.shape
    n_heads_kv, m, _ = keys_chunk.shape
    group = n_heads_q // n_heads_kv
    n_p = keys_prefix.shape[1]
    n_o = 0 if keys_other is None else keys_other.shape[1]
    out = [[0.0] * m for _ in range(n_heads_kv)]
    for h in range(n_heads_kv):
        for g in range(group):
            q_head = h * group + g  # query heads of a group are contiguous (repeat_kv layout)
            for i in range(n_q):
                q = query[q_head, i].double()
                visible = [keys_prefix[h, j] for j in range(n_p)]
                visible += [keys_other[h, j] for j in range(n_o)]
                visible += [keys_chunk[h, j] for j in range(m)]
                visible += [keys_self[h, j] for j in range(i + 1)]
                logits = [scaling * float(torch.dot(q, k.double())) for k in visible]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                total = sum(exps)
                for c in range(m):
                    p = exps[n_p + n_o + c] / total
                    out[h][c] = max(out[h][c], p)
    return torch.tensor(out, dtype=torch.float64)


def make_inputs(seed, n_heads_kv, group, n_q, n_p, m, n_o=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * scale

    query = rnd(n_heads_kv * group, n_q, D)
    keys_prefix = rnd(n_heads_kv, n_p, D)
    keys_chunk = rnd(n_heads_kv, m, D)
    keys_self = rnd(n_heads_kv, n_q, D)
    keys_other = rnd(n_heads_kv, n_o, D) if n_o else None
    return query, keys_prefix, keys_chunk, keys_self, keys_other


CASES = [
    # (seed, H_kv, group, n_q, n_p, m)
    pytest.param(0, 3, 1, 7, 4, 6, id="mha"),
    pytest.param(1, 2, 3, 7, 4, 6, id="gqa"),
    pytest.param(2, 2, 3, 5, 0, 4, id="gqa-no-prefix"),
    pytest.param(3, 1, 2, 1, 2, 3, id="single-query"),
]


@pytest.mark.parametrize("query_block", [1, 3, 4, 7, 100])
@pytest.mark.parametrize(("seed", "n_heads_kv", "group", "n_q", "n_p", "m"), CASES)
def test_matches_reference(seed, n_heads_kv, group, n_q, n_p, m, query_block):
    query, kp, kc, ks, _ = make_inputs(seed, n_heads_kv, group, n_q, n_p, m)
    scaling = D ** -0.5
    got = chunk_scores(query, kp, kc, ks, scaling, query_block=query_block)
    want = reference_scores(query, kp, kc, ks, scaling)
    assert got.shape == (n_heads_kv, m)
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    assert ((got >= 0) & (got <= 1)).all()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("query_block", [1, 3, 100])
@pytest.mark.parametrize("group", [1, 3])
def test_keys_other_take_mass_but_are_not_scored(group, query_block):
    n_heads_kv, n_q, n_p, m, n_o = 2, 6, 3, 5, 4
    query, kp, kc, ks, ko = make_inputs(11 + group, n_heads_kv, group, n_q, n_p, m, n_o=n_o)
    scaling = D ** -0.5
    got = chunk_scores(query, kp, kc, ks, scaling, query_block=query_block, keys_other=ko)
    want = reference_scores(query, kp, kc, ks, scaling, keys_other=ko)
    assert got.shape == (n_heads_kv, m)
    assert ((got >= 0) & (got <= 1)).all()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # the extra keys really are in the softmax: scores differ from the chunk-only variant
    without = chunk_scores(query, kp, kc, ks, scaling, query_block=query_block)
    assert (without - got).abs().max() > 1e-3
    assert (got <= without + 1e-6).all()  # extra keys only take probability mass away


def test_causal_mask_matters():
    # a self key placed after the queries that would otherwise dominate must be invisible to earlier queries
    n_heads_kv, group, n_q, n_p, m = 1, 1, 3, 1, 2
    query, kp, kc, ks, _ = make_inputs(5, n_heads_kv, group, n_q, n_p, m, scale=1.0)
    ks = ks.clone()
    ks[0, -1] = query[0, 0] * 50.0  # huge logit for query 0, but query 0 cannot see self key 2
    got = chunk_scores(query, kp, kc, ks, D ** -0.5, query_block=1)
    want = reference_scores(query, kp, kc, ks, D ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_scores_are_a_max_over_queries():
    # the chunk key identical to the only query gets (nearly) all the mass
    query = torch.zeros(1, 1, D)
    query[0, 0, 0] = 20.0
    kc = torch.zeros(1, 3, D)
    kc[0, 1, 0] = 20.0
    kp = torch.zeros(1, 2, D)
    ks = torch.zeros(1, 1, D)
    got = chunk_scores(query, kp, kc, ks, 1.0)
    assert got[0, 1] > 0.999
    assert got[0, 0] < 1e-6 and got[0, 2] < 1e-6


def test_uniform_attention():
    # all-zero queries: uniform softmax; the first query sees n_p + m + 1 keys and gives the max
    n_p, m, n_q = 2, 3, 4
    got = chunk_scores(torch.zeros(2, n_q, D), torch.zeros(1, n_p, D), torch.zeros(1, m, D),
                       torch.zeros(1, n_q, D), D ** -0.5, query_block=2)
    torch.testing.assert_close(got, torch.full((1, m), 1.0 / (n_p + m + 1)), atol=1e-7, rtol=0)


def test_half_precision_inputs_give_float32():
    query, kp, kc, ks, _ = make_inputs(3, 2, 2, 4, 2, 3, scale=1.0)
    got = chunk_scores(query.half(), kp.half(), kc.half(), ks.half(), D ** -0.5, query_block=2)
    want = reference_scores(query.half().float(), kp.half().float(), kc.half().float(), ks.half().float(), D ** -0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_mismatched_heads_raise():
    query, kp, kc, ks, _ = make_inputs(0, 2, 2, 4, 2, 3)
    with pytest.raises(ValueError):
        chunk_scores(query[:3], kp, kc, ks, 1.0)  # 3 query heads for 2 KV heads


def test_mismatched_self_length_raises():
    query, kp, kc, ks, _ = make_inputs(0, 2, 2, 4, 2, 3)
    with pytest.raises(ValueError):
        chunk_scores(query, kp, kc, ks[:, :3], 1.0)


@pytest.mark.parametrize("split", [1, 5, 7])
def test_queries_split_over_steps_give_the_one_pass_scores(split):
    """An engine may prefill the repeat input in several steps: scoring each step's queries at its
    offset (keys up to the step's last query) and taking the max equals one pass over all queries."""
    torch.manual_seed(split)
    h_kv, group, n_q, n_p, m, dim = 2, 2, 13, 3, 9, 8
    q = torch.randn(h_kv * group, n_q, dim)
    kp, kc, ks = torch.randn(h_kv, n_p, dim), torch.randn(h_kv, m, dim), torch.randn(h_kv, n_q, dim)
    whole = chunk_scores(q, kp, kc, ks, 0.3)
    first = chunk_scores(q[:, :split], kp, kc, ks[:, :split], 0.3)
    second = chunk_scores(q[:, split:], kp, kc, ks, 0.3, query_block=4, query_offset=split)
    assert torch.allclose(torch.maximum(first, second), whole, atol=1e-6)
    assert not torch.allclose(first, whole)  # the second step's queries matter
    with pytest.raises(ValueError, match="offset"):
        chunk_scores(q[:, split:], kp, kc, ks, 0.3)  # keys_self longer than the queries, no offset
