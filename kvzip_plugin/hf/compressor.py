# SPDX-License-Identifier: Apache-2.0
"""Compress a context once with KVzip on a transformers model, then answer many queries from it.

    compressor = KVzipCompressor(model, tokenizer, KVzipConfig(ratio=0.3))
    ctx = compressor.compress(document)             # prefill + scoring pass + eviction
    for q in questions:
        answer = compressor.answer(ctx, q)          # each query appends to its own view
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvzip_plugin.config import KVzipConfig
from kvzip_plugin.eviction import plan_eviction, plan_head_level
from kvzip_plugin.head_scores import load_head_scores
from kvzip_plugin.hf.attention import ScoringSession, install, scoring_session
from kvzip_plugin.hf.cache import KVzipCache, compact, kv_bytes
from kvzip_plugin.hf.generate import Answer, greedy_answer
from kvzip_plugin.hf.template import ContextLayout, build_layout, encode
from kvzip_plugin.scoring.reconstruction import repeat_chunks
from kvzip_plugin.types import EvictionPlan, ScoreMap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressionStats:
    """What one compression did.

    Attributes:
        n_prefix, n_context: protected-prefix and context tokens.
        achieved_ratio: kept / all context pairs over the compressible layers.
        full_kv_bytes: keys + values of the uncompressed cache.
        kept_kv_bytes: keys + values of the kept pairs.
        stored_kv_bytes: what the compressed cache holds (kept + `pair` padding).
        prefill_seconds, scoring_seconds: wall time of the prefill and of the scoring pass.
    """

    n_prefix: int
    n_context: int
    structure: str
    scorer: str
    achieved_ratio: float
    full_kv_bytes: int
    kept_kv_bytes: int
    stored_kv_bytes: int
    prefill_seconds: float
    scoring_seconds: float


@dataclass(frozen=True)
class CompressedContext:
    """A compressed context: read it through `new_cache()`, never directly.

    Attributes:
        layout: the ids it was built from.
        plan: the eviction plan (None when the context was too short to compress).
        stats: sizes and timings.
    """

    layout: ContextLayout
    plan: EvictionPlan | None
    stats: CompressionStats
    _cache: KVzipCache

    def new_cache(self) -> KVzipCache:
        """A per-query cache over this context; what the query appends stays in it."""
        return self._cache.view()


def scored_layers(cache: KVzipCache) -> tuple[int, ...]:
    """Full-attention layers (sliding-window layers stay uncompressed)."""
    return tuple(sorted(cache.kvzip_layers))


class KVzipCompressor:
    """KVzip on a transformers causal LM (Llama, Qwen2/3, Mistral, Gemma families).

    Args:
        model: a causal LM with `sdpa` or `eager` attention; its attention is routed through
            KVzip's wrapper (identical results when no KVzip cache or scoring is involved).
        tokenizer: its tokenizer (chat template used for the layout and repeat prompts).
        config: the compression settings.
    """

    def __init__(self, model: Any, tokenizer: Any, config: KVzipConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or KVzipConfig()
        install(model)

    # ---- building blocks -------------------------------------------------------------------
    def layout(self, context: str) -> ContextLayout:
        return build_layout(self.tokenizer, context, self.config.system_prompt,
                            self.config.protected_prefix_tokens)

    @torch.inference_mode()
    def prefill(self, input_ids: list[int]) -> DynamicCache:
        """Prefill `input_ids` in pieces of `prefill_chunk_size` into a fresh `DynamicCache`."""
        cache = DynamicCache(config=self.model.config)
        step = self.config.prefill_chunk_size
        base = self.model.base_model
        for start in range(0, len(input_ids), step):
            ids = torch.tensor([input_ids[start:start + step]], device=self.model.device)
            base(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache

    @torch.inference_mode()
    def score(self, layout: ContextLayout, cache: KVzipCache, progress: bool = False) -> ScoreMap:
        """The KVzip scoring pass: teacher-forced "repeat the context", chunk by chunk.

        Args:
            layout: the cached ids (`cache` holds prefix + context).
            cache: the full cache; each chunk runs on its own view, so the repeat input's KV is
                dropped after the chunk and `cache` is unchanged.
            progress: show a progress bar over the chunks.

        Returns:
            Scores `[layers, H_kv, n_context]`.
        """
        cfg = self.config
        layers = scored_layers(cache)
        if not layers:
            raise ValueError("the model has no full-attention layer to compress")
        n_layers = len(cache.layers)
        n_heads = cache.layers[layers[0]].keys.shape[1]
        scores = torch.zeros((n_layers, n_heads, layout.n_context), dtype=torch.float32)
        chunks = repeat_chunks(layout.context_ids, layout.postfix_ids,
                               lambda text: encode(self.tokenizer, text), cfg.chunk_size,
                               cfg.carry_tokens, cfg.repeat_prompt_first, cfg.repeat_prompt_next)
        base = self.model.base_model
        for chunk in tqdm(chunks, desc="KVzip scoring", unit="chunk", disable=not progress):
            session = ScoringSession(
                n_prefix=layout.n_prefix,
                span_start=layout.n_prefix + chunk.start,
                span_end=layout.n_prefix + chunk.end,
                scored_layers=frozenset(layers),
                softmax=cfg.score_softmax,
                query_block=cfg.score_query_block,
            )
            ids = torch.tensor([chunk.input_ids], device=self.model.device)
            with scoring_session(session):
                base(input_ids=ids, past_key_values=cache.view(), use_cache=True)
            for layer in layers:
                scores[layer, :, chunk.start:chunk.end] = session.scores[layer].cpu()
        return ScoreMap(scores=scores, scored_layers=layers)

    def plan(self, layout: ContextLayout, cache: KVzipCache, progress: bool = False) -> EvictionPlan:
        """Scores -> plan, for the configured scorer and structure."""
        cfg = self.config
        if cfg.scorer == "kvzip_head":
            head_scores = load_head_scores(self.model.config, cfg.head_scores_path)
            return plan_head_level(head_scores, layout.n_context, cfg.ratio, scored_layers(cache))
        return plan_eviction(self.score(layout, cache, progress), cfg.ratio, cfg.structure)

    # ---- one call ----------------------------------------------------------------------------
    def compress(self, context: str | ContextLayout, progress: bool = False) -> CompressedContext:
        """Prefill, score and compact `context`.

        Contexts shorter than `min_context_tokens` are kept whole (ratio 1.0, logged).
        """
        layout = context if isinstance(context, ContextLayout) else self.layout(context)
        t0 = time.perf_counter()
        full = KVzipCache.from_dynamic(self.prefill(layout.input_ids))
        t1 = time.perf_counter()
        full_bytes = kv_bytes(full)[1]
        if layout.n_context < self.config.min_context_tokens:
            logger.info("context of %d tokens < min_context_tokens=%d: kept uncompressed",
                        layout.n_context, self.config.min_context_tokens)
            plan, cache, t2 = None, full, t1
        else:
            plan = self.plan(layout, full, progress)
            t2 = time.perf_counter()
            cache = compact(full, plan, layout.n_prefix)
        kept, stored = kv_bytes(cache)
        stats = CompressionStats(
            n_prefix=layout.n_prefix, n_context=layout.n_context,
            structure=plan.structure if plan else "none", scorer=self.config.scorer,
            achieved_ratio=plan.achieved_ratio if plan else 1.0,
            full_kv_bytes=full_bytes, kept_kv_bytes=kept, stored_kv_bytes=stored,
            prefill_seconds=t1 - t0, scoring_seconds=t2 - t1,
        )
        return CompressedContext(layout=layout, plan=plan, stats=stats, _cache=cache)

    def full(self, context: str | ContextLayout) -> CompressedContext:
        """The same context uncompressed (the baseline), behind the same interface."""
        layout = context if isinstance(context, ContextLayout) else self.layout(context)
        t0 = time.perf_counter()
        cache = KVzipCache.from_dynamic(self.prefill(layout.input_ids))
        size = kv_bytes(cache)[1]
        stats = CompressionStats(layout.n_prefix, layout.n_context, "none", "none", 1.0, size, size,
                                 size, time.perf_counter() - t0, 0.0)
        return CompressedContext(layout=layout, plan=None, stats=stats, _cache=cache)

    def answer(self, ctx: CompressedContext, question: str, max_new_tokens: int = 32) -> Answer:
        """Greedy answer to `question` from `ctx` (a fresh view; `ctx` is not changed)."""
        return greedy_answer(self.model, self.tokenizer, ctx.new_cache(), ctx.layout, question,
                             max_new_tokens)
