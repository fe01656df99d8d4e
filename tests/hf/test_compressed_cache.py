# SPDX-License-Identifier: Apache-2.0
"""The compressed transformers cache is exact: lossless at ratio 1.0, equal to masked full attention
otherwise, original positions, reusable without mutation, and usable by `generate()`."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from kvzip_plugin import KVzipConfig
from kvzip_plugin.hf import ContextLayout, KVzipCompressor, question_ids
from kvzip_plugin.hf.cache import KVzipLayer
from kvzip_plugin.hf.template import template_parts
from tests.helpers import make_model
from tests.hf.oracles import full_keep_masks, use_oracle

QUESTIONS = ["What is the value of key?", "alpha beta gamma?", "Repeat the code north south."]


def make_layout(tokenizer, n_context: int = 80, seed: int = 0) -> ContextLayout:
    parts = template_parts(tokenizer)
    rng = random.Random(seed)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    return ContextLayout(parts.prefix_ids, tuple(rng.choice(vocab) for _ in range(n_context)), parts.postfix_ids)


def plain_decode(model, layout, q_ids, steps):
    """The uncompressed model, pure transformers: logits of the question and of each greedy step."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        model(input_ids=torch.tensor([layout.input_ids]), past_key_values=cache, use_cache=True)
        logits = model(input_ids=torch.tensor([q_ids]), past_key_values=cache, use_cache=True).logits
        out.append(logits)
        for _ in range(steps):
            tok = logits[:, -1:].argmax(-1)
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return out


def cached_decode(model, cache, q_ids, steps, feed=None):
    """The same on `cache`; `feed` forces the decoded tokens (to compare against an oracle)."""
    out = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([q_ids]), past_key_values=cache, use_cache=True).logits
        out.append(logits)
        for i in range(steps):
            tok = logits[:, -1:].argmax(-1) if feed is None else feed[i]
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return out


ARCHS = ["llama-mha", "llama-gqa", "qwen2", "qwen3", "mistral", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_ratio_one_is_bit_identical(tokenizer, arch, structure):
    """ratio 1.0: every logit of the question and of 6 decode steps equals the uncompressed model."""
    layout = make_layout(tokenizer)
    baseline = make_model(arch, vocab_size=len(tokenizer), layers=4)
    model = make_model(arch, vocab_size=len(tokenizer), layers=4)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=1.0, structure=structure, chunk_size=32))
    ctx = compressor.compress(layout)
    assert ctx.stats.achieved_ratio == 1.0
    q_ids = question_ids(tokenizer, layout, QUESTIONS[0])
    want = plain_decode(baseline, layout, q_ids, 6)
    got = cached_decode(model, ctx.new_cache(), q_ids, 6)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa", "qwen3", "gemma3"])
@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_compressed_attention_equals_masked_full_attention(tokenizer, arch, structure):
    """At ratio 0.4 the compressed cache gives the logits of the full cache with the evicted pairs
    masked out (explicit float64 oracle), for the question and 4 decode steps."""
    layout = make_layout(tokenizer, n_context=60, seed=1)
    model = make_model(arch, vocab_size=len(tokenizer))
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.4, structure=structure, chunk_size=25))
    ctx = compressor.compress(layout)
    plan = ctx.plan
    assert plan is not None and 0.35 < plan.achieved_ratio <= 0.4
    if structure != "pair":
        assert plan.is_uniform()
    q_ids = question_ids(tokenizer, layout, QUESTIONS[1])
    got = cached_decode(model, ctx.new_cache(), q_ids, 4)
    feed = [g[:, -1:].argmax(-1) for g in got[:-1]]

    oracle = make_model(arch, vocab_size=len(tokenizer))
    n_total = len(layout.input_ids)
    masks = full_keep_masks(plan, layout.n_prefix, n_total)
    use_oracle(oracle, masks)
    cache = DynamicCache(config=oracle.config)
    with torch.inference_mode():
        oracle(input_ids=torch.tensor([layout.input_ids]), past_key_values=cache, use_cache=True)
    # the oracle's masks must also cover the tokens appended after the prefill
    for step, g in enumerate(got):
        n_past = n_total + (0 if step == 0 else len(q_ids) + step - 1)
        for layer, m in masks.items():
            masks[layer] = torch.cat([m, torch.ones((m.shape[0], n_past - m.shape[1]), dtype=torch.bool)], dim=1)
        with torch.inference_mode():
            ids = torch.tensor([q_ids]) if step == 0 else feed[step - 1]
            want = oracle(input_ids=ids, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(g, want, atol=2e-4, rtol=1e-4)
    # and eviction changed the output (the comparison above is not vacuous)
    full = cached_decode(model, compressor.full(layout).new_cache(), q_ids, 0)[0]
    assert (full - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("structure", ["pair", "head"])
def test_positions_after_compression_are_the_original_ones(tokenizer, structure):
    """RoPE positions of the question and decoded tokens equal those of the uncompressed run."""
    layout = make_layout(tokenizer, n_context=70)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    seen: list[list[int]] = []
    model.model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"][0].tolist()), with_kwargs=True)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3, structure=structure))
    ctx = compressor.compress(layout)
    q_ids = question_ids(tokenizer, layout, QUESTIONS[2])
    seen.clear()
    cached_decode(model, ctx.new_cache(), q_ids, 5)
    compressed_positions = seen[:]
    full = compressor.full(layout)
    seen.clear()
    cached_decode(model, full.new_cache(), q_ids, 5)
    assert compressed_positions == seen
    n = len(layout.input_ids)
    assert compressed_positions[0] == list(range(n, n + len(q_ids)))
    assert [p[0] for p in compressed_positions[1:]] == list(range(n + len(q_ids), n + len(q_ids) + 5))
    # the kept slots carry the logical positions they were cached at
    for idx, layer in ctx.new_cache().kvzip_layers.items():
        for h, row in enumerate(layer.positions):
            real = row[row >= 0]
            assert torch.equal(real[: layout.n_prefix], torch.arange(layout.n_prefix))
            kept = torch.nonzero(ctx.plan.keep[idx, h]).flatten() + layout.n_prefix
            assert torch.equal(real[layout.n_prefix:], kept)


def test_reuse_for_three_questions_leaves_the_context_unchanged(tokenizer):
    layout = make_layout(tokenizer, n_context=90)
    model = make_model("qwen2", vocab_size=len(tokenizer))
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.5, structure="pair", chunk_size=40))
    ctx = compressor.compress(layout)
    snapshot = {i: (layer.keys.clone(), layer.values.clone(), layer.n_physical, layer.logical_length)
                for i, layer in ctx.new_cache().kvzip_layers.items()}
    first = [compressor.answer(ctx, q, max_new_tokens=6).token_ids for q in QUESTIONS]
    again = compressor.answer(ctx, QUESTIONS[0], max_new_tokens=6).token_ids
    assert again == first[0]
    for i, layer in ctx.new_cache().kvzip_layers.items():
        keys, values, n_phys, logical = snapshot[i]
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert (layer.n_physical, layer.logical_length) == (n_phys, logical)
    assert isinstance(ctx.new_cache().layers[0], KVzipLayer)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])
def test_generate_works_on_a_compressed_cache(tokenizer, arch):
    """`model.generate()` on a compressed view decodes the same tokens as the greedy loop."""
    layout = make_layout(tokenizer, n_context=64)
    model = make_model(arch, vocab_size=len(tokenizer))
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3, structure="pair"))
    ctx = compressor.compress(layout)
    q_ids = question_ids(tokenizer, layout, QUESTIONS[0])
    ids = torch.tensor([layout.input_ids + q_ids])
    out = model.generate(input_ids=ids, past_key_values=ctx.new_cache(), max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    generated = out[0, ids.shape[1]:].tolist()
    loop = cached_decode(model, ctx.new_cache(), q_ids, 5)
    assert generated == [int(lg[0, -1].argmax()) for lg in loop]


def test_gemma_sliding_layers_stay_uncompressed(tokenizer):
    layout = make_layout(tokenizer, n_context=50)
    model = make_model("gemma3", vocab_size=len(tokenizer), layers=4)
    ctx = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3)).compress(layout)
    cache = ctx.new_cache()
    assert sorted(cache.kvzip_layers) == [1, 3]
    assert ctx.plan.compressible_layers == (1, 3)
    assert ctx.plan.keep[[0, 2]].all()
    assert all(getattr(cache.layers[i], "is_sliding", False) for i in (0, 2))


def test_short_context_is_kept_whole(tokenizer):
    layout = make_layout(tokenizer, n_context=10)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    ctx = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3, min_context_tokens=16)).compress(layout)
    assert ctx.plan is None and ctx.stats.achieved_ratio == 1.0
    assert ctx.stats.kept_kv_bytes == ctx.stats.full_kv_bytes


def test_compressed_bytes_match_the_ratio(tokenizer):
    layout = make_layout(tokenizer, n_context=100)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    for structure in ("head", "pair"):
        ctx = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.25, structure=structure)).compress(layout)
        s = ctx.stats
        per_token = s.full_kv_bytes // len(layout.input_ids)
        assert s.kept_kv_bytes == per_token * (layout.n_prefix + round(0.25 * 100))
        if structure == "head":
            assert s.stored_kv_bytes == s.kept_kv_bytes
        else:
            assert s.stored_kv_bytes >= s.kept_kv_bytes


def test_uncompressed_model_needs_the_hook(tokenizer):
    """A compacted cache read without KVzip's attention fails loudly instead of reading wrong slots."""
    layout = make_layout(tokenizer, n_context=40)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    ctx = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3, structure="pair")).compress(layout)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError):  # several tokens: sdpa itself rejects the mask/slot mismatch
        cached_decode(model, ctx.new_cache(), question_ids(tokenizer, layout, "hi"), 0)
    with pytest.raises(RuntimeError, match="install"), torch.inference_mode():  # one token: caught by the cache
        model(input_ids=torch.tensor([[5]]), past_key_values=ctx.new_cache(), use_cache=True)
