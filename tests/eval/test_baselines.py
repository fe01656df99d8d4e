# SPDX-License-Identifier: Apache-2.0
"""Baseline scorers obey the ScoreMap contract and their definitions (shapes, no NaN, sinks kept,
kernels equal a slow reference), and plug into the same eviction/compaction path as KVzip.
Accuracy numbers live in benchmarks/, never here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvzip_plugin import KVzipConfig
from kvzip_plugin.eval import baselines
from kvzip_plugin.eviction import plan_eviction
from kvzip_plugin.hf import KVzipCache, KVzipCompressor, compact
from kvzip_plugin.hf.compressor import scored_layers
from kvzip_plugin.hf.template import question_ids
from kvzip_plugin.types import ScoreMap
from tests.helpers import build_tokenizer, make_model

L, H, N = 4, 2, 40
STRUCTURES = ("pair", "head", "layer")


def check_contract(sm: ScoreMap, shape: tuple[int, int, int], layers: tuple[int, ...]) -> None:
    assert isinstance(sm, ScoreMap)
    assert tuple(sm.scores.shape) == shape and sm.scores.dtype == torch.float32
    assert torch.isfinite(sm.scores).all()
    assert sm.scored_layers == layers
    unscored = [i for i in range(shape[0]) if i not in layers]
    assert (sm.scores[unscored] == 0).all()


# ---- query-free scorers ------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_streaming_llm_keeps_sinks_then_the_most_recent(structure, ratio):
    sm = baselines.streaming_llm_scores(L, H, N, scored_layers=(0, 2, 3), n_sink=4)
    check_contract(sm, (L, H, N), (0, 2, 3))
    plan = plan_eviction(sm, ratio, structure)
    k = int(ratio * N)
    for layer in (0, 2, 3):
        for h in range(H):
            kept = torch.nonzero(plan.keep[layer, h]).flatten().tolist()
            assert kept == list(range(4)) + list(range(N - (k - 4), N))
    assert plan.keep[1].all()  # unscored layer untouched


def test_streaming_llm_more_sinks_than_budget_keeps_the_first_sinks():
    plan = plan_eviction(baselines.streaming_llm_scores(1, 1, 20, (0,), n_sink=8), 0.25, "head")
    assert torch.nonzero(plan.keep[0, 0]).flatten().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        baselines.streaming_llm_scores(1, 1, 20, (0,), n_sink=-1)
    check_contract(baselines.streaming_llm_scores(2, 1, 3, (0, 1), n_sink=4), (2, 1, 3), (0, 1))


def test_random_is_seeded():
    a = baselines.random_scores(L, H, N, (1, 2), seed=3)
    check_contract(a, (L, H, N), (1, 2))
    assert torch.equal(a.scores, baselines.random_scores(L, H, N, (1, 2), seed=3).scores)
    assert not torch.equal(a.scores, baselines.random_scores(L, H, N, (1, 2), seed=4).scores)
    assert ((a.scores >= 0) & (a.scores < 1)).all()


def test_knorm_keeps_low_norm_keys():
    gen = torch.Generator().manual_seed(0)
    keys = {0: torch.randn(H, N, 8, generator=gen), 2: torch.randn(H, N, 8, generator=gen)}
    keys[2][1, 7] *= 0.01  # a tiny key: must be the top score of its head
    sm = baselines.knorm_scores(keys, n_layers=3)
    check_contract(sm, (3, H, N), (0, 2))
    assert int(sm.scores[2, 1].argmax()) == 7
    assert torch.allclose(sm.scores[0], -keys[0].norm(dim=-1))
    with pytest.raises(ValueError):
        baselines.knorm_scores({}, n_layers=3)


# ---- attention kernels vs slow references ------------------------------------------------------------------

def attention_rows(query, keys, scaling):
    """Reference: per query head h and query i (the last n_q positions), softmax over visible keys."""
    hq, n_q, _ = query.shape
    hkv, n_k, _ = keys.shape
    g = hq // hkv
    out = torch.zeros((hq, n_q, n_k), dtype=torch.float64)
    for h in range(hq):
        for i in range(n_q):
            pos = n_k - n_q + i
            logits = keys[h // g, : pos + 1].double() @ query[h, i].double() * scaling
            out[h, i, : pos + 1] = torch.softmax(logits, dim=0)
    return out, g


def random_qk(hq=4, hkv=2, n_q=6, n_k=30, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hq, n_q, d, generator=gen), torch.randn(hkv, n_k, d, generator=gen)


@pytest.mark.parametrize("kernel", [1, 5])
def test_snapkv_kernel_matches_reference(kernel):
    q, k = random_qk()
    span = (3, 20)
    got = baselines.snapkv_layer_scores(q, k, span, scaling=0.3, kernel_size=kernel)
    probs, g = attention_rows(q, k, 0.3)
    n_pre = k.shape[1] - q.shape[1]
    mean = probs[..., :n_pre].mean(dim=1)  # [Hq, n_pre]
    if kernel > 1:
        mean = F.avg_pool1d(mean[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    want = mean.view(k.shape[0], g, n_pre).mean(dim=1)[:, span[0]:span[1]]
    assert got.shape == (2, 17) and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all() and (got <= 1).all()


@pytest.mark.parametrize("block", [1, 4, 256])
def test_h2o_kernel_matches_reference(block):
    q, k = random_qk(n_q=30, n_k=30)
    span = (2, 25)
    got = baselines.h2o_layer_scores(q, k, span, scaling=0.5, query_block=block)
    probs, g = attention_rows(q, k, 0.5)
    seen = torch.arange(30, 0, -1, dtype=torch.float64)  # key j is seen by queries j..29
    want = (probs.sum(dim=1) / seen).view(2, g, 30).mean(dim=1)[:, span[0]:span[1]]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # queries covering only the tail: each key averaged over the queries that see it
    q_tail = q[:, -10:]
    got_tail = baselines.h2o_layer_scores(q_tail, k, (0, 30), scaling=0.5)
    probs_t, _ = attention_rows(q_tail, k, 0.5)
    seen_t = torch.tensor([min(10, 30 - j) for j in range(30)], dtype=torch.float64)
    torch.testing.assert_close(got_tail.double(), (probs_t.sum(1) / seen_t).view(2, g, 30).mean(1),
                               rtol=1e-5, atol=1e-6)


def test_kernels_reject_bad_spans():
    q, k = random_qk()
    with pytest.raises(ValueError):
        baselines.snapkv_layer_scores(q, k, (0, 28), scaling=1.0)  # reaches into the window
    with pytest.raises(ValueError):
        baselines.h2o_layer_scores(q, k, (0, 31), scaling=1.0)
    with pytest.raises(ValueError):
        baselines.h2o_layer_scores(torch.randn(3, 6, 8), k, (0, 10), scaling=1.0)  # 3 q heads over 2 KV heads


# ---- on tiny models, through transformers' attention interface ------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["llama-gqa", "gemma3"])
def setup(request, tok):
    layers = 4 if request.param == "gemma3" else 3
    model = make_model(request.param, vocab_size=len(tok), layers=layers)
    compressor = KVzipCompressor(model, tok, KVzipConfig(ratio=0.3))
    text = ("alpha beta gamma delta river stone cloud paper orange violet seven eleven code key value "
            "north south table window garden silver copper lamp ") * 3
    layout = compressor.layout(text)
    full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
    q_ids = question_ids(tok, layout, "What is the value of key?")
    return compressor, layout, full, q_ids


def test_query_aware_scorers_obey_the_contract(setup):
    compressor, layout, full, q_ids = setup
    model = compressor.model
    layers = scored_layers(full)
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads, layout.n_context)
    impl = model.config._attn_implementation
    n_before = full.get_seq_length()
    keys_before = full.layers[layers[0]].keys.clone()
    snap = baselines.snapkv_scores(model, full.view(), q_ids, layout.n_prefix, layout.n_context, layers)
    h2o = baselines.h2o_scores(model, layout.input_ids + q_ids, layout.n_prefix, layout.n_context, layers)
    for sm in (snap, h2o):
        check_contract(sm, shape, layers)
        assert (sm.scores[list(layers)] >= 0).all() and (sm.scores[list(layers)] <= 1).all()
        assert (sm.scores[list(layers)] > 0).any()
    assert model.config._attn_implementation == impl  # restored
    assert full.get_seq_length() == n_before and torch.equal(full.layers[layers[0]].keys, keys_before)
    if model.config.model_type == "gemma3_text":
        assert layers == (1, 3)  # sliding-window layers are not scored


def test_observer_sees_the_cached_post_rope_keys(setup):
    compressor, layout, _, _ = setup
    from transformers import DynamicCache

    model = compressor.model
    seen = {}
    cache = DynamicCache(config=model.config)
    with baselines.observe_attention(model, lambda i, q, k, s: seen.__setitem__(i, (q.clone(), k.clone(), s))):
        with torch.inference_mode():
            model.base_model(input_ids=torch.tensor([layout.input_ids]), past_key_values=cache, use_cache=True)
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    for layer in scored_layers(KVzipCache.from_dynamic(cache)):
        q, k, scaling = seen[layer]
        assert q.shape[:3] == (1, model.config.num_attention_heads, len(layout.input_ids))
        assert torch.equal(k, cache.layers[layer].keys)
        assert scaling > 0
    with pytest.raises(RuntimeError, match="already active"):
        with baselines.observe_attention(model, lambda *a: None):
            with baselines.observe_attention(model, lambda *a: None):
                pass


@pytest.mark.parametrize("scorer", baselines.BASELINES)
def test_every_baseline_goes_through_the_same_eviction_path(setup, scorer):
    compressor, layout, full, q_ids = setup
    model = compressor.model
    layers = scored_layers(full)
    n_layers, n_heads = len(full.layers), int(full.layers[layers[0]].keys.shape[1])
    sm = {
        "snapkv": lambda: baselines.snapkv_scores(model, full.view(), q_ids, layout.n_prefix, layout.n_context, layers),
        "h2o": lambda: baselines.h2o_scores(model, layout.input_ids + q_ids, layout.n_prefix, layout.n_context,
                                            layers),
        "streaming_llm": lambda: baselines.streaming_llm_scores(n_layers, n_heads, layout.n_context, layers),
        "random": lambda: baselines.random_scores(n_layers, n_heads, layout.n_context, layers, seed=0),
        "knorm": lambda: baselines.knorm_scores(
            baselines.cache_context_keys(full, layout.n_prefix, layout.n_context, layers), n_layers),
    }[scorer]()
    check_contract(sm, (n_layers, n_heads, layout.n_context), layers)
    for structure in STRUCTURES:
        plan = plan_eviction(sm, 0.3, structure)
        assert plan.achieved_ratio == pytest.approx(0.3, abs=1.0 / layout.n_context)
        cache = compact(full, plan, layout.n_prefix)
        assert cache.get_seq_length() == full.get_seq_length()


def test_cache_context_keys_checks_length(setup):
    _, layout, full, _ = setup
    layers = scored_layers(full)
    keys = baselines.cache_context_keys(full, layout.n_prefix, layout.n_context, layers)
    assert keys[layers[0]].shape[1] == layout.n_context
    with pytest.raises(ValueError):
        baselines.cache_context_keys(full, layout.n_prefix, layout.n_context + 5, layers)
