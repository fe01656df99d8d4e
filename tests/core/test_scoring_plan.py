# SPDX-License-Identifier: Apache-2.0
"""`plan_scoring`: the scoring requests both engines build for a cached prefix."""

from __future__ import annotations

import random

import pytest

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.hf.template import encode, template_parts
from kvzip_plugin.scoring.plan import SCORING_OVERHEAD, ScoringTarget, Unservable, common_prefix_len, plan_scoring
from kvzip_plugin.scoring.reconstruction import repeat_chunks
from tests.helpers import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _prefix(tok, n_context: int, seed: int = 0) -> list[int]:
    """Chat-template opening + `n_context` random non-special tokens (what a hot prefix looks like)."""
    specials = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in specials]
    rng = random.Random(seed)
    return list(template_parts(tok).prefix_ids) + [rng.choice(vocab) for _ in range(n_context)]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0 and common_prefix_len([7, 8], [7, 8]) == 2


def test_template_opening_is_protected_and_chunks_are_the_reconstruction_chunks(tok):
    cfg = KVzipConfig(chunk_size=64)
    prefix = _prefix(tok, 200)
    plan = plan_scoring(prefix, tok, cfg, max_input_len=4096)
    parts = template_parts(tok)
    assert plan.n_protected == len(parts.prefix_ids) > 0
    want = repeat_chunks(prefix[plan.n_protected:], parts.postfix_ids, lambda s: encode(tok, s), 64,
                         cfg.carry_tokens, cfg.repeat_prompt_first, cfg.repeat_prompt_next)
    assert plan.chunks == want and len(want) == 4  # 200 context tokens in chunks of 64
    targets = plan.targets(job_id=7, prefix_len=len(prefix), softmax="chunk")
    assert targets == [ScoringTarget(7, len(prefix), plan.n_protected, c.start, c.end, "chunk") for c in want]


def test_protected_prefix_tokens_overrides_the_template(tok):
    prefix = _prefix(tok, 100)
    assert plan_scoring(prefix, tok, KVzipConfig(protected_prefix_tokens=5), 4096).n_protected == 5
    with pytest.raises(Unservable, match="context of 0 tokens"):  # capped at L: nothing left to score
        plan_scoring(prefix, tok, KVzipConfig(protected_prefix_tokens=10_000), 4096)


def test_chunks_shrink_to_fit_the_engine_input_limit(tok):
    cfg = KVzipConfig(chunk_size=2000)
    prefix = _prefix(tok, 300)
    L = len(prefix)
    limit = L + SCORING_OVERHEAD + cfg.carry_tokens + 100  # room for chunks of 100 tokens
    plan = plan_scoring(prefix, tok, cfg, max_input_len=limit)
    assert max(c.end - c.start for c in plan.chunks) == 100 and len(plan.chunks) == 3
    assert all(L + len(c.input_ids) <= limit for c in plan.chunks)
    assert len(plan_scoring(prefix, tok, cfg, max_input_len=8192).chunks) == 1


def test_unservable_prefixes(tok):
    cfg = KVzipConfig()
    prefix = _prefix(tok, 300)
    L = len(prefix)
    with pytest.raises(Unservable, match="leaves no room"):
        plan_scoring(prefix, tok, cfg, max_input_len=L + SCORING_OVERHEAD + cfg.carry_tokens + 31)
    plan_scoring(prefix, tok, cfg, max_input_len=L + SCORING_OVERHEAD + cfg.carry_tokens + 31, min_chunk=16)
    with pytest.raises(Unservable, match="min_context_tokens"):
        plan_scoring(_prefix(tok, 3), tok, KVzipConfig(min_context_tokens=4), 4096)
