# SPDX-License-Identifier: Apache-2.0
"""The chunked KVzip scorer equals a slow reference written from the formula, and stays linear."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvzip_plugin import KVzipConfig
from kvzip_plugin.hf import KVzipCache, KVzipCompressor
from kvzip_plugin.hf.template import encode
from tests.helpers import make_model
from tests.hf.oracles import reference_scores
from tests.hf.test_compressed_cache import make_layout

N_CONTEXT = 45


@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa", "qwen3", "gemma3"])
@pytest.mark.parametrize("chunk_size", [7, 15, N_CONTEXT, 64])  # not dividing, dividing, whole, larger
def test_chunked_scorer_equals_reference(tokenizer, arch, chunk_size):
    layout = make_layout(tokenizer, n_context=N_CONTEXT, seed=3)
    config = KVzipConfig(chunk_size=chunk_size, carry_tokens=3, score_query_block=4)
    model = make_model(arch, vocab_size=len(tokenizer))
    compressor = KVzipCompressor(model, tokenizer, config)
    full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
    got = compressor.score(layout, full)
    reference_model = make_model(arch, vocab_size=len(tokenizer))
    want = reference_scores(reference_model, layout.prefix_ids, layout.context_ids, layout.postfix_ids,
                            lambda s: encode(tokenizer, s), chunk_size, 3, config.repeat_prompt_first,
                            config.repeat_prompt_next, got.scored_layers)
    assert got.scores.shape == want.shape
    torch.testing.assert_close(got.scores.double(), want, atol=1e-5, rtol=1e-4)
    assert got.scores[list(got.scored_layers)].gt(0).all()


def test_scoring_leaves_the_full_cache_unchanged(tokenizer):
    layout = make_layout(tokenizer, n_context=N_CONTEXT)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=10))
    full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
    compressor.score(layout, full)
    for (k, v), layer in zip(before, full.layers, strict=True):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
        assert layer.get_seq_length() == len(layout.input_ids)


def test_full_cache_softmax_variant_scores_lower(tokenizer):
    """Spanning the whole cache spreads the softmax over more keys: every score is <= the chunk one."""
    layout = make_layout(tokenizer, n_context=N_CONTEXT)
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    scores = {}
    for softmax in ("chunk", "full_cache"):
        compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=10, score_softmax=softmax))
        full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
        scores[softmax] = compressor.score(layout, full).scores
    assert (scores["full_cache"] <= scores["chunk"] + 1e-7).all()
    assert (scores["full_cache"] < scores["chunk"] - 1e-4).any()


class _LargestTensor(TorchDispatchMode):
    """Records, for every tensor an op produces, its two largest dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.worst = (0, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                dims = sorted(t.shape, reverse=True)[:2]
                self.worst = max(self.worst, (dims[1], dims[0]))
        return out


def test_scoring_never_holds_a_context_by_context_tensor(tokenizer):
    """With a 400-token context and 32-token chunks, no tensor created by the scoring pass has two
    dimensions as large as the context (the largest are chunk-sized x cache-sized)."""
    n_context = 400
    layout = make_layout(tokenizer, n_context=n_context)
    model = make_model("llama-gqa", vocab_size=len(tokenizer), layers=2)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(chunk_size=32, score_query_block=16))
    full = KVzipCache.from_dynamic(compressor.prefill(layout.input_ids))
    probe = _LargestTensor()
    with probe:
        compressor.score(layout, full)
    second_largest, largest = probe.worst
    assert largest >= n_context  # the cache itself is seen (the check is live)
    assert second_largest < n_context // 4
